"""Generation: the sampler's formulas and order, KV-cached vs recomputed decoding,
left-padded batches, EOS / stop strings, seeds, streaming and beam search (checked
against an exhaustive search). Tiny random models only; budget < 60 s on 2 CPU cores."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from polymodal import GPT, GPTConfig
from polymodal.generate import LogitsProcessor, SamplingParams, generate, generate_text, stream, stream_text
from polymodal.generate import decode as decode_mod
from polymodal.generate.sampler import (apply_frequency_presence, apply_min_p, apply_repetition_penalty,
                                        apply_temperature, apply_top_k, apply_top_p, sample_from_logits)

NEG = float("-inf")


def tiny(preset: str = "nano", seed: int = 0, **kw) -> GPT:
    """A random model with peaked logits (init_std 0.3), so greedy choices are far from ties."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, init_std=0.3, **kw)).eval()


class FakeTokenizer:
    """Token i decodes to PIECES[i % len]; multi-character pieces exercise stop-string trimming."""

    PIECES = ["a", "b", "c", "ab", "ba", " ", "x", "yz", "\n", "q"]
    eos_id = None
    bos_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i % len(self.PIECES)] for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [self.PIECES.index(ch) for ch in text]


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


# -- sampler: each processor does what its formula says -------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative():
    z = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(z, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_frequency_presence_penalty_formula():
    z = torch.zeros(1, 3)
    counts = torch.tensor([[2, 0, 1]])
    out = apply_frequency_presence(z, counts, frequency=0.5, presence=1.0)
    assert torch.allclose(out, torch.tensor([[-(0.5 * 2 + 1.0), 0.0, -(0.5 * 1 + 1.0)]]))


def test_temperature_scales_logits():
    z = torch.tensor([[1.0, 2.0, -4.0]])
    assert torch.allclose(apply_temperature(z, 0.5), z * 2)


def test_top_k_keeps_k_and_ties_at_boundary():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert kept(apply_top_k(z, 2)) == [0, 1]
    assert kept(apply_top_k(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), 2)) == [0, 1, 2]  # tie with k-th kept
    assert kept(apply_top_k(z, 0)) == [0, 1, 2, 3]


def test_top_p_smallest_nucleus_with_ties():
    z = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    assert kept(apply_top_p(z, 0.4)) == [0]           # the top token alone has 0.5 >= 0.4
    assert kept(apply_top_p(z, 0.55)) == [0, 1]       # 0.5 < 0.55 <= 0.8
    # {0, 1, 2} reaches 0.9 >= 0.85; token 3 ties with token 2 at the boundary and is kept too
    assert kept(apply_top_p(z, 0.85)) == [0, 1, 2, 3]
    assert kept(apply_top_p(torch.tensor([[10.0, 0.0, 0.0]]), 1e-6)) == [0]  # top token always kept


def test_min_p_relative_threshold():
    z = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(apply_min_p(z, 0.5)) == [0, 1]   # p >= 0.25
    assert kept(apply_min_p(z, 0.25)) == [0, 1, 2]


def test_processor_order_temperature_before_top_p():
    """softmax(log[.5,.3,.2] / 0.5) = [.66,.24,.11]: the p=0.6 nucleus shrinks from {0,1} to {0}."""
    z = torch.tensor([[0.5, 0.3, 0.2]]).log()
    proc = LogitsProcessor(temperature=0.5, top_p=0.6)
    assert kept(proc(z)) == [0]
    # the other order (top-p on the untempered logits, then temperature) would keep {0, 1}
    assert kept(apply_temperature(apply_top_p(z, 0.6), 0.5)) == [0, 1]


def test_processor_order_penalty_before_top_k_and_matches_composition():
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5]])
    state = {"seen": torch.tensor([[True, False, False, False, False]]), "counts": None}
    proc = LogitsProcessor(repetition_penalty=4.0, top_k=2, temperature=0.7, top_p=0.9, min_p=0.1)
    expected = apply_min_p(apply_top_p(apply_top_k(apply_temperature(
        apply_repetition_penalty(z, state["seen"], 4.0), 0.7), 2), 0.9), 0.1)
    out = proc(z, state)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    assert torch.allclose(out[torch.isfinite(out)], expected[torch.isfinite(expected)])
    assert kept(out)[0] == 1  # token 0 was penalised (4 -> 1) out of the top-2 before top-k ran


