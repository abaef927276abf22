"""Hugging Face GPT-2, LLaMA and Qwen2 checkpoints <-> our ``GPT`` (decoder family).

Config translation cites the HF ``config.json`` field names:

* GPT-2 (``GPT2Config``): ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``n_inner``,
  ``layer_norm_epsilon``, ``activation_function``, ``tie_word_embeddings``, ``vocab_size``.
* LLaMA (``LlamaConfig``): ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``
  (``rope_parameters.rope_theta`` in transformers >= 5), ``max_position_embeddings``,
  ``tie_word_embeddings``, ``attention_bias``, ``mlp_bias``, ``hidden_act``.
* Qwen2 (``Qwen2Config``): the LLaMA fields; its q/k/v projections have biases and o_proj has
  none (our ``qkv_bias=True, out_bias=False``); sliding-window attention is refused.

Weight maps (declarative, both directions; lesson 3 of DESIGN.md):

* GPT-2 stores its projections as ``Conv1D`` with weight (in, out), so each is transposed.
  Its fused ``c_attn`` is [Q; K; V] along the output dim, the same order as our ``attn.qkv``.
* LLaMA/Qwen2 keep separate q/k/v and gate/up projections; we fuse them into ``attn.qkv``
  ([q; k; v]) and ``mlp.fc`` ([gate; up]), so SwiGLU is silu(x W_gate) * (x W_up)
  (Shazeer 2020, eq. 6) from one GEMM.
"""
from __future__ import annotations

from typing import Any

from ..models.gpt import GPTConfig
from .hf import HFAdapter
from .weight_map import WeightMap, copy, fuse, transpose

# HF activation_function / hidden_act -> ours (transformers.activations.ACT2FN names)
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _unsupported(cond: bool, what: str) -> None:
    if cond:
        raise ValueError(f"unsupported Hugging Face config: {what}")


def _act(name: str, field: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"unsupported Hugging Face config: {field}={name!r}; supported: {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _special_ids(hf: dict[str, Any], vocab: int) -> dict[str, int | None]:
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(key)
        if isinstance(v, list):  # Llama 3 lists several EOS ids; the first is the end-of-text one
            v = v[0] if v else None
        out[key] = v if isinstance(v, int) and 0 <= v < vocab else None
    return out


# --------------------------------------------------------------------------------------- GPT-2
def gpt2_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    _unsupported(hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True")
    _unsupported(not hf.get("scale_attn_weights", True), "scale_attn_weights=False")
    _unsupported(bool(hf.get("add_cross_attention", False)), "add_cross_attention=True")
    n_embd = hf.get("n_embd", 768)
    return GPTConfig(
        name=hf.get("_name_or_path") or "hf-gpt2",
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner"),  # None -> 4 * n_embd, as in GPT2MLP
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation=_act(hf.get("activation_function", "gelu_new"), "activation_function"),
        position="learned",
        prenorm=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),  # GPT2Config default: tied
        qkv_bias=True, out_bias=True, mlp_bias=True,
        **_special_ids(hf, hf.get("vocab_size", 50257)),
    )


def _is_gpt2_shape(c: GPTConfig) -> bool:
    return (c.norm == "layernorm" and c.norm_bias and c.position == "learned" and c.mlp == "plain" and c.prenorm
            and c.final_norm and c.qkv_bias and c.out_bias and c.mlp_bias and set(c.attention_pattern) == {"causal"}
            and c.kv_heads == c.n_head and c.hd * c.n_head == c.n_embd and c.activation in _ACT_TO_HF)


def gpt2_config_to_hf(c: GPTConfig) -> dict[str, Any]:
    if not isinstance(c, GPTConfig) or not _is_gpt2_shape(c):
        raise ValueError("config is not GPT-2 shaped (pre-LN LayerNorm, learned positions, GELU MLP, biases, MHA)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": c.intermediate_size, "activation_function": _ACT_TO_HF[c.activation],
        "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": c.init_std,
        "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "torch_dtype": "float32",
    }


def gpt2_weight_map(c: GPTConfig, hf_keys: set[str] | None = None) -> WeightMap:
    # GPT2LMHeadModel saves "transformer.*" (+ lm_head), GPT2Model saves the bare names.
    p = "transformer." if hf_keys is None or any(k.startswith("transformer.") for k in hf_keys) else ""
    rules = [
        copy(p + "wte.weight", "wte.weight"),
        copy(p + "wpe.weight", "wpe.weight"),
        copy(p + "ln_f.weight", "ln_f.weight"),
        copy(p + "ln_f.bias", "ln_f.bias"),
    ]
    for hf_n, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
        rules += [copy(f"{p}h.{{}}.{hf_n}.weight", f"blocks.{{}}.{ours}.weight"),
                  copy(f"{p}h.{{}}.{hf_n}.bias", f"blocks.{{}}.{ours}.bias")]
    for hf_n, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                       ("mlp.c_proj", "mlp.proj")):
        rules += [transpose(f"{p}h.{{}}.{hf_n}.weight", f"blocks.{{}}.{ours}.weight"),  # Conv1D (in, out)
                  copy(f"{p}h.{{}}.{hf_n}.bias", f"blocks.{{}}.{ours}.bias")]
    ignore_hf = ["*.attn.bias", "*.attn.masked_bias"]  # causal-mask buffers of old checkpoints
    ignore_ours: list[str] = []
    if c.tie_embeddings:
        ignore_hf.append("lm_head.weight")  # some tied checkpoints still save the alias
        ignore_ours.append("lm_head.weight")
    else:
        rules.append(copy("lm_head.weight", "lm_head.weight"))
    return WeightMap(rules, c.n_layer, ignore_hf=ignore_hf, ignore_ours=ignore_ours)


