"""Encoder-decoder (T5 / BART): HF parity both ways, cached decoding, beam search, objectives.

Budget: < 60 s on 2 shared CPU cores (tiny models only; transformers is the reference).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polymodal.interop.hf import export_hf, load_hf_folder
from polymodal.models.registry import load_model, save_model
from polymodal.models.seq2seq import (
    Seq2Seq, Seq2SeqConfig, span_corrupt, span_restore, text_infill,
)
from polymodal.generate.seq2seq import _DecoderLM, generate_seq2seq
from polymodal.nn import RelativePositionBias, relative_position_bucket, set_attention_impl

transformers = pytest.importorskip("transformers")

V = 96


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind in ("t5-relu", "t5-gated"):
        gated = kind == "t5-gated"
        cfg = transformers.T5Config(
            # asymmetric stacks for v1.0 (transformers 5.24's generate() cache breaks on them, see below)
            vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2 if gated else 3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
            decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40, dropout=0.0,
        scale_embedding=True)
    m = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        m.final_logits_bias.normal_()  # zeros by default: give the mapping something to get wrong
    return m


def _batch(pad: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0  # right-padded sources of different lengths
    am[2, 3:] = 0
    ids = ids.masked_fill(am == 0, pad)
    dec = torch.randint(3, V, (3, 7), generator=g)
    return ids, am, dec


def _tiny(preset: str, **kw) -> Seq2Seq:
    torch.manual_seed(0)
    extra = {"block_size": 64} if preset.startswith("bart") else {}
    c = Seq2SeqConfig.from_preset(preset, vocab_size=V, n_embd=32, n_head=4, head_dim=8, intermediate_size=40,
                                  n_layer=2, n_decoder_layer=3, dropout=0.0, **{**extra, **kw})
    m = Seq2Seq(c).eval()
    with torch.no_grad():  # larger weights than the init, so greedy outputs are varied, not one token
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        if m.final_logits_bias is not None:
            m.final_logits_bias.normal_()
    return m


# -- relative position bias ---------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_dist", [(32, 128), (8, 16)])
def test_relative_bucket_matches_t5(bidirectional, buckets, max_dist):
    r = torch.arange(-300, 301)[None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        r, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_dist)
    got = relative_position_bucket(r, bidirectional, buckets, max_dist)
    assert torch.equal(got, ref)
    assert int(got.max()) < buckets


def test_relative_bias_for_cached_queries_is_a_slice():
    rb = RelativePositionBias(4, 8, 16, bidirectional=False)
    full = rb(9)
    assert full.shape == (1, 4, 9, 9)
    assert torch.equal(rb(2, start=5), full[:, :, 5:7, :7])


# -- Hugging Face parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["t5-relu", "t5-gated", "bart"])
def test_hf_checkpoint_loads_with_equal_logits_and_exports_back(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_folder(tmp_path / "hf")
    ids, am, dec = _batch(hf.config.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        got = ours(ids, am, dec)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    export_hf(ours, tmp_path / "export")
    back = type(hf).from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits, ref,
                                   atol=1e-4, rtol=0)

    save_model(ours, tmp_path / "ours")  # our own checkpoint folder round-trips too
    again = load_model(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, am, dec), got, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["t5-gated", "bart"])
def test_greedy_and_beam_outputs_match_transformers_generate(kind, tmp_path):
    """The whole decoding path (encoder once, cross-K/V cache, the shared sampler and beam search)
    against ``transformers``' ``generate``. (The v1.0 model has 2 encoder / 3 decoder layers, which
    transformers 5.24's generate() cannot run: its cache is sized by num_layers.)"""
    hf = _hf_model(kind)
    with torch.no_grad():  # larger weights: varied tokens instead of one repeated id
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    ours = load_hf_folder(tmp_path)
    ids, am, _ = _batch(hf.config.pad_token_id)
    eos = hf.config.eos_token_id

    def strip(row):  # HF rows: [start, tokens..., eos, pad...]; ours: the tokens
        row = row[1:]
        return row[: row.index(eos)] if eos in row else row

    for nb in (1, 3):
        ref = hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, num_beams=nb,
                          length_penalty=1.0, forced_eos_token_id=None, forced_bos_token_id=None)
        got = generate_seq2seq(ours, ids, am, max_new_tokens=8, num_beams=nb, do_sample=False, length_penalty=1.0)
        assert got == [strip(r) for r in ref.tolist()], nb


@pytest.mark.parametrize("preset,hf_cls", [("t5-v1_1-tiny", "T5ForConditionalGeneration"),
                                           ("bart-tiny", "BartForConditionalGeneration")])
