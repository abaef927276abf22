"""Position-wise feed-forward networks.

GELU MLP (Vaswani et al., 2017 eq. 2 with GELU from Hendrycks & Gimpel, 2016):
    FFN(x) = W2 gelu(W1 x + b1) + b2
SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer", eq. 6):
    FFN(x) = W2 (silu(W_gate x) * (W_up x))
T5 v1.1's gated-GELU is the same gate with GELU in place of SiLU.
The gate and up projections are fused into one matrix (``fc``) so the
forward pass does one GEMM instead of two; weight maps split it explicitly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.act_name = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU. ``fc`` holds [W_gate; W_up] stacked along the output dim."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.act_name = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.proj(self.act(gate) * up))


def make_mlp(kind: str, dim: int, hidden: int, act: str, bias: bool, dropout: float = 0.0) -> nn.Module:
    """``plain`` is W2 act(W1 x); ``gated`` is W2 (act(W_gate x) * W_up x) (SwiGLU with act='silu')."""
    if kind == "plain":
        return MLP(dim, hidden, act=act, bias=bias, dropout=dropout)
    if kind == "gated":
        return GatedMLP(dim, hidden, act=act, bias=bias, dropout=dropout)
    raise ValueError(f"unknown mlp kind {kind!r}: expected 'plain' or 'gated'")
