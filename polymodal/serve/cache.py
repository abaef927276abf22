"""A KV cache whose rows join and leave between decode steps (continuous batching).

Continuous ("iteration-level") batching (Yu et al., 2022, Orca, sec. 3-4): the
scheduler re-forms the batch after every decode step, so a new request starts as
soon as a row is free instead of waiting for the whole batch to finish.

Layout. ``KVCache`` keeps one write position ``pos`` shared by all rows and a
``key_valid`` (B, S) mask of the slots that hold real tokens. We keep that
contract, so the unmodified ``GPT.forward`` runs on it: every row is stored
RIGHT-ALIGNED, i.e. a row with L cached tokens occupies slots [pos - L, pos).
A decode step then writes every row's new token at slot ``pos``; the model
derives each row's RoPE/learned position from the number of valid slots before
it (``key_valid`` count), and masks the slots outside the row. Because
``has_padding`` is always set, a row runs the same (masked) kernels whether it
is alone or in a batch of 32, which keeps greedy output batch-independent.

Storage is preallocated for ``max_rows`` rows; the active rows are always the
first ``n`` (a leaving row is replaced by the last one), and ``k``/``v``/
``key_valid`` are views of that prefix, so a join or a leave copies one row,
never the whole cache. Capacity (slots) grows by doubling up to ``limit`` (the
served context). The columns before the oldest row's start are dropped
(compaction; afterwards ``pos`` equals the longest row's length, at most
``limit``) when ``pos`` reaches capacity, and also as soon as they are a quarter
of ``pos`` and at least ``compact_min`` slots: every decode step attends over
all ``pos`` slots of every row, so dead columns cost work at each step (measured,
SmolLM2 fp32, 32 rows of 100 tokens: 544 ms per step at pos 480, 369 ms at pos
103; the compaction itself took 82 ms).
"""
from __future__ import annotations

import torch

from ..nn import KVCache


class SlotKVCache(KVCache):
    def __init__(self, n_layers: int, max_rows: int, n_kv_heads: int, head_dim: int, limit: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", initial: int = 256,
                 compact_min: int = 32):
        self.limit = int(limit)
        self.compact_min = int(compact_min)
        self.max_rows = int(max_rows)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self._alloc(min(initial, self.limit))
        self.n = 0
        self.pos = 0
        self.starts: list[int] = []  # first slot of each active row
        self.has_padding = True  # always take the masked path (see module docstring)
        self._views()

    # -- storage -------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        shape = (self.max_rows, self.n_kv_heads, cap, self.head_dim)
        self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self._valid = torch.zeros(self.max_rows, cap, dtype=torch.bool, device=self.device)
        self.max_len = cap

    def _views(self) -> None:
        n = self.n
        self.k = [t[:n] for t in self._k]
        self.v = [t[:n] for t in self._v]
        self.key_valid = self._valid[:n]
        self.batch_size = n

    def _grow(self, need: int) -> None:
        cap = self.max_len
        while cap < need:
            cap *= 2
        cap = min(cap, self.limit)
        if cap < need:
            raise ValueError(f"KV cache needs {need} slots, more than the served context ({self.limit})")
        old_k, old_v, old_valid, p = self._k, self._v, self._valid, self.pos
        self._alloc(cap)
        for new, old in zip(self._k + self._v, old_k + old_v):
            new[:, :, :p] = old[:, :, :p]
        self._valid[:, :p] = old_valid[:, :p]

    def _shift(self, delta: int) -> None:
        """Moves every active row's slots by ``delta`` (right if > 0, left if < 0)."""
        if delta == 0:
            return
        n, p = self.n, self.pos
        if n:
            lo = max(0, -delta)  # source columns [lo, p) move to [lo + delta, p + delta)
            for t in self._k + self._v:
                t[:n, :, lo + delta:p + delta] = t[:n, :, lo:p].clone()
            vv = self._valid[:n, lo:p].clone()
            self._valid[:n] = False
            self._valid[:n, lo + delta:p + delta] = vv
        self.pos = p + delta
        self.starts = [s + delta for s in self.starts]

    def compact(self) -> None:
        """Drops the columns before the oldest active row (none of them is attended to)."""
        if self.n == 0:
            self.pos, self.starts = 0, []
            return
        self._shift(-min(self.starts))

    def ensure(self, n_new: int) -> None:
        """Makes room for ``n_new`` more slots at ``pos`` (compacting, then growing)."""
        if self.n and min(self.starts) >= max(self.compact_min, self.pos // 4):
            self.compact()  # in place: the views stay valid
        if self.pos + n_new <= self.max_len:
            return
        self.compact()
        if self.pos + n_new > self.max_len:
            self._grow(self.pos + n_new)
        self._views()

    # -- rows ----------------------------------------------------------------------------
    def lengths(self) -> list[int]:
        return [self.pos - s for s in self.starts]

    def add(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int) -> int:
        """Appends a row from a one-row prefill cache (per layer (1, Hkv, >=length, D)); returns its index."""
        if self.n >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} cache rows are in use")
        if self.n == 0:
            self.pos, self.starts = 0, []
        if self.pos < length:  # the new row does not fit left of pos: move everyone right
            if length > self.max_len:
                self._grow(length)
            self._shift(length - self.pos) if self.n else setattr(self, "pos", length)
        r, s = self.n, self.pos - length
        for dst, src in zip(self._k + self._v, k + v):
            dst[r, :, s:self.pos] = src[0, :, :length]
        self._valid[r] = False
        self._valid[r, s:self.pos] = True
        self.starts.append(s)
        self.n += 1
        self._views()
        return r

    def remove(self, r: int) -> int | None:
        """Removes row ``r``; the last row moves into its place. Returns the moved row's old index."""
        last = self.n - 1
        moved = None
        if r != last:
            for t in self._k + self._v:
                t[r] = t[last]
            self._valid[r] = self._valid[last]
            self.starts[r] = self.starts[last]
            moved = last
        self.starts.pop()
        self.n -= 1
        if self.n == 0:
            self.pos = 0
        self._views()
        return moved

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> int:
        # Every active row gets a real token at each reserved slot (decode feeds one token per row).
        start = self.pos
        if start + n_new > self.max_len:
            raise ValueError(f"KV cache overflow: {start} + {n_new} > capacity {self.max_len}; call ensure() first")
        self.key_valid[:, start:start + n_new] = True
        return start

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("SlotKVCache rows are managed with add()/remove(); beam search uses KVCache")


