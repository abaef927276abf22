"""Task heads vs Hugging Face: tiny random *ForSequenceClassification / *ForTokenClassification /
*ForQuestionAnswering models, saved as HF folders, loaded through our adapter; logits AND losses
must match HF's to 1e-4. Also: checkpoint round trips, LoRA trains only adapters, merge == unmerged."""
from __future__ import annotations

import pytest
import torch

from polymodal.interop.hf import export_hf, load_hf_folder
from polymodal.models.heads import (DecoderSequenceClassifier, QuestionAnswering, SequenceClassifier, TaskConfig,
                                    TokenClassifier, last_token_index)
from polymodal.models.registry import load_model, save_model
from polymodal.nn.lora import apply_lora, merge_lora

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(120)

TOL = dict(atol=1e-4, rtol=1e-4)
V, T, B = 99, 12, 3


def _randomise(model, std=0.2, seed=0):
    """HF's init (std 0.02) gives near-zero logits that would match anything; spread them out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _inputs(pad_id=0, left=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for r, n in enumerate([T, T - 4, T - 7]):
        if left:
            mask[r, : T - n] = 0
        else:
            mask[r, n:] = 0
    ids[mask == 0] = pad_id
    tt = torch.zeros(B, T, dtype=torch.long)
    tt[:, T // 2:] = 1
    return ids, mask, tt * mask


def _bert_cfg(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, pad_token_id=0, **kw)


def _via_folder(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return load_hf_folder(tmp_path / "hf")


@pytest.mark.parametrize("num_labels", [3, 1])
def test_bert_sequence_classification(tmp_path, num_labels):
    hf = _randomise(transformers.BertForSequenceClassification(_bert_cfg(num_labels=num_labels)))
    ours = _via_folder(hf, tmp_path)
    assert isinstance(ours, SequenceClassifier) and ours.config.head == "pooler"
    assert ours.config.problem == ("regression" if num_labels == 1 else "classification")
    ids, mask, tt = _inputs()
    labels = torch.tensor([0.5, 2.0, 1.25]) if num_labels == 1 else torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
        out = ours(ids, mask, tt, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert ref.logits.abs().max() > 0.1  # the comparison is not between near-zero numbers


def test_roberta_sequence_classification(tmp_path):
    cfg = transformers.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=T + 2, type_vocab_size=1,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=4)
    hf = _randomise(transformers.RobertaForSequenceClassification(cfg))
    ours = _via_folder(hf, tmp_path)
    assert ours.config.head == "roberta" and ours.backbone.pooler is None
    ids, mask, _ = _inputs(pad_id=1)
    labels = torch.tensor([3, 0, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(ids, mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def test_bert_token_classification(tmp_path):
    names = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    hf = _randomise(transformers.BertForTokenClassification(_bert_cfg(id2label=names,
                                                                      label2id={v: k for k, v in names.items()})))
    ours = _via_folder(hf, tmp_path)
    assert isinstance(ours, TokenClassifier) and ours.config.labels == tuple(names.values())
    ids, mask, tt = _inputs()
    labels = torch.randint(0, 5, (B, T), generator=torch.Generator().manual_seed(3))
    labels[mask == 0] = -100
    labels[:, 0] = -100  # [CLS]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
        out = ours(ids, mask, tt, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def test_bert_question_answering(tmp_path):
    hf = _randomise(transformers.BertForQuestionAnswering(_bert_cfg()))
    ours = _via_folder(hf, tmp_path)
    assert isinstance(ours, QuestionAnswering)
    ids, mask, tt = _inputs()
    # the third answer lies outside the window: HF clamps it to T and ignores it
    start, end = torch.tensor([3, 5, 40]), torch.tensor([4, 7, 41])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, start_positions=start, end_positions=end)
        out = ours(ids, mask, tt, start_positions=start, end_positions=end)
    torch.testing.assert_close(out.start_logits, ref.start_logits, **TOL)
    torch.testing.assert_close(out.end_logits, ref.end_logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


def _decoder_pair(kind: str):
    from polymodal.interop.hf import get_adapter
    from polymodal.interop.weight_map import load_into
    from polymodal.models.gpt import GPT

    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      pad_token_id=0, num_labels=3)
        hf = transformers.GPT2ForSequenceClassification(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=0, num_labels=3, tie_word_embeddings=True)
        hf = transformers.LlamaForSequenceClassification(cfg)
    hf = _randomise(hf, std=0.1)
    adapter = get_adapter(kind)
    config = adapter.config_from_hf(hf.config.to_dict())
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("score.")}
    gpt = GPT(config)
    load_into(gpt, adapter.weight_map(config, set(sd)).to_ours(sd, "hf"), "hf")
    ours = DecoderSequenceClassifier(gpt, num_labels=3, pad_token_id=0).eval()
    with torch.no_grad():
        ours.score.weight.copy_(hf.score.weight)
    return hf, ours


@pytest.mark.parametrize("kind,left", [("gpt2", False), ("llama", True), ("llama", False)])
def test_decoder_sequence_classification(kind, left):
    hf, ours = _decoder_pair(kind)
    ids, mask, _ = _inputs(pad_id=0, left=left)
    labels = torch.tensor([1, 2, 0])
    # HF counts positions 0..T-1 whatever the padding; ours count real tokens only (so a left-padded
    # row scores like the unpadded one). Give HF the same positions, as HF generate() does.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        out = ours(ids, mask, labels=labels)
        out_nomask = ours(ids, labels=labels)  # HF's own rule: the last token that is not pad_token_id
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    if not left:
        torch.testing.assert_close(out_nomask.logits, ref.logits, **TOL)
    # the pooled token is the last real one
    expect = torch.tensor([T - 1] * B) if left else mask.sum(-1) - 1
    assert torch.equal(last_token_index(ids, mask, 0), expect)


def test_save_load_roundtrip_and_hf_export(tmp_path):
    hf = _randomise(transformers.BertForSequenceClassification(_bert_cfg(num_labels=3)))
    ours = _via_folder(hf, tmp_path)
    save_model(ours, tmp_path / "pm")
    back = load_model(tmp_path / "pm")
    assert isinstance(back.config, TaskConfig) and back.config == ours.config
    ids, mask, tt = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, tt).logits, ours(ids, mask, tt).logits, atol=0, rtol=0)
    export_hf(back, tmp_path / "hf_out")
    hf2 = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf_out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits,
                                   ours(ids, mask, tt).logits, **TOL)

    _, dec = _decoder_pair("llama")  # a GPT backbone round-trips through the same family
    save_model(dec, tmp_path / "dec")
    dec2 = load_model(tmp_path / "dec")
    assert isinstance(dec2, DecoderSequenceClassifier)
    ids, mask, _ = _inputs(left=True)
    with torch.no_grad():
        torch.testing.assert_close(dec2(ids, mask).logits, dec(ids, mask).logits, atol=0, rtol=0)


def test_lora_trains_only_adapters_and_merges():
    from polymodal.models.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    model = SequenceClassifier(Encoder(EncoderConfig.from_preset("tiny-bert")), num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(model, ["backbone.blocks.*.attn.qkv", "backbone.blocks.*.attn.proj"], r=4)
    assert len(wrapped) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids, mask, _ = _inputs()
    ids = ids % 128
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        loss = model(ids, mask, labels=torch.tensor([0, 1, 1])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = model.state_dict()
    for k, v in before.items():  # every original tensor is untouched; only lora_A/lora_B moved
        key = k if k in after else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after[key], v), k
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if k.endswith("lora_B"))
    with torch.no_grad():
        unmerged = model(ids, mask).logits
        merge_lora(model)
        merged = model(ids, mask).logits
    assert not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_albert_sequence_classification(tmp_path):
    cfg = transformers.AlbertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=37, max_position_embeddings=64, embedding_size=16,
                                    num_labels=2, pad_token_id=0)
    hf = _randomise(transformers.AlbertForSequenceClassification(cfg))
    ours = _via_folder(hf, tmp_path)
    assert ours.config.head == "pooler" and ours.backbone.config.share_layers
    ids, mask, tt = _inputs()
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
        out = ours(ids, mask, tt, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