def test_our_model_exports_to_transformers(preset, hf_cls, tmp_path):
    """Our own initialisation (v1.1: an untied head that differs from the embedding)."""
    m = _tiny(preset)
    assert m.config.tie_embeddings == (preset == "bart-tiny")
    export_hf(m, tmp_path)
    hf = getattr(transformers, hf_cls).from_pretrained(tmp_path).eval()
    ids, am, dec = _batch(m.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits,
                                   m(ids, am, dec), atol=1e-4, rtol=0)


# -- decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["t5-tiny", "t5-v1_1-tiny", "bart-tiny"])
def test_cached_decoding_equals_uncached(preset):
    m = _tiny(preset)
    ids, am, dec = _batch(m.config.pad_token_id)
    with torch.no_grad():
        full = m(ids, am, dec)
        memory = m.encode(ids, am)
        cache = m.new_cache(3, 10)
        steps = [m.decode(dec[:, :3], memory, am, cache)]  # a 3-token prefill, then one token a step
        steps += [m.decode(dec[:, t:t + 1], None, am, cache) for t in range(3, dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    set_attention_impl(m, "reference")  # the explicit softmax path (masks + T5 bias) agrees with SDPA
    with torch.no_grad():
        torch.testing.assert_close(m(ids, am, dec), full, atol=1e-4, rtol=0)
    set_attention_impl(m, "sdpa")

    # A random model tends to repeat one token; the repetition penalty (part of the shared sampler)
    # makes the path depend on the whole logit ranking at every step.
    kw = dict(max_new_tokens=8, eos_token_id=[], repetition_penalty=1.5)
    greedy = generate_seq2seq(m, ids, am, do_sample=False, **kw)
    assert greedy == generate_seq2seq(m, ids, am, do_sample=False, use_cache=False, **kw)
    assert any(len(set(row)) > 2 for row in greedy), greedy  # not a degenerate constant output
    beams = generate_seq2seq(m, ids, am, num_beams=3, no_repeat_ngram_size=2, **kw)
    assert beams == generate_seq2seq(m, ids, am, num_beams=3, no_repeat_ngram_size=2, use_cache=False, **kw)
    for row in beams:  # no_repeat_ngram_size=2 holds on every output (the start token is in the prefix)
        seq = [m.config.decoder_start_token_id] + row
        pairs = list(zip(seq, seq[1:]))
        assert len(pairs) == len(set(pairs))


def test_cross_attention_kv_computed_once_per_sequence():
    m = _tiny("t5-tiny")
    ids, am, _ = _batch(0)
    calls = []
    hooks = [blk.cross_attn.kv.register_forward_hook(lambda *a: calls.append(1)) for blk in m.decoder.blocks]
    try:
        generate_seq2seq(m, ids, am, max_new_tokens=6, do_sample=False, eos_token_id=[])
        assert len(calls) == len(m.decoder.blocks)  # once per layer, not once per step
        calls.clear()
        generate_seq2seq(m, ids, am, max_new_tokens=6, num_beams=2, eos_token_id=[])
        assert len(calls) == len(m.decoder.blocks)
    finally:
        for h in hooks:
            h.remove()


def _run_beam(model, src, am, nb, **kw):
    """Beam search with ``nb`` beams through the generation helper's own beam loop."""
    from polymodal.generate.decode import _Run, _run_defaults

    c = model.config
    with torch.inference_mode():
        memory = model.encode(src, am)
    mk = {"memory": memory} if am is None else {"memory": memory, "memory_mask": am}
    r = _Run(_DecoderLM(model), [[c.decoder_start_token_id]] * src.shape[0], max_new_tokens=kw.pop("max_new_tokens"),
             **_run_defaults({"num_beams": nb, "do_sample": False, "model_kwargs": mk,
                              "pad_token_id": c.pad_token_id, **kw}))
    with torch.inference_mode():
        return r.beam()


def test_beam_size_one_equals_greedy():
    m = _tiny("t5-v1_1-tiny")
    ids, am, _ = _batch(0)
    greedy = generate_seq2seq(m, ids, am, max_new_tokens=8, do_sample=False, eos_token_id=[])
    for lp in (0.0, 1.0, 2.0):  # without EOS, one beam is the argmax path for every length penalty
        assert _run_beam(m, ids, am, 1, max_new_tokens=8, eos_token_id=[], length_penalty=lp) == greedy
    # with EOS and length_penalty=0 a finished hypothesis can never be beaten by its continuation
    i = next(i for i in range(1, 8) if greedy[0][i] not in greedy[0][:i])  # a token new to row 0 as EOS
    eos = greedy[0][i]
    greedy_eos = generate_seq2seq(m, ids, am, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    assert greedy_eos[0] == greedy[0][:i]
    assert _run_beam(m, ids, am, 1, max_new_tokens=8, eos_token_id=eos, length_penalty=0.0) == greedy_eos


class _Scripted(nn.Module):
    """A seq2seq 'model' whose next-token distribution depends only on the last token:

        start -> A .5 | B .5;  A -> EOS .6 | D .4;  D -> EOS;  B -> C .7 | EOS .3;
        C -> E .7 | EOS .3;  E -> EOS .7 | G .3;  G -> EOS

    Finished hypotheses (sum log p, length n counting EOS): [A] (-1.20, 2), [A D] (-1.61, 3),
    [B C E] (-1.76, 4), [B C E G] (-2.61, 5). Score = sum / n ** length_penalty."""

    START, EOS, A, B, C, D, E, G = range(8)

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = Seq2SeqConfig(vocab_size=8, n_embd=4, n_head=1, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0)
        s = self
        table = torch.full((8, 8), 0.0)
        for src, nxt in {s.START: {s.A: .5, s.B: .5}, s.A: {s.EOS: .6, s.D: .4}, s.D: {s.EOS: 1.0},
                         s.B: {s.C: .7, s.EOS: .3}, s.C: {s.E: .7, s.EOS: .3}, s.E: {s.EOS: .7, s.G: .3},
                         s.G: {s.EOS: 1.0}, s.EOS: {s.EOS: 1.0}}.items():
            for t, p in nxt.items():
                table[src, t] = p
        self.register_buffer("logp", table.log())

    def encode(self, input_ids, attention_mask=None):
        return torch.zeros(input_ids.shape[0], 1, 4)

    def new_cache(self, batch_size, max_len=None):
        class _C:
            def reorder(self, index):
                pass
        return _C()

    def decode(self, ids, memory, memory_mask=None, cache=None, last_only=False):
        return self.logp[ids[:, -1:]]


def test_length_penalty_prefers_longer_hypotheses_as_documented():
    m = _Scripted()
    src = torch.zeros(1, 3, dtype=torch.long)
    out = {lp: generate_seq2seq(m, src, max_new_tokens=6, num_beams=2, length_penalty=lp)[0] for lp in (0.0, 1.0, 2.0)}
    assert out[0.0] == [m.A]  # plain sum: the most probable sequence, which is short
    assert out[1.0] == [m.B, m.C, m.E]  # -1.76/4 > -1.61/3 > -1.20/2
    assert out[2.0] == [m.B, m.C, m.E, m.G]  # -2.61/25 > -1.76/16
    assert math.isclose(math.log(.5 * .7 * .7 * .7), -1.763, abs_tol=1e-3)
    assert generate_seq2seq(m, src, max_new_tokens=6, do_sample=False)[0] == [m.A]  # greedy: argmax per step


# -- training signal -----------------------------------------------------------------------------------

def test_loss_goes_down_on_a_copy_task():
    torch.manual_seed(0)
    c = Seq2SeqConfig.from_preset("t5-tiny", vocab_size=20, n_embd=32, n_head=4, head_dim=8, intermediate_size=64,
                                  n_layer=1, dropout=0.0)
    m = Seq2Seq(c)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 20, (8, 5), generator=g)
    labels = torch.cat([x, torch.full((8, 1), c.eos_token_id)], 1)
    losses = []
    for _ in range(20):
        loss = m.loss(x, None, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::4]


def test_decode_errors_are_clear():
    m = _tiny("bart-tiny")
    with pytest.raises(ValueError, match="memory"):
        m.decode(torch.zeros(1, 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="learned positions"):
        m.encode(torch.zeros(1, 65, dtype=torch.long))
    from polymodal.generate import generate
    with pytest.raises(ValueError, match="generate_seq2seq"):
        generate(m, [[2, 5]], max_new_tokens=2)


# -- objectives -----------------------------------------------------------------------------------------

SENTINELS = [199 - i for i in range(20)]


def test_span_corruption_format_and_restore():
    ids = list(range(3, 43))  # 40 distinct tokens
    g = torch.Generator().manual_seed(0)
    inputs, targets = span_corrupt(ids, 0.15, 3, SENTINELS, g, eos_id=1)
    assert inputs[-1] == targets[-1] == 1
    in_s = [t for t in inputs if t in SENTINELS]
    tg_s = [t for t in targets if t in SENTINELS]
    k = round(round(40 * 0.15) / 3)  # 6 noise tokens in 2 spans
    assert in_s == SENTINELS[:k] and tg_s == SENTINELS[:k + 1]
    assert targets[0] == SENTINELS[0] and targets[-2] == SENTINELS[k]
    assert len(targets) - (k + 1) - 1 == round(40 * 0.15)  # every dropped token is in the targets once
    kept = [t for t in inputs[:-1] if t not in SENTINELS]
    assert kept == [t for t in ids if t not in targets]  # the rest stays in order
    assert span_restore(inputs, targets, SENTINELS, eos_id=1) == ids
    assert (inputs, targets) == span_corrupt(ids, 0.15, 3, SENTINELS, torch.Generator().manual_seed(0), eos_id=1)
    for seed in range(20):  # random lengths, always invertible
        n = 5 + seed * 3
        inp, tgt = span_corrupt(list(range(3, 3 + n)), 0.3, 2, SENTINELS, torch.Generator().manual_seed(seed))
        assert span_restore(inp, tgt, SENTINELS) == list(range(3, 3 + n))
    with pytest.raises(ValueError, match="sentinel"):
        span_corrupt(ids, 0.5, 1, SENTINELS[:3])


def test_text_infilling_format_and_reconstruction():
    mask = 2
    ids = list(range(3, 103))
    all_lengths = []
    for seed in range(60):
        inputs, targets, spans = text_infill(ids, mask, 0.3, 3.0, torch.Generator().manual_seed(seed))
        assert targets == ids
        assert inputs.count(mask) == len(spans)
        assert sum(ln for _, ln in spans) == 30  # round(100 * 0.3) tokens removed
        assert all(not (a == b == mask) for a, b in zip(inputs, inputs[1:]))  # one mask per span, never adjacent
        # reconstruct: each mask -> its span of the original
        rebuilt, it = [], iter(spans)
        for t in inputs:
            if t == mask:
                s, ln = next(it)
                rebuilt += ids[s:s + ln]
            else:
                rebuilt.append(t)
        assert rebuilt == ids
        all_lengths += [ln for _, ln in spans]
    # Span lengths are Poisson(3); the last span of each draw is trimmed to the budget, which pulls
    # the mean a little below 3 (30 tokens in ~10.5 spans).
    mean = sum(all_lengths) / len(all_lengths)
    assert 2.4 < mean < 3.3, mean
    assert 0 in all_lengths  # zero-length spans: a mask inserted where nothing was removed


# -- commands ---------------------------------------------------------------------------------------------

def test_train_translate_summarize_commands(tmp_path):
    import json

    from polymodal.commands.seq2seq import summarize, train_seq2seq, translate
    from polymodal.data.pairs import read_pairs

    words = "the a dog cat runs sits on mat red blue big small man woman sees".split()
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(0, len(words), (5,), generator=g).tolist()) for _ in range(80)]
    lex = {w: w.upper() for w in words}  # a word-for-word "translation"
    data = tmp_path / "data"
    data.mkdir()
    for split, part in (("train", rows[:64]), ("val", rows[64:])):
        (data / f"{split}.en").write_text("\n".join(part) + "\n", encoding="utf-8")
        (data / f"{split}.de").write_text("\n".join(" ".join(lex[w] for w in r.split()) for r in part) + "\n",
                                          encoding="utf-8")
    assert len(read_pairs(data, "translate", "val")) == 16
    res = train_seq2seq(str(data), out=str(tmp_path / "run"), vocab_size=60, n_layer=1, n_embd=32, n_head=4,
                        batch_size=16, max_steps=16, lr=8e-3, warmup=2, eval_every=8, dropout=0.0, threads=1,
                        score=4, num_beams=2)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [8, 16]
    vocab = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["vocab_size"]
    assert res["best"] < 0.8 * math.log(vocab)  # well below a uniform guess over the vocabulary
    assert set(res["scores"]) == {"bleu", "chrf"}
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["n"] == 4

    # the run folder itself resolves to its best model (polymodal.interop.resolve_model_path)
    out = translate(str(tmp_path / "run"), str(data / "val.en"), str(tmp_path / "hyp.de"), num_beams=2,
                    max_new_tokens=8, device="cpu")
    assert len(open(out, encoding="utf-8").read().splitlines()) == 16

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"article": r, "summary": r}) for r in rows[:3]) + "\n")
    out = summarize(res["model"], str(jsonl), str(tmp_path / "sum.txt"), num_beams=1, max_new_tokens=6, device="cpu")
    assert len(open(out, encoding="utf-8").read().splitlines()) == 3
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not a JSON object with an 'article' field"):
        (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
        summarize(res["model"], str(tmp_path / "bad.jsonl"), str(tmp_path / "x.txt"))