class PrefixCache:
    """K/V of recently prefilled prompts, so a new prompt only prefills what follows the longest
    prefix it shares with one of them (automatic prefix caching; SGLang's RadixAttention, Zheng
    et al., 2024, sec. 3, keeps the same reuse in a radix tree).

    Chat prompts share a lot: the chat template's default system prompt is 24 of the 36 tokens
    of a short SmolLM2 question, so most of every prefill is the same computation. Entries are
    whole prompts, the least recently used leaves first, and the total is capped at ``budget``
    tokens (K/V memory: 2 x layers x kv_heads x head_dim x dtype bytes per token, 46 KB for
    SmolLM2 in float32). A list of entries searched linearly is enough at this size.
    """

    def __init__(self, budget: int = 2048, min_reuse: int = 4):
        self.budget, self.min_reuse = int(budget), int(min_reuse)
        self.entries: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # LRU order
        self.tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int, list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """(n, k, v): the first ``n`` slots of per-layer ``k``/``v`` (1, Hkv, >=n, D) hold this
        prompt's first ``n`` tokens; n < len(prompt), so at least one token is left to prefill
        (its logits pick the first new token). (0, None, None) when nothing useful is cached."""
        best, hit = 0, None
        for key in self.entries:
            n = 0
            for a, b in zip(key, prompt):
                if a != b:
                    break
                n += 1
            if n > best:
                best, hit = n, key
        best = min(best, len(prompt) - 1)
        if hit is None or best < self.min_reuse:
            return 0, None, None
        k, v = self.entries.pop(hit)
        self.entries[hit] = (k, v)  # most recently used
        return best, k, v

    def store(self, prompt: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keeps a prompt's K/V (tensors no one writes to any more); drops entries it extends."""
        key = tuple(prompt)
        if len(key) > self.budget // 2 or self.budget <= 0:
            return  # one long prompt would evict everything else
        for old in [e for e in self.entries if len(e) <= len(key) and key[:len(e)] == e]:
            del self.entries[old]  # a prefix of the new prompt: the new entry serves it too
            self.tokens -= len(old)
        self.entries[key] = (k, v)
        self.tokens += len(key)
        while self.tokens > self.budget:
            old = next(iter(self.entries))
            del self.entries[old]
            self.tokens -= len(old)