def test_greedy_is_argmax_after_penalties():
    z = torch.tensor([[4.0, 3.0, 2.0]])
    proc = LogitsProcessor(do_sample=False, repetition_penalty=2.0, temperature=0.1, top_k=1)
    state = {"seen": torch.tensor([[True, False, False]]), "counts": None}
    assert proc.next_token(z, state).tolist() == [1]
    assert LogitsProcessor(temperature=0.0).params.do_sample is False  # T = 0 means greedy


def test_sampling_frequencies_match_softmax_and_respect_filter():
    torch.manual_seed(0)
    z = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(123)
    freq = torch.bincount(sample_from_logits(z, g), minlength=4).float() / z.shape[0]
    assert torch.allclose(freq, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.015)
    filtered = apply_top_k(z, 2)
    assert set(sample_from_logits(filtered, g).tolist()) == {0, 1}


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


# -- KV cache vs full recomputation ----------------------------------------------------------------

@pytest.mark.parametrize("preset", ["nano", "nano-llama", "nano-gpt3"])
def test_cached_logits_equal_recomputed_left_padded_batch(preset):
    """Decoding 12 tokens (past nano-gpt3's local window of 8) with a cache gives the logits of
    a full forward over the unpadded sequence of each row, to 1e-4."""
    model = tiny(preset)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 4]]
    new = torch.randint(0, 65, (3, 12), generator=torch.Generator().manual_seed(0))
    ids, mask = decode_mod._left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        cache = model.new_cache(3, ids.shape[1] + 12)
        steps = [model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]]
        for j in range(11):
            steps.append(model(new[:, j:j + 1], cache=cache, last_only=True)[:, -1])
        for i, p in enumerate(prompts):
            full = model(torch.tensor([p + new[i, :11].tolist()]))[0]
            ref = full[len(p) - 1:]
            got = torch.stack([s[i] for s in steps])
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["nano", "nano-llama", "nano-gpt3"])
def test_greedy_cached_equals_uncached_and_rows_equal_alone(preset):
    model = tiny(preset)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 4]]
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=[])
    cached = generate(model, prompts, **kw)
    assert cached == generate(model, prompts, use_cache=False, **kw)
    assert cached == [generate(model, [p], **kw)[0] for p in prompts]
    assert all(len(r) == 12 for r in cached)
    assert generate(model, torch.tensor(prompts[0]), **kw)[0] == cached[0]  # 1-D tensor input


def test_eos_stops_each_row_and_is_excluded():
    model = tiny()
    prompts = [[1, 2, 3, 4], [7, 7]]
    free = generate(model, prompts, max_new_tokens=12, do_sample=False, eos_token_id=[])
    eos = free[0][3]  # a token the first row produces at step 3
    out = generate(model, prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    for row_free, row in zip(free, out):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row == row_free[:cut]
    assert len(out[0]) <= 3


def test_context_limit_error_and_truncation():
    model = tiny()  # block_size 64
    prompt = list(range(1, 61))
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [prompt], max_new_tokens=10, do_sample=False)
    out = generate(model, [prompt], max_new_tokens=10, do_sample=False, truncate=True, eos_token_id=[])
    assert out == generate(model, [prompt[-54:]], max_new_tokens=10, do_sample=False, eos_token_id=[])


def test_penalties_are_applied_in_the_loop():
    model = tiny()
    greedy = generate(model, [[5, 6]], max_new_tokens=15, do_sample=False, eos_token_id=[])[0]
    assert len(set(greedy)) < len(greedy)  # the random model repeats itself...
    out = generate(model, [[5, 6]], max_new_tokens=15, do_sample=False, eos_token_id=[], frequency_penalty=1e4)[0]
    assert len(set(out)) == len(out)        # ...and a huge frequency penalty forbids any repeat


def test_no_repeat_ngram():
    model = tiny()
    prompt = [5, 6, 7]
    free = generate(model, [prompt], max_new_tokens=20, do_sample=False, eos_token_id=[])[0]

    def bigrams(s):
        return [tuple(s[i:i + 2]) for i in range(len(s) - 1)]
    assert len(set(bigrams(prompt + free))) < len(bigrams(prompt + free))
    out = generate(model, [prompt], max_new_tokens=20, do_sample=False, eos_token_id=[], no_repeat_ngram_size=2)[0]
    seq = prompt + out
    assert len(set(bigrams(seq))) == len(bigrams(seq))


