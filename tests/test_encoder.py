"""Encoder family (BERT / RoBERTa / ALBERT) parity with Hugging Face transformers.

Tiny random HF models are saved with ``save_pretrained``, loaded into ours through
the HF adapter, and compared in fp32 on a padded batch with token types; our
export is loaded back by transformers and compared again.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.interop.hf import export_hf, load_hf_folder  # noqa: E402
from polymodal.io import CheckpointError  # noqa: E402
from polymodal.models.encoder import (  # noqa: E402
    Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForPreTraining, SentenceEncoder, mean_pool, normalize,
)
from polymodal.models.registry import load_model, save_model  # noqa: E402

TOL = 1e-4
V, T = 99, 9
_small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=40)


def _hf_config(mt):
    if mt == "bert":
        return transformers.BertConfig(**_small, type_vocab_size=2)
    if mt == "roberta":
        return transformers.RobertaConfig(**_small, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return transformers.AlbertConfig(**_small, embedding_size=16, type_vocab_size=2, hidden_act="gelu_new")


CASES = [("bert", "BertModel"), ("bert", "BertForMaskedLM"), ("bert", "BertForPreTraining"),
         ("roberta", "RobertaModel"), ("roberta", "RobertaForMaskedLM"),
         ("albert", "AlbertModel"), ("albert", "AlbertForMaskedLM"), ("albert", "AlbertForPreTraining")]


def _inputs(hf_cfg):
    g = torch.Generator().manual_seed(0)
    pad = hf_cfg.pad_token_id
    ids = torch.randint(3, V, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in two rows
    mask[2, 4:] = 0
    ids[mask == 0] = pad  # RoBERTa derives positions from where the pad ids are
    types = torch.zeros_like(ids)
    if hf_cfg.type_vocab_size > 1:
        types[:, 3:] = 1  # segment B
    return ids, mask, types


def _hf_outputs(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = getattr(out, "prediction_logits", None)
    pair = getattr(out, "seq_relationship_logits", None)
    if pair is None:
        pair = getattr(out, "sop_logits", None)
    return out.hidden_states[-1], logits, pair


def _our_outputs(model, ids, mask, types):
    with torch.no_grad():
        enc = model.encoder if hasattr(model, "encoder") else model
        hidden = enc(ids, mask, types)
        if isinstance(model, EncoderForPreTraining):
            logits, pair = model(ids, mask, types)
        elif isinstance(model, EncoderForMaskedLM):
            logits, pair = model(ids, mask, types), None
        else:
            logits, pair = None, None
    return hidden, logits, pair


def _assert_same(ours, ref, what):
    for name, a, b in zip(("hidden", "logits", "pair logits"), ours, ref):
        assert (a is None) == (b is None), f"{what}: {name} present in one model only"
        if a is not None:
            err = (a - b).abs().max().item()
            assert err < TOL, f"{what}: {name} differ by {err}"


@pytest.mark.parametrize("mt,arch", CASES, ids=[a for _, a in CASES])
def test_hf_parity_and_export(tmp_path, mt, arch):
    torch.manual_seed(0)
    cfg = _hf_config(mt)
    ref = getattr(transformers, arch)(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf_folder(tmp_path / "hf")
    assert ours.config.variant == mt and ours.config.pooler == (arch.endswith("Model") or "PreTraining" in arch)
    x = _inputs(cfg)
    ref_out = _hf_outputs(ref, *x)
    _assert_same(_our_outputs(ours, *x), ref_out, f"{arch} import")

    export_hf(ours, tmp_path / "ours")  # the adapter is found from the config alone
    back = getattr(transformers, arch).from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == arch
    _assert_same(_hf_outputs(back, *x), ref_out, f"{arch} export")


def test_mlm_decoder_is_tied_and_roundtrips_through_polymodal_folder(tmp_path):
    cfg = EncoderConfig.from_preset("tiny-bert", task="pretraining")
    model = EncoderForPreTraining(cfg).eval()
    assert model.mlm.decoder.weight is model.encoder.embeddings.word.weight
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.mlm.decoder.weight is back.encoder.embeddings.word.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        for a, b in zip(model(ids), back(ids)):
            torch.testing.assert_close(a, b)


def test_albert_shares_one_layer():
    torch.manual_seed(0)
    ours = Encoder(EncoderConfig.from_preset("tiny-albert"))
    assert len(ours.blocks) == 1 and ours.layer(0) is ours.layer(ours.config.n_layer - 1)
    # Same parameter count as transformers' AlbertModel with the same shapes.
    ref = transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, embedding_size=16))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # A gradient step through three applications lands on the one set of weights.
    ids = torch.randint(0, 128, (2, 6))
    ours(ids).sum().backward()
    assert ours.blocks[0].attn.qkv.weight.grad is not None


def test_albert_unsupported_groups_error(tmp_path):
    cfg = _hf_config("albert")
    cfg.num_hidden_groups = 3
    transformers.AlbertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_hidden_groups=3"):
        load_hf_folder(tmp_path)


def test_unknown_architecture_and_relative_positions_error(tmp_path):
    transformers.BertForMultipleChoice(_hf_config("bert")).save_pretrained(tmp_path / "cls")
    with pytest.raises(CheckpointError, match="BertForMultipleChoice"):
        load_hf_folder(tmp_path / "cls")
    cfg = _hf_config("bert")
    cfg.position_embedding_type = "relative_key"
    transformers.BertModel(cfg).save_pretrained(tmp_path / "rel")
    with pytest.raises(CheckpointError, match="position_embedding_type"):
        load_hf_folder(tmp_path / "rel")


def test_roberta_positions_follow_padding_idx():
    model = Encoder(EncoderConfig.from_preset("tiny-roberta"))
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])  # <s> a b </s> <pad> <pad>
    assert model.embeddings.position_ids(ids).tolist() == [[2, 3, 4, 5, 1, 1]]


def test_unpadded_mask_is_the_fast_path_and_padding_is_ignored():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_preset("tiny-bert")).eval()
    ids = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        h = model(ids)
        torch.testing.assert_close(model(ids, torch.ones_like(ids)), h)
        padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        mask = torch.tensor([[1] * 5 + [0] * 3])
        hp = model(padded, mask)
    torch.testing.assert_close(hp[:, :5], h, atol=1e-5, rtol=1e-5)
    # Pooling over real tokens only gives the unpadded sentence's embedding.
    torch.testing.assert_close(normalize(mean_pool(hp, mask)), normalize(h.mean(1)), atol=1e-5, rtol=1e-5)


def test_sentence_encoder_order_and_batching():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("a b c d e f g h".split())}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_preset("tiny-bert")).eval()
    se = SentenceEncoder(model, tok)
    texts = ["a b c d e f", "g", "h a", "b c d"]
    batched = se.encode(texts, batch_size=2, workers=2)  # two batches on two worker threads
    assert torch.equal(batched, se.encode(texts, batch_size=2, workers=1))
    one_by_one = torch.stack([se.encode(t) for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the first text alone, by hand: [CLS]-free ids, mean over all tokens
        ids = torch.tensor([tok.encode(texts[0]).ids])
        torch.testing.assert_close(batched[0], normalize(model(ids).mean(1))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4))