# ---------------------------------------------------------------------------------- LLaMA / Qwen2
def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers < 5: rope_theta + rope_scaling; >= 5: rope_parameters {"rope_type", "rope_theta", ...}
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for d, field in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        kind = d.get("rope_type", d.get("type", "default"))
        _unsupported(kind not in (None, "default"), f"{field} type {kind!r} (only plain RoPE is implemented)")
    _unsupported(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0,
                 "partial_rotary_factor != 1")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: dict[str, Any], model_type: str = "llama") -> GPTConfig:
    qwen = model_type == "qwen2"
    _unsupported(bool(hf.get("use_sliding_window", False)), "use_sliding_window=True (sliding-window attention)")
    _unsupported(any(t != "full_attention" for t in hf.get("layer_types") or []),
                 f"layer_types={hf.get('layer_types')} (only full attention)")
    n_embd = hf["hidden_size"]
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    attention_bias = bool(hf.get("attention_bias", False))
    vocab = hf.get("vocab_size", 32000)
    return GPTConfig(
        name=hf.get("_name_or_path") or f"hf-{model_type}",
        vocab_size=vocab,
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        head_dim=None if head_dim * n_head == n_embd else head_dim,
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="gated",
        activation=_act(hf.get("hidden_act", "silu"), "hidden_act"),
        position="rope",
        rope_theta=_rope_theta(hf),
        prenorm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # Llama/Qwen2 configs default to untied
        qkv_bias=True if qwen else attention_bias,
        out_bias=False if qwen else attention_bias,
        mlp_bias=False if qwen else bool(hf.get("mlp_bias", False)),
        scale_residual_init=False,
        **_special_ids(hf, vocab),
    )


def _is_llama_shape(c: GPTConfig) -> bool:
    return (c.norm == "rmsnorm" and c.position == "rope" and c.mlp == "gated" and c.prenorm and c.final_norm
            and set(c.attention_pattern) == {"causal"} and c.activation in _ACT_TO_HF)