# -- seeds, streaming, stop strings ----------------------------------------------------------------

def test_seed_reproduces_sampling_and_batch_rows_are_independent_of_cache_path():
    model = tiny()
    kw = dict(max_new_tokens=15, temperature=1.5, top_k=20, eos_token_id=[])
    a = generate(model, [[1, 2], [3]], seed=7, **kw)
    assert a == generate(model, [[1, 2], [3]], seed=7, **kw)
    assert a == generate(model, [[1, 2], [3]], seed=7, use_cache=False, **kw)
    assert a != generate(model, [[1, 2], [3]], seed=8, **kw)


def test_stream_yields_generate_tokens():
    model = tiny()
    for kw in (dict(do_sample=False), dict(seed=3, temperature=1.2, top_p=0.9)):
        assert list(stream(model, [4, 5, 6], max_new_tokens=10, eos_token_id=[], **kw)) == \
            generate(model, [[4, 5, 6]], max_new_tokens=10, eos_token_id=[], **kw)[0]
    with pytest.raises(ValueError, match="one prompt"):
        list(stream(model, [[1], [2]], max_new_tokens=2))


def test_stop_strings_trim_text_and_tokens():
    model, tok = tiny(), FakeTokenizer()
    prompt = "abc"
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=[])
    free_ids = generate(model, [tok.encode(prompt)], **kw)[0]
    free = tok.decode(free_ids)
    stop = free[7:9]  # a string the free-running output contains
    start = free.find(stop)
    text = generate_text(model, tok, prompt, stop=[stop, "never-there"], **kw)
    assert text == free[:start]
    ids = generate(model, [tok.encode(prompt)], stop=[stop], tokenizer=tok, **kw)[0]
    assert free[:start].startswith(tok.decode(ids)) and len(ids) <= len(free_ids)
    assert stop not in tok.decode(ids)
    assert list(stream(model, tok.encode(prompt), stop=[stop], tokenizer=tok, **kw)) == ids
    streamed = list(stream_text(model, tok, prompt, stop=[stop], **kw))
    assert "".join(streamed) == free[:start]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1]], max_new_tokens=2, stop=["x"])


# -- beam search -----------------------------------------------------------------------------------

def _run(model, prompts, max_new_tokens, **kw):
    return decode_mod._Run(model, prompts, max_new_tokens=max_new_tokens, **decode_mod._run_defaults(kw))


def test_beam_width_one_is_greedy():
    model = tiny()
    prompts = [[1, 2, 3], [4]]
    greedy = generate(model, prompts, max_new_tokens=8, do_sample=False, eos_token_id=[])
    with torch.inference_mode():
        beam1 = _run(model, prompts, max_new_tokens=8, num_beams=1, do_sample=False, eos_token_id=[]).beam()
    assert beam1 == greedy


def _all_sequences(vocab, eos, max_len):
    """Every output: body tokens then EOS (length 1..max_len), or max_len body tokens."""
    body = [t for t in range(vocab) if t != eos]
    out = []
    for n in range(1, max_len + 1):
        for prefix in itertools.product(body, repeat=n - 1):
            out += [list(prefix) + [last] for last in [eos] + (body if n == max_len else [])]
    return out


def _sum_logprobs(model, prompt, seqs) -> list[float]:
    """sum_t log p(y_t | prompt, y_<t) of every sequence, in one right-padded forward."""
    width = len(prompt) + max(map(len, seqs))
    ids = torch.tensor([prompt + s + [0] * (width - len(prompt) - len(s)) for s in seqs])
    with torch.no_grad():
        logp = model(ids).log_softmax(-1)
    return [sum(float(logp[r, len(prompt) - 1 + j, t]) for j, t in enumerate(s)) for r, s in enumerate(seqs)]


