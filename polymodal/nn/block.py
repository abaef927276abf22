"""The residual transformer block shared by every model in the package.

Pre-norm (GPT-2, LLaMA, ViT; Xiong et al., 2020):
    x = x + Attn(Norm(x));   x = x + FFN(Norm(x))
Post-norm (the original Transformer, GPT-1, BERT):
    x = Norm(x + Attn(x));   x = Norm(x + FFN(x))
A decoder block of an encoder-decoder adds cross-attention to the encoder
memory between the two sub-layers.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .kv_cache import KVCache
from .mlp import make_mlp
from .norm import make_norm


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        n_head: int,
        mlp_hidden: int,
        *,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        norm_bias: bool = True,
        mlp: str = "plain",
        act: str = "gelu_tanh",
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        prenorm: bool = True,
        cross: bool = False,
        cross_kv_dim: int | None = None,
        dropout: float = 0.0,
        attn_scale: float | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        self.prenorm = prenorm
        self.attn = Attention(dim, n_head, n_kv_head, head_dim, qkv_bias, out_bias, dropout,
                              scale=attn_scale, layer_idx=layer_idx)
        self.norm1 = make_norm(norm, dim, norm_eps, norm_bias)
        self.cross_attn = None
        if cross:
            self.cross_attn = Attention(dim, n_head, n_kv_head, head_dim, qkv_bias, out_bias, dropout,
                                        cross=True, kv_dim=cross_kv_dim, scale=attn_scale, layer_idx=layer_idx)
            self.norm_cross = make_norm(norm, dim, norm_eps, norm_bias)
        # The residual dropout below covers the MLP output; the MLP itself gets none (no double dropout).
        self.mlp = make_mlp(mlp, dim, mlp_hidden, act, mlp_bias, 0.0)
        self.norm2 = make_norm(norm, dim, norm_eps, norm_bias)
        self.drop = nn.Dropout(dropout)

    def _sub(self, x, norm, fn):
        if self.prenorm:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        rope=None,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_kv=None,
        memory_mask: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._sub(x, self.norm1, lambda h: self.attn(h, mask, is_causal=is_causal, rope=rope, cache=cache, bias=bias))
        if self.cross_attn is not None:
            x = self._sub(x, self.norm_cross, lambda h: self.cross_attn(
                h, memory_mask, memory=memory, memory_kv=memory_kv, bias=cross_bias))
        return self._sub(x, self.norm2, self.mlp)