def llama_config_to_hf(c: GPTConfig, model_type: str = "llama") -> dict[str, Any]:
    if not isinstance(c, GPTConfig) or not _is_llama_shape(c):
        raise ValueError("config is not LLaMA shaped (pre-RMSNorm, RoPE, gated MLP, full causal attention)")
    if model_type == "llama" and c.qkv_bias != c.out_bias:
        raise ValueError("LlamaConfig.attention_bias covers q/k/v and o_proj together; use qwen2 for q/k/v-only bias")
    if model_type == "qwen2" and not (c.qkv_bias and not c.out_bias and not c.mlp_bias):
        raise ValueError("Qwen2 has q/k/v biases, no o_proj bias and no MLP bias")
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    d = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.hidden,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
        "head_dim": c.hd, "hidden_act": _ACT_TO_HF[c.activation], "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std, "attention_dropout": 0.0,
        "use_cache": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "torch_dtype": "float32",
    }
    if model_type == "llama":
        d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    return d


def llama_weight_map(c: GPTConfig, hf_keys: set[str] | None = None) -> WeightMap:
    # LlamaForCausalLM saves "model.*" (+ lm_head), LlamaModel saves the bare names.
    p = "model." if hf_keys is None or any(k.startswith("model.") for k in hf_keys) else ""
    q, kv, hid = c.n_head * c.hd, c.kv_heads * c.hd, c.hidden
    a, m = f"{p}layers.{{}}.self_attn.", f"{p}layers.{{}}.mlp."
    rules = [
        copy(p + "embed_tokens.weight", "wte.weight"),
        copy(p + "norm.weight", "ln_f.weight"),
        copy(f"{p}layers.{{}}.input_layernorm.weight", "blocks.{}.norm1.weight"),
        copy(f"{p}layers.{{}}.post_attention_layernorm.weight", "blocks.{}.norm2.weight"),
        fuse([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], "blocks.{}.attn.qkv.weight", [q, kv, kv]),
        copy(a + "o_proj.weight", "blocks.{}.attn.proj.weight"),
        fuse([m + "gate_proj.weight", m + "up_proj.weight"], "blocks.{}.mlp.fc.weight", [hid, hid]),  # [gate; up]
        copy(m + "down_proj.weight", "blocks.{}.mlp.proj.weight"),
    ]
    if c.qkv_bias:
        rules.append(fuse([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], "blocks.{}.attn.qkv.bias", [q, kv, kv]))
    if c.out_bias:
        rules.append(copy(a + "o_proj.bias", "blocks.{}.attn.proj.bias"))
    if c.mlp_bias:
        rules += [fuse([m + "gate_proj.bias", m + "up_proj.bias"], "blocks.{}.mlp.fc.bias", [hid, hid]),
                  copy(m + "down_proj.bias", "blocks.{}.mlp.proj.bias")]
    ignore_hf = ["*rotary_emb.inv_freq"]  # a buffer some old checkpoints saved
    ignore_ours: list[str] = []
    if c.tie_embeddings:
        ignore_hf.append("lm_head.weight")
        ignore_ours.append("lm_head.weight")
    else:
        rules.append(copy("lm_head.weight", "lm_head.weight"))
    return WeightMap(rules, c.n_layer, ignore_hf=ignore_hf, ignore_ours=ignore_ours)


ADAPTERS: dict[str, HFAdapter] = {
    "gpt2": HFAdapter(gpt2_config_from_hf, gpt2_config_to_hf, gpt2_weight_map),
    "llama": HFAdapter(llama_config_from_hf, llama_config_to_hf, llama_weight_map),
    "qwen2": HFAdapter(lambda hf: llama_config_from_hf(hf, "qwen2"), lambda c: llama_config_to_hf(c, "qwen2"),
                       llama_weight_map),
}
ADAPTER = ADAPTERS["gpt2"]  # the module-level default required by hf.ADAPTERS; get_adapter picks per model_type