def test_beam_search_finds_exhaustive_optimum_and_length_penalty_monotone():
    """With num_beams >= every live prefix, beam search is exhaustive: it must return the
    argmax of sum(logp) / n**length_penalty. Raising length_penalty never shortens the answer."""
    vocab, eos, max_len = 4, 3, 4
    model = tiny(vocab_size=vocab, seed=1)
    prompt = [0, 1, 2]
    seqs = _all_sequences(vocab, eos, max_len)
    sums = _sum_logprobs(model, prompt, seqs)
    lengths = []
    for lp in (-2.0, 0.0, 1.0, 3.0):
        kw = dict(max_new_tokens=max_len, num_beams=64, length_penalty=lp, eos_token_id=eos)
        got = generate(model, [prompt], **kw)[0]
        best = max(range(len(seqs)), key=lambda i: sums[i] / len(seqs[i]) ** lp)
        assert got == [t for t in seqs[best] if t != eos], lp
        assert got == generate(model, [prompt], use_cache=False, **kw)[0]
        lengths.append(len(got))
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_beam_search_batched_equals_alone_and_beats_greedy():
    model = tiny()
    prompts = [[1, 2, 3, 4], [9]]
    kw = dict(max_new_tokens=6, num_beams=4, eos_token_id=[], length_penalty=0.0)
    beams = generate(model, prompts, **kw)
    assert beams == [generate(model, [p], **kw)[0] for p in prompts]
    greedy = generate(model, prompts, max_new_tokens=6, do_sample=False, eos_token_id=[])
    for p, b, g in zip(prompts, beams, greedy):
        sb, sg = _sum_logprobs(model, p, [b, g])
        assert sb >= sg - 1e-5


# -- the CLI command ---------------------------------------------------------------------------------

def test_generate_command_streams_the_same_text_as_generate_text(tmp_path, capsys):
    from polymodal.commands.generate import generate_cmd
    from polymodal.models.registry import save_model
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer("hello world, a tiny corpus.\n")
    model = tiny(vocab_size=tok.vocab_size)
    save_model(model, tmp_path / "m", tokenizer=tok)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=5, seed=4)
    expected = generate_text(model, tok, "hello", **kw)
    assert generate_cmd("hello", model=str(tmp_path / "m"), device="cpu", **kw) == expected
    assert capsys.readouterr().out == expected + "\n"
    assert generate_cmd("hello", model=str(tmp_path / "m"), device="cpu", stream=False, **kw) == expected


class _Boosted(torch.nn.Module):
    """A model taking an extra per-row kwarg (like an encoder memory): logits[boost] += 100."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def new_cache(self, batch_size, max_len=None):
        return self.inner.new_cache(batch_size, max_len)

    def forward(self, ids, attention_mask=None, cache=None, last_only=False, boost=None):
        logits = self.inner(ids, attention_mask=attention_mask, cache=cache, last_only=last_only)
        assert boost.shape[0] == ids.shape[0]  # per-row kwargs follow the rows (and beams)
        return logits.scatter_add(-1, boost.view(-1, 1, 1).expand(-1, logits.shape[1], 1),
                                  torch.full((ids.shape[0], logits.shape[1], 1), 100.0))


def test_model_kwargs_reach_every_call_and_follow_beams():
    model = _Boosted(tiny())
    kw = dict(max_new_tokens=5, eos_token_id=[], model_kwargs={"boost": torch.tensor([11, 22])})
    assert generate(model, [[1, 2, 3], [4]], do_sample=False, **kw) == [[11] * 5, [22] * 5]
    assert generate(model, [[1, 2, 3], [4]], num_beams=3, **kw) == [[11] * 5, [22] * 5]
    assert generate(model, [[1, 2, 3], [4]], num_beams=3, use_cache=False, **kw) == [[11] * 5, [22] * 5]


def test_greedy_and_beam_match_transformers_on_left_padded_batch(tmp_path):
    """The same tiny GPT-2 exported to a Hugging Face folder: HF ``generate`` picks the same
    tokens, greedy and with 3 beams, for a left-padded batch."""
    transformers = pytest.importorskip("transformers")
    from polymodal.interop.hf import export_hf

    model = tiny()
    export_hf(model, tmp_path, model_type="gpt2")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8], [3, 3, 4]]
    ids, mask = decode_mod._left_pad(prompts, 0, "cpu")
    for beams in (1, 3):
        ours = generate(model, prompts, max_new_tokens=8, do_sample=False, num_beams=beams, eos_token_id=[])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 num_beams=beams, pad_token_id=0)
        assert ours == theirs[:, ids.shape[1]:].tolist(), beams
