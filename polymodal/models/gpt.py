"""The decoder-only family: GPT-1, GPT-2, GPT-3-style and LLaMA-style models.

A causal language model factorises p(x_1..x_T) = prod_t p(x_t | x_<t) (the
chain rule) and is trained to minimise the cross-entropy -sum_t log p(x_t | x_<t).
All four generations are the same stack of ``nn.Block`` with different flags:

| preset    | norm      | placement | positions | MLP    | attention              | paper / config |
|-----------|-----------|-----------|-----------|--------|------------------------|----------------|
| gpt1      | LayerNorm | post      | learned   | GELU   | dense                  | Radford et al. 2018; openai-gpt config.json |
| gpt2*     | LayerNorm | pre       | learned   | GELU   | dense                  | Radford et al. 2019; gpt2 config.json |
| gpt3-*    | LayerNorm | pre       | learned   | GELU   | alternating dense/local| Brown et al. 2020, sec. 2.1 |
| smollm2-* | RMSNorm   | pre       | RoPE      | SwiGLU | dense, GQA             | Touvron et al. 2023; HuggingFaceTB/SmolLM2-135M config.json |
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.init import normal_init_
from ..nn import Block, KVCache, LearnedPositions, RotaryEmbedding, SinusoidalPositions, build_mask, make_norm
from .config import ConfigBase


@dataclasses.dataclass
class GPTConfig(ConfigBase):
    family: ClassVar[str] = "gpt"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None  # default 4 * n_embd
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    mlp: str = "plain"  # plain | gated
    activation: str = "gelu_tanh"
    position: str = "learned"  # learned | sinusoidal | rope
    rope_theta: float = 10000.0
    prenorm: bool = True
    final_norm: bool = True
    tie_embeddings: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    attention_pattern: tuple[str, ...] = ("causal",)  # cycled over layers; "local" = banded
    local_window: int = 256
    dropout: float = 0.0
    scale_residual_init: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head and self.head_dim is None:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
        for kind in self.attention_pattern:
            if kind not in ("causal", "local"):
                raise ValueError(f"attention_pattern entries must be 'causal' or 'local', got {kind!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def layer_kind(self, i: int) -> str:
        return self.attention_pattern[i % len(self.attention_pattern)]


def _register(name: str, **kw):
    GPTConfig.presets[name] = kw


_gpt2 = dict(vocab_size=50257, block_size=1024, activation="gelu_tanh", bos_token_id=50256, eos_token_id=50256)
_register("gpt1", vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, prenorm=False,
          final_norm=False, activation="gelu", tie_embeddings=True)  # openai-gpt config.json (afn="gelu")
_register("gpt2", n_layer=12, n_head=12, n_embd=768, **_gpt2)
_register("gpt2-medium", n_layer=24, n_head=16, n_embd=1024, **_gpt2)
_register("gpt2-large", n_layer=36, n_head=20, n_embd=1280, **_gpt2)
_register("gpt2-xl", n_layer=48, n_head=25, n_embd=1600, **_gpt2)
# GPT-3 alternates dense and locally banded sparse attention layers; 125M shapes ("GPT-3 Small", Table 2.1).
_register("gpt3-small", n_layer=12, n_head=12, n_embd=768, block_size=2048, attention_pattern=("causal", "local"),
          local_window=256, **{k: v for k, v in _gpt2.items() if k != "block_size"})
_llama = dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", prenorm=True, qkv_bias=False,
              out_bias=False, mlp_bias=False, scale_residual_init=False)
# HuggingFaceTB/SmolLM2-135M config.json
_register("smollm2-135m", vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
          intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
          bos_token_id=1, eos_token_id=2, **_llama)
# CPU-sized presets.
_register("tiny", vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.1)
_register("nano", vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64)
_register("nano-gpt3", vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64,
          attention_pattern=("causal", "local"), local_window=8)
_register("nano-llama", vocab_size=65, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
          intermediate_size=128, **_llama)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = None
        self.rope = None
        if c.position == "learned":
            self.wpe = LearnedPositions(c.block_size, c.n_embd)
        elif c.position == "sinusoidal":
            self.wpe = SinusoidalPositions(c.block_size, c.n_embd)
        elif c.position == "rope":
            self.rope = RotaryEmbedding(c.hd, c.block_size, c.rope_theta)
        else:
            raise ValueError(f"unknown position kind {c.position!r}")
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.hidden, n_kv_head=c.kv_heads, head_dim=c.hd, norm=c.norm,
                  norm_eps=c.norm_eps, norm_bias=c.norm_bias, mlp=c.mlp, act=c.activation,
                  qkv_bias=c.qkv_bias, out_bias=c.out_bias, mlp_bias=c.mlp_bias, prenorm=c.prenorm,
                  dropout=c.dropout, layer_idx=i)
            for i in range(c.n_layer)
        )
        self.ln_f = make_norm(c.norm, c.n_embd, c.norm_eps, c.norm_bias) if c.final_norm else nn.Identity()
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """GPT-2 (and SmolLM2) share the input embedding with the output projection."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    # -- initialisation -------------------------------------------------------------
    def reset_parameters(self) -> None:
        std = self.config.init_std
        normal_init_(self, std)
        if self.config.scale_residual_init:
            # GPT-2 (sec. 2.3): scale the weights of residual-output layers by 1/sqrt(N),
            # N = 2 * n_layer residual additions, so the stream's variance does not grow with depth.
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None and isinstance(self.wpe, LearnedPositions):
            n -= self.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> KVCache:
        c = self.config
        p = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.hd, max_len or c.block_size,
                       dtype or (p.dtype if p.is_floating_point() else torch.float32), device or p.device)

    # -- forward -------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states (B, T, n_embd).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding.
        With a cache, only the new tokens are passed; their positions continue
        from the cached ones.
        """
        c = self.config
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        start = cache.pos if cache is not None else 0
        if start + t > c.block_size:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than the model's context ({c.block_size} tokens)"
            )
        if cache is not None:
            cache.reserve(t, attention_mask)
            key_valid = cache.key_valid[:, : start + t] if cache.has_padding else None
        else:
            key_valid = attention_mask.to(torch.bool) if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            if attention_mask is not None or (cache is not None and cache.has_padding):
                # Left padding: a row's positions count its real tokens only, so a padded
                # prompt gets the same positions (and logits) as the unpadded one.
                am = attention_mask[:, -t:].long() if attention_mask is not None else x.new_ones(b, t, dtype=torch.long)
                # positions continue after the real tokens already cached (slots before ``start``)
                prev = cache.key_valid[:, :start].sum(-1, keepdim=True) if cache is not None else 0
                position_ids = (prev + am.cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(start, start + t, device=x.device)[None].expand(b, t)
        if self.wpe is not None:
            x = x + self.wpe(position_ids).to(x.dtype)
        rope = self.rope(position_ids) if self.rope is not None else None
        x = self.drop(x)

        # One mask per attention kind, shared by the layers of that kind. The SDPA causal
        # kernel is used when nothing but causality needs masking.
        masks: dict[str, tuple[torch.Tensor | None, bool]] = {}
        for kind in set(c.attention_pattern):
            if kind == "causal" and key_valid is None and (start == 0 or t == 1):
                masks[kind] = (None, start == 0 and t > 1)  # a cached decode step needs no mask at all
            else:
                q_slots = torch.arange(start, start + t, device=x.device)
                k_slots = torch.arange(0, start + t, device=x.device)
                masks[kind] = (build_mask(kind, q_slots, k_slots, key_valid, c.local_window), False)
        for i, blk in enumerate(self.blocks):
            mask, is_causal = masks[c.layer_kind(i)]
            x = blk(x, mask, is_causal=is_causal, rope=rope, cache=cache)
        if cache is not None:
            cache.advance(t)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with ``last_only`` just the last position (B, 1, vocab)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are the inputs shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)
