"""Multi-head scaled dot-product attention (Vaswani et al., 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

with grouped-query heads (Ainslie et al., 2023): ``n_kv_head`` key/value heads
are shared by ``n_head / n_kv_head`` query heads each, which shrinks the KV
cache by that factor. ``n_kv_head == n_head`` is ordinary multi-head attention,
``n_kv_head == 1`` is multi-query attention.

Two interchangeable paths compute the same function:
* ``sdpa``: ``F.scaled_dot_product_attention`` (fused flash / memory-efficient
  kernels where the backend has them) - the default;
* ``reference``: the explicit softmax(QK^T/sqrt(d))V, which is easy to read,
  can return the attention weights (for visualisation), and is what the fast
  path is tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .masks import to_additive
from .positions import apply_rotary

ATTENTION_IMPLS = ("sdpa", "reference")


def reference_attention(q, k, v, mask=None, bias=None, scale=None, dropout_p=0.0, training=False):
    """q (B,H,T,D), k/v (B,Hkv,S,D); mask bool (True = attend) or additive; bias additive."""
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:  # GQA: each group of h/hkv query heads reads one K/V head
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if bias is not None:
        scores = scores + bias.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = scores.softmax(dim=-1)
    if dropout_p and training:
        probs = F.dropout(probs, p=dropout_p)
    return (probs.to(v.dtype) @ v), probs


class Attention(nn.Module):
    """Self- or cross-attention with optional RoPE, KV cache and GQA.

    Self-attention keeps one fused projection ``qkv`` (one GEMM for Q, K and V);
    cross-attention has ``q`` and a fused ``kv`` applied to the encoder memory.
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        cross: bool = False,
        kv_dim: int | None = None,
        scale: float | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        self.head_dim = head_dim or dim // n_head
        self.cross = cross
        self.scale = scale
        self.dropout = dropout
        self.layer_idx = layer_idx
        self.impl = "sdpa"
        self.keep_weights = False  # reference path stores the last attention map when set
        self.last_weights: torch.Tensor | None = None
        q_out, kv_out = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if cross:
            self.q = nn.Linear(dim, q_out, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim or dim, 2 * kv_out, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, q_out + 2 * kv_out, bias=qkv_bias)
        self.proj = nn.Linear(q_out, dim, bias=out_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of the encoder output; computed once per sequence."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            k, v = memory_kv if memory_kv is not None else self.project_memory(memory)
        else:
            q_out, kv_out = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
            q, k, v = self.qkv(x).split([q_out, kv_out, kv_out], dim=-1)
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
        drop = self.dropout if self.training else 0.0
        if self.impl == "reference":
            if is_causal and mask is None:  # bottom-right aligned: query i sees keys j <= i + (S - T)
                s = k.shape[2]
                mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            y, probs = reference_attention(q, k, v, mask, bias, self.scale, drop, self.training)
            self.last_weights = probs.detach() if self.keep_weights else None
        elif self.impl == "sdpa":
            if bias is not None:
                mask = bias if mask is None else bias + to_additive(mask, bias.dtype)
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal and mask is None,
                scale=self.scale, enable_gqa=self.n_head != self.n_kv_head,
            )
        else:
            raise ValueError(f"unknown attention impl {self.impl!r}; choose from {ATTENTION_IMPLS}")
        return self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


def set_attention_impl(model: nn.Module, impl: str, keep_weights: bool = False) -> None:
    """Switches every Attention in ``model`` between the sdpa and reference paths."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose from {ATTENTION_IMPLS}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl
            m.keep_weights = keep_weights
