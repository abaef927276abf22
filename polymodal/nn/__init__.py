"""Transformer building blocks shared by every polymodal model."""
from .attention import ATTENTION_IMPLS, Attention, reference_attention, set_attention_impl
from .block import Block
from .kv_cache import KVCache
from .lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from .masks import build_mask, to_additive
from .mlp import MLP, GatedMLP, make_mlp
from .norm import LayerNorm, RMSNorm, make_norm
from .positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions, apply_rotary, sinusoidal_table
from .relative_bias import RelativePositionBias, relative_position_bucket

__all__ = [
    "ATTENTION_IMPLS", "Attention", "reference_attention", "set_attention_impl", "Block", "KVCache",
    "LoRALinear", "apply_lora", "lora_state_dict", "merge_lora", "build_mask", "to_additive", "MLP",
    "GatedMLP", "make_mlp", "LayerNorm", "RMSNorm", "make_norm", "LearnedPositions", "RotaryEmbedding",
    "SinusoidalPositions", "apply_rotary", "sinusoidal_table",
    "RelativePositionBias", "relative_position_bucket",
]
