"""VisualBERT / ViLBERT (shapes, gradients, padding, training on a tiny synthetic VQA set)
and the VQA accuracy of polymodal.eval.vqa against a direct computation."""
import itertools

import pytest
import torch

from polymodal.eval.vqa import (answer_vocab, evaluate_vqa, exact_match, normalize_answer, soft_score,
                                vqa_accuracy)
from polymodal.models.fusion import (ViLBERT, ViLBERTConfig, VisualBERT, VisualBERTConfig, image_patches,
                                     vqa_loss)

MODELS = [(VisualBERT, "visualbert-nano"), (ViLBERT, "vilbert-nano")]
CONFIGS = {VisualBERT: VisualBERTConfig, ViLBERT: ViLBERTConfig}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribed CI box: OpenMP spin-waits dominate nano models
    yield
    torch.set_num_threads(n)


def _build(cls, preset, seed=0):
    torch.manual_seed(seed)
    return cls(CONFIGS[cls].from_preset(preset))


def _vqa_set():
    """8 images (4 colours x square or not, 16x16 -> 16 patches of 4x4x3 = 48 features) and two
    questions each: 'what colour?' (answers 0-3) and 'is there a square?' (4 = no, 5 = yes).
    Both the question and the image are needed to answer. ITM text: [CLS, colour word]."""
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    imgs, qs, ans, itm_text, itm_y = [], [], [], [], []
    for c in range(4):
        for s in range(2):
            x = colours[c][:, None, None].expand(3, 16, 16).clone()
            if s:
                x[:, 4:12, 4:12] = 0.5
            for q, a in (([1, 10, 11], c), ([1, 12, 13], 4 + s)):
                imgs.append(x)
                qs.append(q)
                ans.append(a)
                wrong = (c + 1 + s) % 4
                itm_text.append([1, 20 + (c if len(itm_y) % 2 == 0 else wrong)])
                itm_y.append(1 if len(itm_y) % 2 == 0 else 0)
    px = torch.stack(imgs)
    return (image_patches(px, 4), torch.tensor(qs), torch.tensor(ans), torch.tensor(itm_text),
            torch.tensor(itm_y))


@pytest.mark.parametrize("cls,preset", MODELS)
def test_heads_shapes_and_gradients(cls, preset):
    model = _build(cls, preset)
    feats, qs, ans, _, _ = _vqa_set()
    out = model(qs[:5], feats[:5])
    assert out["vqa"].shape == (5, model.config.num_answers) and out["itm"].shape == (5, 2)
    (vqa_loss(out["vqa"], ans[:5]) + out["itm"].logsumexp(-1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing  # every layer (both streams, co-attention, both heads) is used


@pytest.mark.parametrize("cls,preset", MODELS)
def test_padding_is_ignored(cls, preset):
    model = _build(cls, preset).eval()
    feats, qs, _, _, _ = _vqa_set()
    ids = torch.cat([qs[:2], torch.zeros(2, 3, dtype=torch.long)], 1)
    am = torch.cat([torch.ones(2, 3), torch.zeros(2, 3)], 1).long()
    vf = torch.cat([feats[:2, :12], torch.randn(2, 4, 48)], 1)
    vm = torch.cat([torch.ones(2, 12), torch.zeros(2, 4)], 1)
    with torch.no_grad():
        ref = model.vqa_logits(qs[:2], feats[:2, :12])
        padded = model.vqa_logits(ids, vf, am, vm)
    assert torch.allclose(ref, padded, atol=1e-5)


def test_vilbert_co_attention_mixes_the_streams():
    model = _build(ViLBERT, "vilbert-nano").eval()
    feats, qs, _, _, _ = _vqa_set()
    with torch.no_grad():
        t1, _ = model.streams(qs[:1], feats[:1])
        t2, _ = model.streams(qs[:1], feats[2:3])  # another image, same question
    assert (t1 - t2).abs().max() > 1e-4  # the text stream sees the image only through co-attention


@pytest.mark.parametrize("cls,preset", MODELS)
def test_vqa_and_itm_losses_fall(cls, preset):
    model = _build(cls, preset)
    feats, qs, ans, itm_text, itm_y = _vqa_set()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(60):
        vqa = vqa_loss(model.vqa_logits(qs, feats), ans)
        itm = torch.nn.functional.cross_entropy(model.itm_logits(itm_text, feats), itm_y)
        loss = vqa + itm
        first = first if first is not None else (vqa.item(), itm.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert vqa.item() < 0.2 * first[0], (first, vqa.item())
    assert itm.item() < 0.6 * first[1], (first, itm.item())
    with torch.no_grad():
        acc = (model.vqa_logits(qs, feats).argmax(-1) == ans).float().mean().item()
    assert acc >= 0.9  # 15 of the 16 training questions at least


def test_soft_target_vqa_loss_is_bce():
    logits = torch.randn(2, 5)
    targets = torch.tensor([[0, 1.0, 1 / 3, 0, 0], [0, 0, 0, 2 / 3, 1.0]])
    ref = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[i, j], targets[i, j])
              for i in range(2) for j in range(5)) / 2
    assert torch.allclose(vqa_loss(logits, targets), ref, atol=1e-6)


# -- VQA accuracy --------------------------------------------------------------------------
def _direct_accuracy(pred, answers):
    """The definition: mean over all 9-of-10 subsets of min(#matches / 3, 1) (inputs pre-normalised)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == pred for i in s) / 3, 1) for s in subsets) / len(subsets)


@pytest.mark.parametrize("humans,pred", [
    (["2"] * 3 + ["3"] * 7, "2"),  # 3 agree: 0.9, not 1
    (["2"] * 4 + ["3"] * 6, "2"),  # 4 agree: 1.0
    (["2"] * 2 + ["3"] * 8, "2"),  # 2 agree: 0.6
    (["2"] * 1 + ["3"] * 9, "2"),
    (["yes"] * 10, "no"),
])
def test_vqa_accuracy_equals_direct_computation(humans, pred):
    assert vqa_accuracy(pred, humans) == pytest.approx(_direct_accuracy(pred, humans))


def test_vqa_accuracy_known_values_and_normalisation():
    humans = ["two"] * 3 + ["Three."] * 7
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)  # 'two' -> '2' on the human side
    assert vqa_accuracy("the three", humans) == pytest.approx(1.0)
    # official quirk: with unanimous humans nothing is normalised ...
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # ... unless asked to normalise always
    assert vqa_accuracy("Yes", ["yes"] * 10, official=False) == 1.0
    assert soft_score(1) == pytest.approx(1 / 3) and soft_score(5) == 1.0


@pytest.mark.parametrize("raw,norm", [
    ("The Dog.", "dog"), ("black-and-white", "black and white"), ("1,000", "1000"), ("3.5", "3.5"),
    ("dont", "don't"), ("Two dogs", "2 dogs"), ("none", "0"), ("yes!", "yes"), ("an apple ", "apple"),
    ("hot dog?", "hot dog"), (" left\tside\n", "left side"),
])
def test_answer_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_mixed_evaluation():
    assert exact_match("The Red.", "red") == 1.0 and exact_match("blue", "red") == 0.0
    res = evaluate_vqa(["red", "2", "yes"], ["red", ["two"] * 3 + ["3"] * 7, "no"])
    assert res["n"] == 3 and res["accuracy"] == pytest.approx((1 + 0.9 + 0) / 3)
    assert answer_vocab([["Two", "2", "three"], "the cat"]) == ["2", "3", "cat"]  # "two" and "2" are one answer
    with pytest.raises(ValueError, match="answer sets"):
        evaluate_vqa(["a"], [])
