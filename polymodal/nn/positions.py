"""Position information.

* Learned absolute embeddings (GPT-1/2, BERT): p_t is a trained row of a table.
* Sinusoidal (Vaswani et al., 2017, sec. 3.5):
  PE(t, 2i) = sin(t / 10000^(2i/d)),  PE(t, 2i+1) = cos(t / 10000^(2i/d)).
* Rotary (RoFormer, Su et al., 2021, eq. 34): rotate each pair of query/key
  features by the angle t * theta^(-2i/d), so q_m . k_n depends on m - n only.
  We use the "rotate half" layout of the Hugging Face LLaMA code (feature i is
  paired with i + d/2); GGUF files store the interleaved layout and are
  un-permuted on import.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.max_len = max_len

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        # The model checks the context length before calling (no device sync here).
        return nn.functional.embedding(position_ids, self.weight)


def sinusoidal_table(max_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for positions up to ``max_len``."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, 1, T, rotary_dim).

        The table covers the model's whole context, built once (no per-step growth check)."""
        return self.cos_table[position_ids][:, None], self.sin_table[position_ids][:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotates the first ``cos.shape[-1]`` features, passes the rest."""
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)
