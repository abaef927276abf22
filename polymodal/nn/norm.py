"""Normalisation layers.

LayerNorm (Ba et al., 2016): y = (x - mean(x)) / sqrt(var(x) + eps) * g + b.
RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * g, with no
re-centring and no bias; LLaMA and T5 use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, with the bias optional (GPT-2 has one, some recipes don't)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, elementwise_affine=True, bias=bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm: x * rsqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reduce in fp32 even under bf16 autocast: the mean of squares of bf16
        # values loses too many bits, and the reference implementations upcast too.
        dtype = x.dtype
        if hasattr(F, "rms_norm") and dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'layernorm' or 'rmsnorm'")
