"""k-shot classification by label likelihood (polymodal.eval.fewshot, GPT-3 sec. 2.4).

The batched scorer (left padding, shared-prefix KV cache, single-token shortcut) must equal a direct,
unbatched sum of log-softmax over the concatenated prompt + candidate, on tiny random GPTs; one
small real-weight check runs SmolLM2-135M-Instruct on hand-written, clearly-worded reviews.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.eval.fewshot import (build_prompt, fewshot_classify, format_table, label_likelihood_scores,
                                    pick_demos)
from polymodal.models.gpt import GPT, GPTConfig
from polymodal.tokenizers import train_char_tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,:!\n"


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer(CHARS)


def _model(preset: str, vocab: int) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset(preset, vocab_size=vocab, block_size=256, dropout=0.0))
    return m.eval()


def _direct(model, tok, prompt: str, cand: str) -> float:
    """Reference: one unpadded sequence, sum of log P(candidate token | everything before it)."""
    p, c = tok.encode(prompt), tok.encode(cand)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).double(), -1)[0]
    return float(sum(logp[len(p) - 1 + j, c[j]] for j in range(len(c))))


PROMPTS = [  # different lengths so batches are left-padded; a shared prefix like k demos
    "review: good film.\nsentiment: positive\n\nreview: a dull mess\nsentiment:",
    "review: good film.\nsentiment: positive\n\nreview: fun\nsentiment:",
    "review: good film.\nsentiment: positive\n\nreview: i loved every minute of it, truly!\nsentiment:",
]


@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("cands", [[" positive", " negative", " ok"], [" a", " b"]])  # multi- / single-token
def test_scores_match_direct_computation(tok, preset, share_prefix, cands):
    model = _model(preset, tok.vocab_size)
    got = label_likelihood_scores(model, tok, PROMPTS, cands, batch_size=2, share_prefix=share_prefix)
    want = torch.tensor([[_direct(model, tok, p, c) for c in cands] for p in PROMPTS], dtype=torch.float64)
    assert got.shape == (len(PROMPTS), len(cands))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # length normalisation divides by the candidate's token / character count
    tn = label_likelihood_scores(model, tok, PROMPTS, cands, batch_size=3, normalize="token", share_prefix=share_prefix)
    lens = torch.tensor([len(tok.encode(c)) for c in cands], dtype=torch.float64)
    torch.testing.assert_close(tn.double(), want / lens, atol=1e-5, rtol=0)


def test_padding_does_not_change_scores(tok):
    """A prompt scored alone and inside a left-padded batch with longer prompts gets the same scores."""
    model = _model("nano-llama", tok.vocab_size)
    cands = [" positive", " negative"]
    alone = label_likelihood_scores(model, tok, PROMPTS[1:2], cands, batch_size=1, share_prefix=False)
    batched = label_likelihood_scores(model, tok, PROMPTS, cands, batch_size=8, share_prefix=False)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=0)


def test_bad_inputs(tok):
    model = _model("nano", tok.vocab_size)
    with pytest.raises(ValueError, match="normalize"):
        label_likelihood_scores(model, tok, PROMPTS, [" a"], normalize="mean")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        label_likelihood_scores(model, tok, PROMPTS, [""])
    with pytest.raises(ValueError, match="template"):
        build_prompt([], "x", template="{text} -> ")


def test_build_prompt():
    p = build_prompt([("a gorgeous film", "positive"), ("dull", "negative")], "so so")
    assert p == ("Review: a gorgeous film\nSentiment: positive\n\nReview: dull\nSentiment: negative"
                 "\n\nReview: so so\nSentiment:")
    assert build_prompt([], "x") == "Review: x\nSentiment:"  # zero-shot: the query alone
    assert build_prompt([("t", "yes")], "q", template="Q: {text}\nA:{label}", separator="\n") == "Q: t\nA: yes\nQ: q\nA:"


@dataclasses.dataclass
class Ex:
    text_a: str
    label: int


def test_pick_demos_balanced_and_seeded():
    pool = [Ex(f"s{i}", i % 2) for i in range(40)]
    d8 = pick_demos(pool, 8, 2, seed=3)
    assert sorted(e.label for e in d8) == [0] * 4 + [1] * 4
    assert len({e.text_a for e in d8}) == 8
    assert [e.text_a for e in pick_demos(pool, 8, 2, seed=3)] == [e.text_a for e in d8]  # seeded
    assert [e.text_a for e in pick_demos(pool, 8, 2, seed=4)] != [e.text_a for e in d8]
    assert len(pick_demos(pool, 1, 2, seed=0)) == 1 and pick_demos(pool, 0, 2, seed=0) == []
    with pytest.raises(ValueError, match="label 0"):
        pick_demos([Ex("a", 0), Ex("b", 1)], 4, 2, seed=0)


POS = ["i loved this movie, it was wonderful.", "a brilliant, beautiful and moving film.",
       "great acting and a great story. highly recommended.", "this is one of the best films of the year.",
       "an absolute delight from start to finish.", "funny, warm and wonderful.",
       "a masterpiece. i enjoyed every minute.", "excellent, charming and smart."]
NEG = ["i hated this movie, it was awful.", "a boring, ugly and stupid film.",
       "terrible acting and a terrible story. avoid it.", "this is one of the worst films of the year.",
       "an absolute mess from start to finish.", "dull, cold and painful.",
       "a disaster. i regretted every minute.", "bad, tedious and dumb."]
DEMOS = [Ex("a wonderful, touching film.", 1), Ex("a dreadful waste of time.", 0),
         Ex("what a waste. awful and boring.", 0), Ex("great fun, i loved it.", 1)]


def test_smollm2_fewshot_above_chance():
    """k=4 on 16 unambiguous hand-written reviews (8 each): the real model must get at least 12 right.
    Chance is 8/16, and a model stuck on one label also gets 8, so this fails if scoring is broken
    (wrong positions, padding leaking, candidates swapped)."""
    import polymodal

    try:
        model, tok = polymodal.load()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model.eval()
    val = [Ex(t, 1) for t in POS] + [Ex(t, 0) for t in NEG]
    r = fewshot_classify(model, tok, "sst2", k=4, seed=0, n_eval=None, train=DEMOS, val=val, batch_size=16)
    assert r["n"] == 16 and r["majority"] == 0.5
    assert r["accuracy"] >= 0.75, r
    assert "accuracy" in format_table([r])
