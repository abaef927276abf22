"""A preallocated key/value cache for autoregressive decoding.

Attention at step t needs K and V of every earlier token. Recomputing them is
O(t) work per layer per step; caching them makes a decode step O(1) in matmuls
(the attention itself still reads t keys). Buffers are allocated once at the
full length so decoding never reallocates (and a compiled decode step sees
fixed storage).

Rows of a batch share one write position ``pos``: prompts of different
lengths are left-padded, and ``key_valid`` marks which slots hold real tokens
so padding is never attended to.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0
        self.has_padding = False

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> int:
        """Marks ``n_new`` slots as about to be written; returns their start slot."""
        start = self.pos
        if start + n_new > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {n_new} new tokens > capacity {self.max_len}")
        if attention_mask is None:
            self.key_valid[:, start : start + n_new] = True
        else:
            am = attention_mask[:, -n_new:].to(torch.bool)
            self.key_valid[:, start : start + n_new] = am
            self.has_padding = self.has_padding or not bool(am.all())
        return start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes new K/V (B, Hkv, T, D) at ``pos`` and returns all K/V up to the end of them."""
        t = k.shape[2]
        end = self.pos + t
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def valid_counts(self) -> torch.Tensor:
        """Number of real (non-padding) tokens cached per row, shape (B,)."""
        return self.key_valid[:, : self.pos].sum(-1)

    def reorder(self, index: torch.Tensor) -> None:
        """Selects batch rows (beam search keeps the surviving beams)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)
        self.key_valid = self.key_valid.index_select(0, index)
        self.batch_size = int(index.numel())
