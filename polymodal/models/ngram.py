"""Interpolated modified Kneser-Ney n-gram language model (the statistical baseline).

Implements Chen & Goodman, "An Empirical Study of Smoothing Techniques for
Language Modeling" (Harvard TR-10-98, 1998): the interpolated modified
Kneser-Ney estimate (KN) with its closed-form discount estimates (D), as
introduced in the paper's modified Kneser-Ney section:

    p_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / sum_v c_k(h v)
                 + gamma_k(h) * p_{k-1}(w | h')                          (KN)

    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3+ N3+(h .)) / sum_v c_k(h v)

    Y = n1 / (n1 + 2 n2),  D1 = 1 - 2Y n2/n1,  D2 = 2 - 3Y n3/n2,  D3+ = 3 - 4Y n4/n3   (D)

where h' is h without its first token, ``N_r(h .)`` is the number of distinct
words that follow h with count exactly r (r >= 3 for N3+), and ``n_r`` is the
number of k-grams whose count is exactly r (the count-of-counts of order k).

Which count ``c_k`` is used at each order (the Kneser-Ney idea):

* the highest order n uses raw counts ``c(h w)``;
* every lower order k < n uses *continuation counts*
  ``N1+(. h w) = |{u : c(u h w) > 0}|``, the number of distinct tokens seen
  immediately left of ``h w`` (a k-gram that only occurs at the very start of
  the training sequence, with no left neighbour, has continuation count 0);
* the count-of-counts ``n1..n4`` that fix the three discounts of order k are
  taken over the same counts ``c_k`` (raw at order n, continuation below), as
  KenLM does;
* the unigram order (k = 1, empty context) interpolates with the uniform
  distribution ``1 / V`` over the whole vocabulary ((KN) with
  ``p_0(w) = 1/V``), so every token -- even one never seen in training --
  has non-zero probability.

If a context h was never seen at order k (its denominator is 0) the order is
skipped: ``p_k(w | h) = p_{k-1}(w | h')``. A context shorter than n-1 tokens
(the first tokens of a sequence) starts the recursion at order len(h)+1.
Because every discount satisfies 0 < D_r <= r, each p_k sums to exactly 1.

When a count-of-counts needed by (D) is zero, or (D) gives a
discount outside (0, r], the order falls back to (0.5, 1.0, 1.5) -- the same
fallback as KenLM's ``--discount_fallback``; ``discount_fallback[k-1]`` records it.

Implementation: every distinct k-gram of the training ids gets a dense index
in a sorted table; a k-gram's key is ``index(prefix (k-1)-gram) * V + last``,
so keys stay below (number of training tokens) * V and fit in int64 even for
large vocabularies (a trie laid out as sorted arrays). Contexts of order k
are exactly the (k-1)-grams, so a context's denominator and gamma are arrays
indexed by that (k-1)-gram's table index.
``cross_entropy`` looks up every position of the held-out sequence at once with
``np.searchsorted`` and evaluates (KN) bottom-up, one vectorised pass per order.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

__all__ = ["KneserNeyLM", "char_baseline", "char_vocab", "encode_chars",
           "modified_kn_discounts", "FALLBACK_DISCOUNTS"]

# KenLM's --discount_fallback values, used when (D) is undefined or out of range.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
_FORMAT = "polymodal-kneser-ney-v1"


def modified_kn_discounts(counts: np.ndarray) -> tuple[tuple[float, float, float], bool]:
    """Chen & Goodman (1998) discounts (D): (D1, D2, D3+) from the count-of-counts of ``counts``.

    Returns ``(discounts, fell_back)``. Zero counts are ignored (they are not
    n-grams of this order's distribution).
    """
    counts = np.asarray(counts)
    n = [int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4)]
    if min(n) == 0:
        return FALLBACK_DISCOUNTS, True
    y = n[0] / (n[0] + 2 * n[1])
    d = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
    # 0 < D_r <= r keeps every discounted count non-negative and every gamma > 0,
    # which is what makes each order's distribution sum to one.
    if not all(0 < dr <= r for r, dr in zip((1, 2, 3), d)):
        return FALLBACK_DISCOUNTS, True
    return (float(d[0]), float(d[1]), float(d[2])), False


def _discount(counts: np.ndarray, d: np.ndarray) -> np.ndarray:
    """D(c): 0 for c=0, D1 for c=1, D2 for c=2, D3+ for c>=3 (vectorised)."""
    table = np.array([0.0, d[0], d[1], d[2]])
    return table[np.minimum(counts, 3)]


class KneserNeyLM:
    """Interpolated modified Kneser-Ney n-gram LM over integer token ids.

    ``fit(ids, vocab_size)`` then ``distribution(context)``, ``prob(context, token)``,
    ``log_prob(ids)``, ``cross_entropy(ids)`` (nats/token) and ``perplexity(ids)``.
    """

    def __init__(self, order: int = 5):
        if not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"KneserNeyLM: order must be an integer >= 1, got {order!r}")
        self.order = int(order)
        self.vocab_size: int | None = None
        # Per order k = 1..n (list index k-1):
        self.keys: list[np.ndarray] = []       # sorted int64 keys of the distinct k-grams
        self.counts: list[np.ndarray] = []     # c_k per k-gram: raw at k=n, continuation below
        self.denom: list[np.ndarray] = []      # sum_v c_k(h v) per context h ((k-1)-gram index)
        self.gamma: list[np.ndarray] = []      # interpolation weight per context
        self.discounts: list[tuple[float, float, float]] = []
        self.discount_fallback: list[bool] = []

    # ------------------------------------------------------------------ fitting
    def fit(self, ids: Sequence[int] | np.ndarray, vocab_size: int) -> "KneserNeyLM":
        """Counts every k-gram (k = 1..order) of ``ids`` and precomputes the terms of (KN)."""
        vocab_size = int(vocab_size)
        if vocab_size < 1:
            raise ValueError(f"KneserNeyLM.fit: vocab_size must be >= 1, got {vocab_size}")
        x = self._check_ids(ids, vocab_size, "fit")
        V, n, N = vocab_size, self.order, len(x)
        self.vocab_size = V

        # grams[k-1][p] = table index of the k-gram ending at position p + k - 1 (corpus order).
        keys: list[np.ndarray] = [np.arange(V, dtype=np.int64)]  # a unigram's index is its id
        grams: list[np.ndarray] = [x]
        for k in range(2, n + 1):
            if N < k:
                keys.append(np.zeros(0, np.int64))
                grams.append(np.zeros(0, np.int64))
                continue
            # The (k-1)-gram ending at i-1 is the prefix of the k-gram ending at i.
            key = grams[k - 2][: N - k + 1] * V + x[k - 1:]
            uniq, inv = np.unique(key, return_inverse=True)
            keys.append(uniq)
            grams.append(inv.astype(np.int64).reshape(-1))

        self.keys, self.counts, self.denom, self.gamma = [], [], [], []
        self.discounts, self.discount_fallback = [], []
        for k in range(1, n + 1):
            n_grams = len(keys[k - 1])
            if k == n:
                c = np.bincount(grams[k - 1], minlength=n_grams)  # raw counts at the top order
            else:
                c = self._continuation_counts(keys, grams, k, V)
            c = c.astype(np.int64)
            d, fell_back = modified_kn_discounts(c[c > 0])
            # Contexts of order k are the (k-1)-grams; order 1 has the single empty context.
            n_ctx = 1 if k == 1 else len(keys[k - 2])
            ctx = np.zeros(n_grams, np.int64) if k == 1 else keys[k - 1] // V
            den = np.bincount(ctx, weights=c, minlength=n_ctx)
            dsum = np.bincount(ctx, weights=_discount(c, np.array(d)), minlength=n_ctx)
            with np.errstate(invalid="ignore", divide="ignore"):
                gam = np.where(den > 0, dsum / np.where(den > 0, den, 1), 0.0)
            self.keys.append(keys[k - 1])
            self.counts.append(c)
            self.denom.append(den.astype(np.float64))
            self.gamma.append(gam.astype(np.float64))
            self.discounts.append(d)
            self.discount_fallback.append(fell_back)
        return self

    @staticmethod
    def _continuation_counts(keys, grams, k, V) -> np.ndarray:
        """N1+(. g) for every k-gram g: distinct (k+1)-grams whose last k tokens are g."""
        n_grams = len(keys[k - 1])
        longer = keys[k]  # the distinct (k+1)-grams
        if len(longer) == 0:
            return np.zeros(n_grams, np.int64)
        # Suffix k-gram of each distinct (k+1)-gram, read off at any one of its occurrences
        # (every occurrence has the same suffix, so whichever write wins is fine).
        g_next = grams[k]
        at = np.empty(len(longer), np.int64)
        at[g_next] = np.arange(len(g_next))
        # grams[k] offset p is the (k+1)-gram ending at sequence position p + k; the k-gram
        # ending at that same position is grams[k-1] offset p + 1.
        suffix = grams[k - 1][at + 1]
        return np.bincount(suffix, minlength=n_grams)

    @staticmethod
    def _check_ids(ids, vocab_size: int, where: str) -> np.ndarray:
        x = np.asarray(ids)
        if x.ndim != 1:
            raise ValueError(f"KneserNeyLM.{where}: ids must be a 1-D sequence, got shape {x.shape}")
        if x.size == 0:
            return x.astype(np.int64)
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"KneserNeyLM.{where}: ids must be integers, got dtype {x.dtype}")
        x = x.astype(np.int64)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"KneserNeyLM.{where}: token id {bad} is outside the vocabulary "
                             f"[0, {vocab_size})")
        return x

    def _require_fit(self, where: str) -> int:
        if self.vocab_size is None:
            raise RuntimeError(f"KneserNeyLM.{where}: call fit() or load() first")
        return self.vocab_size

    # ------------------------------------------------------------------ lookups
    def _index(self, k: int, prefix_idx: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Table index of the k-gram (prefix (k-1)-gram index, last token); -1 if unseen."""
        if k == 1:
            return last.astype(np.int64)
        keys = self.keys[k - 1]
        ok = prefix_idx >= 0
        if len(keys) == 0:
            return np.full(prefix_idx.shape, -1, np.int64)
        key = np.where(ok, prefix_idx, 0) * self.vocab_size + last
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where(ok & (keys[pos] == key), pos, -1).astype(np.int64)

    def _context_indices(self, h: np.ndarray) -> list[int]:
        """[index of the last-L-tokens suffix of h in the L-gram table, for L = 0..len(h)] (-1 unseen)."""
        m = len(h)
        out = [0]  # L = 0: the empty context
        for L in range(1, m + 1):
            idx = np.array(-1)
            for j, t in enumerate(h[m - L:]):  # walk the suffix left to right through the tables
                idx = self._index(j + 1, idx if j else np.array(0), np.array(t))
                if idx < 0:
                    break
            out.append(int(idx))
        return out

    def _prepare_context(self, context, where: str) -> np.ndarray:
        V = self._require_fit(where)
        h = self._check_ids(list(context) if not isinstance(context, np.ndarray) else context, V, where)
        return h[max(0, len(h) - (self.order - 1)):] if self.order > 1 else h[:0]

    # ------------------------------------------------------------------ queries
    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """p(. | context) over the whole vocabulary (float64, sums to 1 for any context)."""
        h = self._prepare_context(context, "distribution")
        V = self.vocab_size
        ctx = self._context_indices(h)
        p = np.full(V, 1.0 / V)  # p_0: uniform
        for k in range(1, len(h) + 2):
            c_idx = ctx[k - 1]
            if c_idx < 0 or self.denom[k - 1][c_idx] <= 0:
                continue  # unseen context: p_k = p_{k-1}
            den, c = self.denom[k - 1][c_idx], self.counts[k - 1]
            if k == 1:
                lo, hi, last = 0, V, np.arange(V)
            else:
                keys = self.keys[k - 1]
                lo, hi = np.searchsorted(keys, [c_idx * V, (c_idx + 1) * V])
                last = keys[lo:hi] % V
            ck = c[lo:hi]
            d = np.array(self.discounts[k - 1])
            p = self.gamma[k - 1][c_idx] * p
            p[last] += np.maximum(ck - _discount(ck, d), 0.0) / den
        return p

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | context)."""
        V = self._require_fit("prob")
        if not 0 <= int(token) < V:
            raise ValueError(f"KneserNeyLM.prob: token id {token} is outside the vocabulary [0, {V})")
        h = self._prepare_context(context, "prob")
        seq = np.concatenate([h, [int(token)]]).astype(np.int64)
        return float(self._token_probs(seq, start=len(h))[0])

    def _token_probs(self, x: np.ndarray, start: int = 0) -> np.ndarray:
        """p(x[i] | x[max(0, i-n+1):i]) for i = start..len(x)-1, vectorised over positions."""
        V, n, N = self.vocab_size, self.order, len(x)
        # g[k-1][i] = table index of the k-gram of x ending at position i (-1: unseen or i < k-1).
        g = [x.copy()]
        for k in range(2, n + 1):
            prev = np.full(N, -1, np.int64)
            prev[1:] = g[k - 2][:-1]
            g.append(self._index(k, prev, x))
        pos = np.arange(start, N)
        tok = x[pos]
        p = np.full(len(pos), 1.0 / V)
        for k in range(1, n + 1):
            if k == 1:
                c_idx = np.zeros(len(pos), np.int64)
            else:
                c_idx = np.full(len(pos), -1, np.int64)
                has = pos >= 1
                c_idx[has] = g[k - 2][pos[has] - 1]
            den = np.where(c_idx >= 0, self.denom[k - 1][np.maximum(c_idx, 0)], 0.0)
            live = den > 0
            j = g[k - 1][pos]
            ck = np.where(j >= 0, self.counts[k - 1][np.maximum(j, 0)], 0) if k > 1 else self.counts[0][tok]
            num = np.maximum(ck - _discount(ck, np.array(self.discounts[k - 1])), 0.0)
            gam = self.gamma[k - 1][np.maximum(c_idx, 0)]
            p = np.where(live, num / np.where(live, den, 1.0) + gam * p, p)
        return p

    def log_prob(self, ids: Sequence[int] | np.ndarray) -> float:
        """Sum of ln p(x_i | up to order-1 previous tokens) over the sequence (nats)."""
        V = self._require_fit("log_prob")
        x = self._check_ids(ids, V, "log_prob")
        if len(x) == 0:
            return 0.0
        return float(np.log(self._token_probs(x)).sum())

    def cross_entropy(self, ids: Sequence[int] | np.ndarray) -> float:
        """Mean negative log-likelihood in nats per token (comparable with a GPT's val loss)."""
        n = len(ids)
        if n == 0:
            raise ValueError("KneserNeyLM.cross_entropy: empty sequence")
        return -self.log_prob(ids) / n

    def perplexity(self, ids: Sequence[int] | np.ndarray) -> float:
        """exp(cross_entropy)."""
        return math.exp(self.cross_entropy(ids))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Writes an ``.npz`` (no pickle): order, vocab size, and every order's tables."""
        V = self._require_fit("save")
        arrays = {"format": np.array(_FORMAT), "order": np.array(self.order), "vocab_size": np.array(V),
                  "discounts": np.array(self.discounts, np.float64),
                  "discount_fallback": np.array(self.discount_fallback, bool)}
        for k in range(1, self.order + 1):
            arrays[f"keys_{k}"] = self.keys[k - 1]
            arrays[f"counts_{k}"] = self.counts[k - 1]
            arrays[f"denom_{k}"] = self.denom[k - 1]
            arrays[f"gamma_{k}"] = self.gamma[k - 1]
        path = Path(path)
        with open(path, "wb") as f:  # an open file keeps numpy from appending ".npz"
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "KneserNeyLM":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KneserNeyLM.load: no such file {path}")
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:  # zip/format errors
            raise ValueError(f"KneserNeyLM.load: {path} is not a saved KneserNeyLM (.npz): {e}") from e
        with z:
            if "format" not in z.files or str(z["format"]) != _FORMAT:
                raise ValueError(f"KneserNeyLM.load: {path} is not a {_FORMAT} file")
            lm = cls(int(z["order"]))
            lm.vocab_size = int(z["vocab_size"])
            lm.discounts = [tuple(float(v) for v in row) for row in z["discounts"]]
            lm.discount_fallback = [bool(b) for b in z["discount_fallback"]]
            for k in range(1, lm.order + 1):
                for name in ("keys", "counts", "denom", "gamma"):
                    if f"{name}_{k}" not in z.files:
                        raise ValueError(f"KneserNeyLM.load: {path} lacks array {name}_{k}")
                lm.keys.append(z[f"keys_{k}"].astype(np.int64))
                lm.counts.append(z[f"counts_{k}"].astype(np.int64))
                lm.denom.append(z[f"denom_{k}"].astype(np.float64))
                lm.gamma.append(z[f"gamma_{k}"].astype(np.float64))
        return lm


# ---------------------------------------------------------------------- char level
UNK = "<unk>"


def char_vocab(train_text: str) -> list[str]:
    """Sorted set of the training characters; id len(chars) is <unk> (chars unseen in training)."""
    return sorted(set(train_text))


def encode_chars(text: str, chars: list[str]) -> np.ndarray:
    """Char ids under ``chars``; any char not in it maps to the extra <unk> id ``len(chars)``."""
    table = {c: i for i, c in enumerate(chars)}
    unk = len(chars)
    return np.fromiter((table.get(c, unk) for c in text), dtype=np.int64, count=len(text))


def char_baseline(train_text: str, val_text: str, order: int = 5) -> dict:
    """Fits a char-level modified-KN LM on ``train_text``; val cross-entropy (nats/char) and perplexity.

    Vocabulary: the sorted characters of ``train_text`` plus one <unk> id for val characters
    unseen in training (V = len(chars) + 1), so the number is comparable with a char-level GPT's
    val loss in nats.
    """
    if not train_text:
        raise ValueError("char_baseline: train_text is empty")
    if not val_text:
        raise ValueError("char_baseline: val_text is empty")
    chars = char_vocab(train_text)
    V = len(chars) + 1
    t0 = time.perf_counter()
    lm = KneserNeyLM(order).fit(encode_chars(train_text, chars), V)
    t1 = time.perf_counter()
    val = encode_chars(val_text, chars)
    ce = lm.cross_entropy(val)
    t2 = time.perf_counter()
    return {"cross_entropy": ce, "perplexity": math.exp(ce), "order": int(order), "vocab_size": V,
            "n_unk": int(np.count_nonzero(val == V - 1)), "fit_s": t1 - t0, "eval_s": t2 - t1}
