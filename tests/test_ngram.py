"""Interpolated modified Kneser-Ney (polymodal.models.ngram) against a slow textbook re-computation.

The reference below is written independently with tuples, dicts and recursion straight from
Chen & Goodman (1998), interpolated modified KN and its discounts; the library uses sorted numpy tables and vectorised lookups.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from polymodal.models.ngram import (FALLBACK_DISCOUNTS, KneserNeyLM, char_baseline, char_vocab,
                                    encode_chars, modified_kn_discounts)
from polymodal.commands.ngram import ngram_cmd

DATA = Path("/work/shared/data/tiny_shakespeare")


# ----------------------------------------------------------------------------- textbook reference
class TextbookKN:
    """Interpolated modified KN, the slow way: dicts of tuples, one recursive call per order."""

    def __init__(self, corpus: list[int], n: int, V: int):
        self.n, self.V = n, V
        raw = {k: Counter(tuple(corpus[i:i + k]) for i in range(len(corpus) - k + 1))
               for k in range(1, n + 2)}
        self.c = {}
        for k in range(1, n + 1):
            if k == n:
                self.c[k] = dict(raw[k])
            else:  # continuation count: distinct left neighbours u with c(u g) > 0
                left = defaultdict(set)
                for g in raw[k + 1]:
                    left[g[1:]].add(g[0])
                self.c[k] = {g: len(left[g]) for g in raw[k] if len(left[g]) > 0}
        self.D = {}
        for k in range(1, n + 1):
            coc = Counter(self.c[k].values())
            n1, n2, n3, n4 = (coc[r] for r in (1, 2, 3, 4))
            if 0 in (n1, n2, n3, n4):
                self.D[k] = FALLBACK_DISCOUNTS
                continue
            Y = n1 / (n1 + 2 * n2)
            d = (1 - 2 * Y * n2 / n1, 2 - 3 * Y * n3 / n2, 3 - 4 * Y * n4 / n3)
            ok = 0 < d[0] <= 1 and 0 < d[1] <= 2 and 0 < d[2] <= 3
            self.D[k] = d if ok else FALLBACK_DISCOUNTS

    def disc(self, k, c):
        return 0.0 if c == 0 else self.D[k][min(c, 3) - 1]

    def p(self, k: int, h: tuple, w: int) -> float:
        if k == 0:
            return 1.0 / self.V
        follow = {g[-1]: cnt for g, cnt in self.c[k].items() if g[:-1] == h}
        den = sum(follow.values())
        if den == 0:
            return self.p(k - 1, h[1:], w)
        gamma = sum(self.disc(k, cnt) for cnt in follow.values()) / den
        cw = follow.get(w, 0)
        return max(cw - self.disc(k, cw), 0.0) / den + gamma * self.p(k - 1, h[1:], w)

    def prob(self, context, w) -> float:
        h = tuple(context)[max(0, len(context) - (self.n - 1)):] if self.n > 1 else ()
        return self.p(len(h) + 1, h, w)


def _random_corpus(seed: int, length: int, V: int) -> list[int]:
    # A skewed, partly repetitive source so count-of-counts n1..n4 are all non-zero.
    rng = random.Random(seed)
    out = []
    while len(out) < length:
        if rng.random() < 0.3 and len(out) > 5:
            s = rng.randrange(len(out) - 5)
            out.extend(out[s:s + rng.randint(2, 5)])
        else:
            out.append(min(int(rng.expovariate(0.35)), V - 2))  # id V-1 never occurs
    return out[:length]


# ----------------------------------------------------------------------------- tests
def test_discounts_eq26_by_hand():
    counts = np.array([1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [7])
    d, fell = modified_kn_discounts(counts)
    # Y = 10/20 = 0.5; D1 = 1 - 2*.5*5/10; D2 = 2 - 3*.5*3/5; D3+ = 3 - 4*.5*2/3
    assert not fell
    np.testing.assert_allclose(d, (0.5, 1.1, 3 - 4 / 3), rtol=1e-12)
    d, fell = modified_kn_discounts(np.array([1, 1, 2, 3]))  # n4 = 0: the closed form is undefined
    assert fell and d == FALLBACK_DISCOUNTS


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_textbook_on_tiny_corpus(order):
    V = 12
    corpus = _random_corpus(order, 400, V)
    lm = KneserNeyLM(order).fit(corpus, V)
    ref = TextbookKN(corpus, order, V)
    np.testing.assert_allclose(lm.discounts, [ref.D[k] for k in range(1, order + 1)], rtol=1e-12)
    if order >= 2:  # the corpus is rich enough that the closed-form discounts (not the fallback) is exercised
        assert not lm.discount_fallback[-1]
    rng = random.Random(100 + order)
    contexts = [[], corpus[:1], corpus[10:10 + order], [V - 1] * order, [V - 1, 0, 1],
                [rng.randrange(V) for _ in range(order + 3)]]
    contexts += [corpus[i:i + rng.randint(0, order)] for i in rng.sample(range(len(corpus) - order), 8)]
    for ctx in contexts:
        dist = lm.distribution(ctx)
        want = np.array([ref.prob(ctx, w) for w in range(V)])
        np.testing.assert_allclose(dist, want, rtol=1e-12, atol=1e-15, err_msg=f"context {ctx}")
        assert abs(want.sum() - 1) < 1e-12  # the reference itself is a distribution


def test_text_corpus_matches_textbook():
    text = ("the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat; "
            "the cat ran, the dog sat. on the mat the cat sat and sat and sat.")
    chars = char_vocab(text)
    ids = encode_chars(text, chars).tolist()
    V = len(chars) + 1
    lm = KneserNeyLM(3).fit(ids, V)
    ref = TextbookKN(ids, 3, V)
    for ctx_text in ["", "t", "th", "the", " ca", "zz", "at", ". "]:
        ctx = encode_chars(ctx_text, chars).tolist()
        for w in range(V):
            assert lm.prob(ctx, w) == pytest.approx(ref.prob(ctx, w), rel=1e-12, abs=1e-15)


def test_distribution_sums_to_one_everywhere():
    text = (DATA / "train.txt").read_text()[:30000]
    chars = char_vocab(text)
    ids = encode_chars(text, chars)
    V = len(chars) + 1
    lm = KneserNeyLM(5).fit(ids, V)
    rng = np.random.default_rng(0)
    contexts = [[], [0], [V - 1], [V - 1] * 10, list(range(V))]
    contexts += [ids[s:s + L].tolist() for s, L in zip(rng.integers(0, 29000, 40), rng.integers(0, 9, 40))]
    contexts += [rng.integers(0, V, int(L)).tolist() for L in rng.integers(0, 9, 20)]  # mostly unseen
    for ctx in contexts:
        d = lm.distribution(ctx)
        assert d.dtype == np.float64 and d.shape == (V,)
        assert abs(d.sum() - 1.0) < 1e-9, ctx
        assert d.min() > 0, ctx  # uniform interpolation at the bottom: nothing gets zero


def test_cross_entropy_equals_tokenwise_mean():
    train = (DATA / "train.txt").read_text()[:20000]
    val = (DATA / "val.txt").read_text()[:300] + "\u00e9"  # one char unseen in train -> <unk>
    chars = char_vocab(train)
    V = len(chars) + 1
    lm = KneserNeyLM(4).fit(encode_chars(train, chars), V)
    v = encode_chars(val, chars)
    assert v[-1] == V - 1
    slow = [-math.log(lm.prob(v[max(0, i - 3):i].tolist(), int(v[i]))) for i in range(len(v))]
    assert lm.cross_entropy(v) == pytest.approx(np.mean(slow), rel=1e-12)
    assert lm.log_prob(v) == pytest.approx(-np.sum(slow), rel=1e-12)
    assert lm.perplexity(v) == pytest.approx(math.exp(np.mean(slow)), rel=1e-12)
    # prob() agrees with distribution() for the same context
    for i in (0, 2, 50, len(v) - 1):
        ctx = v[max(0, i - 3):i].tolist()
        assert lm.prob(ctx, int(v[i])) == pytest.approx(lm.distribution(ctx)[v[i]], rel=1e-12)


def test_higher_order_lowers_val_cross_entropy():
    train = (DATA / "train.txt").read_text()[:120000]
    val = (DATA / "val.txt").read_text()[:20000]
    ce = [char_baseline(train, val, order=o)["cross_entropy"] for o in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(ce, ce[1:])), ce
    assert ce[0] < math.log(len(char_vocab(train)) + 1)  # unigram beats uniform


def test_save_load_round_trip(tmp_path):
    V = 8
    corpus = _random_corpus(7, 500, V)
    lm = KneserNeyLM(3).fit(corpus, V)
    path = tmp_path / "kn.npz"
    lm.save(path)
    lm2 = KneserNeyLM.load(path)
    assert (lm2.order, lm2.vocab_size, lm2.discounts) == (lm.order, lm.vocab_size, lm.discounts)
    held = _random_corpus(8, 200, V)
    assert lm2.cross_entropy(held) == lm.cross_entropy(held)
    for ctx in ([], [1], [2, 3], [V - 1, V - 1]):
        np.testing.assert_array_equal(lm2.distribution(ctx), lm.distribution(ctx))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        KneserNeyLM.load(bad)


def test_bad_input_errors():
    lm = KneserNeyLM(3)
    with pytest.raises(RuntimeError, match="fit"):
        lm.distribution([1])
    lm.fit([0, 1, 2, 1, 0], 3)
    with pytest.raises(ValueError, match="token id 5"):
        lm.distribution([5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.cross_entropy([0, 3])
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(0)


def test_ngram_cli(tmp_path, capsys):
    from polymodal.cli import run_command
    train = tmp_path / "train.txt"
    val = tmp_path / "val.txt"
    train.write_text((DATA / "train.txt").read_text()[:5000])
    val.write_text((DATA / "val.txt").read_text()[:1000])
    r = run_command("ngram", ["--train", str(train), "--val", str(val), "--order", "3"])
    assert r["cross_entropy"] == ngram_cmd(str(train), str(val), order=3)["cross_entropy"]
    assert r["order"] == 3 and r["perplexity"] == pytest.approx(math.exp(r["cross_entropy"]))
    assert "val_cross_entropy_nats_per_char" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ngram_cmd(str(tmp_path / "nope.txt"), str(val))


# ----------------------------------------------------------------------------- docs/chapter4.md
def _chapter4_quotes():
    """(file, names, code lines) for every ```python block of docs/chapter4.md, attributed to the
    nearest preceding line of the form `path.py` — `name` [and `name`]."""
    import re
    root = Path(__file__).resolve().parents[1]
    lines = (root / "docs" / "chapter4.md").read_text(encoding="utf-8").splitlines()
    attr = re.compile(r"^`(polymodal/[\w/]+\.py)` — (.*)$")
    quotes, current, i = [], None, 0
    while i < len(lines):
        m = attr.match(lines[i])
        if m:
            current = (m.group(1), re.findall(r"`([\w.]+)`", m.group(2)))
        elif lines[i].startswith("```python"):
            j = lines.index("```", i + 1)
            assert current is not None, f"docs/chapter4.md line {i + 1}: code block without a file"
            quotes.append((root / current[0], current[1], lines[i + 1:j], i + 1))
            i = j
        i += 1
    return quotes


def test_chapter4_quotes_are_real():
    """Every quoted code line exists, in order, in the attributed file; every named function exists."""
    import re
    quotes = _chapter4_quotes()
    assert len(quotes) > 30
    for path, names, code, line_no in quotes:
        where = f"docs/chapter4.md block at line {line_no} ({path.name})"
        assert path.is_file(), f"{where}: {path} does not exist"
        src = path.read_text(encoding="utf-8").splitlines()
        for name in names:
            for part in name.split("."):
                assert re.search(rf"^\s*(def|class)\s+{re.escape(part)}\b|^{re.escape(part)}\b.*=",
                                 "\n".join(src), re.M), f"{where}: {part} is not defined in {path}"
        segments, seg = [], []
        for ln in code:
            if ln.strip() == "...":
                segments.append(seg)
                seg = []
            else:
                seg.append(ln.rstrip())
        segments.append(seg)
        pos = 0
        for seg in (s for s in segments if s):
            n = len(seg)
            hit = next((k for k in range(pos, len(src) - n + 1)
                        if [x.rstrip() for x in src[k:k + n]] == seg), None)
            assert hit is not None, f"{where}: quoted lines not found in order: {seg[0]!r}"
            pos = hit + n
