"""Hugging Face ViT and CLIP checkpoints <-> our ``ViT`` and ``CLIP`` (both directions).

Config translation cites the HF ``config.json`` field names:

* ViT (``ViTConfig``): ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``intermediate_size``, ``hidden_act``, ``layer_norm_eps``, ``image_size``, ``patch_size``,
  ``num_channels``, ``qkv_bias``, ``hidden_dropout_prob``, ``pooler_output_size``/``pooler_act``,
  ``id2label`` (the classifier's size), ``architectures`` (ViTModel vs ViTForImageClassification).
* CLIP (``CLIPConfig``): ``projection_dim``, ``logit_scale_init_value`` and the two sub-configs
  ``text_config`` (``vocab_size``, ``max_position_embeddings``, ``hidden_size``, ``intermediate_size``,
  ``num_hidden_layers``, ``num_attention_heads``, ``hidden_act``, ``layer_norm_eps``, bos/eos/pad ids)
  and ``vision_config`` (the ViT fields; CLIP has no qkv_bias switch and no patch bias).

Weight maps (declarative, explicit fused QKV; lesson 3 of DESIGN.md):

* HF keeps separate query/key/value (ViT) or q_proj/k_proj/v_proj (CLIP) Linears; ours is one
  fused ``attn.qkv`` = [Q; K; V] along the output dim (``fuse``: cat on import, split on export).
* ViT: ``ViTForImageClassification`` prefixes the trunk with ``vit.`` and adds ``classifier.*``;
  ``ViTModel`` has bare names and a ``pooler.dense`` (dense + tanh). The class token is
  stored (1, 1, D) and the position table (1, 1 + N, D); ours are (D,) and (1 + N, D).
* CLIP: ``text_model.*``, ``vision_model.*`` (with CLIP's ``pre_layrnorm`` - sic - and
  ``post_layernorm``), ``visual_projection``, ``text_projection`` (no bias) and the scalar
  ``logit_scale``. The ``position_ids`` buffers carry nothing and are ignored.

``ADAPTERS`` holds one adapter per model_type ("vit", "clip", and "clip_vision_model" for a
``CLIPVisionModel`` alone, which 5.x saves without the ``vision_model.`` prefix);
``polymodal.interop.hf.export_hf`` picks the one whose ``config_to_hf`` accepts the model's config.
"""
from __future__ import annotations

from typing import Any

from ..models.clip import CLIPConfig, CLIPTextConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..models.vit import ViTConfig
from .hf import HFAdapter
from .weight_map import Rule, WeightMap, copy, custom, fuse

_ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
              "silu": "silu"}


def _act(name: str, field: str = "hidden_act") -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"unsupported Hugging Face config: {field}={name!r}; supported: {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _square(v: Any, field: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"unsupported Hugging Face config: non-square {field}={list(v)}")
        v = v[0]
    return int(v)


# ------------------------------------------------------------------------------------------ ViT
def vit_config_from_hf(hf: dict[str, Any]) -> ViTConfig:
    d = hf.get("hidden_size", 768)
    if hf.get("pooler_act", "tanh") != "tanh" or (hf.get("pooler_output_size") or d) != d:
        raise ValueError("unsupported Hugging Face config: pooler_act must be 'tanh' and "
                         "pooler_output_size = hidden_size")
    archs = hf.get("architectures") or ["ViTModel"]
    classifier = any(a.endswith("ForImageClassification") for a in archs)
    id2label = hf.get("id2label") or {}
    return ViTConfig(
        name=hf.get("_name_or_path") or "hf-vit",
        image_size=_square(hf.get("image_size", 224), "image_size"),
        patch_size=_square(hf.get("patch_size", 16), "patch_size"),
        num_channels=hf.get("num_channels", 3),
        n_embd=d,
        n_layer=hf.get("num_hidden_layers", 12),
        n_head=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        activation=_act(hf.get("hidden_act", "gelu")),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        qkv_bias=hf.get("qkv_bias", True),
        dropout=float(hf.get("hidden_dropout_prob", 0.0)),
        init_std=hf.get("initializer_range", 0.02),
        # ViTModel's default add_pooling_layer=True; vit_weight_map corrects this from the tensors.
        pooler=not classifier,
        num_labels=len(id2label) if classifier else 0,
        id2label={str(k): v for k, v in id2label.items()} if classifier else None,
    )


def _is_hf_vit_shape(c: ViTConfig) -> bool:
    return (c.stem == "patch" and c.class_token and c.pool == "cls" and not c.pre_norm and c.final_norm == "all" and c.patch_bias
            and c.activation in _ACT_TO_HF)


def vit_config_to_hf(c: ViTConfig) -> dict[str, Any]:
    if not isinstance(c, ViTConfig) or not _is_hf_vit_shape(c):
        raise ValueError("config is not HF-ViT shaped (patch stem, class token, final LayerNorm on all tokens, "
                         "patch bias, no pre-norm)")
    if c.pooler and c.num_labels:
        raise ValueError("HF ViTForImageClassification has no pooler; a ViT with both cannot be exported")
    out = {
        "architectures": ["ViTForImageClassification" if c.num_labels else "ViTModel"], "model_type": "vit",
        "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "intermediate_size": c.hidden, "hidden_act": _ACT_TO_HF[c.activation], "layer_norm_eps": c.norm_eps,
        "image_size": c.image_size, "patch_size": c.patch_size, "num_channels": c.num_channels,
        "qkv_bias": c.qkv_bias, "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": 0.0,
        "initializer_range": c.init_std, "encoder_stride": c.patch_size, "pooler_act": "tanh",
        "pooler_output_size": c.n_embd, "torch_dtype": "float32",
    }
    if c.num_labels:
        id2label = c.id2label or {str(i): f"LABEL_{i}" for i in range(c.num_labels)}
        out["id2label"] = id2label
        out["label2id"] = {v: int(k) for k, v in id2label.items()}
    return out


def _reshape(hf_shape_fn, ours_shape_fn):
    """Rule transforms that only change a tensor's view (class token, position table)."""
    return (lambda ts: [ours_shape_fn(ts[0]).contiguous()], lambda ts: [hf_shape_fn(ts[0]).contiguous()])


def _block_rules(hf_layer: str, ours: str, attn: str, names: dict[str, str], n: int, d: int, qkv_bias: bool,
                 ) -> list[Rule]:
    """Concrete (index-expanded) rules for one encoder stack. ``names`` maps our submodule to the HF one;
    the towers of CLIP have different depths, so layers are expanded here rather than by WeightMap."""
    rules: list[Rule] = []
    for i in range(n):
        h, o = hf_layer.format(i), f"{ours}.{i}"
        q, k, v = (f"{h}.{attn}.{x}" for x in names["qkv"])
        rules.append(fuse([q + ".weight", k + ".weight", v + ".weight"], f"{o}.attn.qkv.weight", [d, d, d]))
        if qkv_bias:
            rules.append(fuse([q + ".bias", k + ".bias", v + ".bias"], f"{o}.attn.qkv.bias", [d, d, d]))
        for our_mod, hf_mod in (("attn.proj", names["proj"]), ("norm1", names["norm1"]), ("norm2", names["norm2"]),
                                ("mlp.fc", names["fc"]), ("mlp.proj", names["fc2"])):
            rules += [copy(f"{h}.{hf_mod}.weight", f"{o}.{our_mod}.weight"),
                      copy(f"{h}.{hf_mod}.bias", f"{o}.{our_mod}.bias")]
    return rules


_VIT_NAMES = {"qkv": ("query", "key", "value"), "proj": "attention.output.dense", "norm1": "layernorm_before",
              "norm2": "layernorm_after", "fc": "intermediate.dense", "fc2": "output.dense"}
_CLIP_NAMES = {"qkv": ("q_proj", "k_proj", "v_proj"), "proj": "self_attn.out_proj", "norm1": "layer_norm1",
               "norm2": "layer_norm2", "fc": "mlp.fc1", "fc2": "mlp.fc2"}


def vit_weight_map(c: ViTConfig, hf_keys: set[str] | None = None) -> WeightMap:
    if hf_keys is not None:
        # The saved tensors decide the optional heads (a ViTModel may be saved with
        # add_pooling_layer=False); the model is built after this call, from this config.
        c.pooler = any(k.startswith("pooler.dense.") for k in hf_keys)
    p = "vit." if (c.num_labels if hf_keys is None else any(k.startswith("vit.") for k in hf_keys)) else ""
    d = c.n_embd
    e = p + "embeddings."
    rules = [
        custom([e + "cls_token"], ["cls_token"], *_reshape(lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1))),
        custom([e + "position_embeddings"], ["pos_embed"],
               *_reshape(lambda t: t.unsqueeze(0), lambda t: t.reshape(t.shape[-2], t.shape[-1]))),
        copy(e + "patch_embeddings.projection.weight", "patch_embed.weight"),
        copy(e + "patch_embeddings.projection.bias", "patch_embed.bias"),
        copy(p + "layernorm.weight", "ln_f.weight"),
        copy(p + "layernorm.bias", "ln_f.bias"),
    ]
    rules += _block_rules(p + "encoder.layer.{}", "blocks", "attention.attention", _VIT_NAMES, c.n_layer, d,
                          c.qkv_bias)
    if c.pooler:
        rules += [copy("pooler.dense.weight", "pooler.weight"), copy("pooler.dense.bias", "pooler.bias")]
    if c.num_labels:
        rules += [copy("classifier.weight", "head.weight"), copy("classifier.bias", "head.bias")]
    return WeightMap(rules, c.n_layer, ignore_hf=["*position_ids", "*.mask_token"])


# ----------------------------------------------------------------------------------------- CLIP
def _clip_text_from_hf(t: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(  # missing keys fall back to transformers' CLIPTextConfig defaults
        vocab_size=t.get("vocab_size", 49408), block_size=t.get("max_position_embeddings", 77),
        n_embd=t.get("hidden_size", 512), n_layer=t.get("num_hidden_layers", 12),
        n_head=t.get("num_attention_heads", 8), intermediate_size=t.get("intermediate_size", 2048),
        activation=_act(t.get("hidden_act", "quick_gelu"), "text_config.hidden_act"),
        norm_eps=t.get("layer_norm_eps", 1e-5), init_std=t.get("initializer_range", 0.02),
        bos_token_id=t.get("bos_token_id", 49406), eos_token_id=t.get("eos_token_id", 49407),
        pad_token_id=t.get("pad_token_id", 1),
    )


def _clip_vision_from_hf(v: dict[str, Any]) -> ViTConfig:
    return ViTConfig(  # CLIPVisionConfig defaults for missing keys; CLIP preprocessing
        image_size=_square(v.get("image_size", 224), "vision_config.image_size"),
        patch_size=_square(v.get("patch_size", 32), "vision_config.patch_size"),
        num_channels=v.get("num_channels", 3), n_embd=v.get("hidden_size", 768),
        n_layer=v.get("num_hidden_layers", 12), n_head=v.get("num_attention_heads", 12),
        intermediate_size=v.get("intermediate_size", 3072),
        activation=_act(v.get("hidden_act", "quick_gelu"), "vision_config.hidden_act"),
        norm_eps=v.get("layer_norm_eps", 1e-5), init_std=v.get("initializer_range", 0.02),
        qkv_bias=True, patch_bias=False, pre_norm=True, final_norm="pooled", pool="cls",
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample="bicubic", resize_mode="shortest",
        center_crop=True,
    )


def clip_config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    return CLIPConfig(
        name=hf.get("_name_or_path") or "hf-clip",
        vision=_clip_vision_from_hf(hf.get("vision_config") or {}),
        text=_clip_text_from_hf(hf.get("text_config") or {}),
        projection_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
    )


def _is_clip_vision(v) -> bool:
    return (isinstance(v, ViTConfig) and v.stem == "patch" and v.class_token and v.pool == "cls" and v.pre_norm and v.final_norm == "pooled"
            and not v.patch_bias and v.qkv_bias and not v.pooler and not v.num_labels and v.activation in _ACT_TO_HF)


def _is_clip_text(t) -> bool:
    return isinstance(t, CLIPTextConfig) and t.causal and t.qkv_bias and t.activation in _ACT_TO_HF


def clip_config_to_hf(c: CLIPConfig) -> dict[str, Any]:
    if not isinstance(c, CLIPConfig):
        raise ValueError("not a CLIPConfig")
    if not _is_clip_vision(c.vision) or not _is_clip_text(c.text):
        raise ValueError("HF CLIPModel needs a CLIP-shaped ViT image tower and a CLIPText text tower")
    v, t = c.vision, c.text
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.projection_dim,
        "logit_scale_init_value": c.logit_scale_init, "initializer_factor": 1.0, "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": t.vocab_size, "max_position_embeddings": t.block_size,
            "hidden_size": t.n_embd, "intermediate_size": t.hidden, "num_hidden_layers": t.n_layer,
            "num_attention_heads": t.n_head, "hidden_act": _ACT_TO_HF[t.activation], "layer_norm_eps": t.norm_eps,
            "projection_dim": c.projection_dim, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id, "attention_dropout": 0.0, "initializer_range": t.init_std,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "hidden_size": v.n_embd, "intermediate_size": v.hidden,
            "num_hidden_layers": v.n_layer, "num_attention_heads": v.n_head, "hidden_act": _ACT_TO_HF[v.activation],
            "layer_norm_eps": v.norm_eps, "projection_dim": c.projection_dim, "attention_dropout": 0.0,
            "initializer_range": v.init_std,
        },
    }


def clip_weight_map(c: CLIPConfig, hf_keys: set[str] | None = None) -> WeightMap:
    v, t = c.vision, c.text
    if not _is_clip_vision(v) or not _is_clip_text(t):
        raise ValueError("HF CLIPModel needs a CLIP-shaped ViT image tower and a CLIPText text tower")
    te = "text_model.embeddings."
    rules = [
        copy(te + "token_embedding.weight", "text.tok_embed.weight"),
        copy(te + "position_embedding.weight", "text.pos_embed.weight"),
        copy("text_model.final_layer_norm.weight", "text.ln_f.weight"),
        copy("text_model.final_layer_norm.bias", "text.ln_f.bias"),
        copy("visual_projection.weight", "visual_projection.weight"),
        copy("text_projection.weight", "text_projection.weight"),
        copy("logit_scale", "logit_scale"),
    ]
    rules += _block_rules("text_model.encoder.layers.{}", "text.blocks", "self_attn", _CLIP_NAMES, t.n_layer,
                          t.n_embd, True)
    rules += _clip_vision_rules(v, "vision_model.", "vision.")
    return WeightMap(rules, 1, ignore_hf=["*position_ids"])


def _clip_vision_rules(v: ViTConfig, hf: str, ours: str) -> list[Rule]:
    ve = hf + "embeddings."
    rules = [
        copy(ve + "class_embedding", ours + "cls_token"),
        copy(ve + "patch_embedding.weight", ours + "patch_embed.weight"),
        copy(ve + "position_embedding.weight", ours + "pos_embed"),
        copy(hf + "pre_layrnorm.weight", ours + "ln_pre.weight"),  # sic: HF's spelling
        copy(hf + "pre_layrnorm.bias", ours + "ln_pre.bias"),
        copy(hf + "post_layernorm.weight", ours + "ln_f.weight"),
        copy(hf + "post_layernorm.bias", ours + "ln_f.bias"),
    ]
    return rules + _block_rules(hf + "encoder.layers.{}", ours + "blocks", "self_attn", _CLIP_NAMES, v.n_layer,
                                v.n_embd, True)


def clip_vision_weight_map(v: ViTConfig, hf_keys: set[str] | None = None) -> WeightMap:
    """HF ``CLIPVisionModel`` <-> our ``ViT`` image tower alone. transformers 4.x saves it as
    ``vision_model.*``, 5.x with bare names; import follows the file, export writes 4.x names
    (which 5.x also loads)."""
    if not _is_clip_vision(v):
        raise ValueError("HF CLIPVisionModel needs a CLIP-shaped ViT")
    bare = hf_keys is not None and not any(k.startswith("vision_model.") for k in hf_keys)
    return WeightMap(_clip_vision_rules(v, "" if bare else "vision_model.", ""), 1, ignore_hf=["*position_ids"])


def clip_vision_config_from_hf(hf: dict[str, Any]) -> ViTConfig:
    """A ``clip_vision_model`` config.json (CLIPVisionModel) -> our CLIP-shaped ViT."""
    return _clip_vision_from_hf(hf)


def clip_vision_config_to_hf(v: ViTConfig) -> dict[str, Any]:
    if not _is_clip_vision(v):
        raise ValueError("config is not a CLIP-shaped ViT (pre-norm, no patch bias, post-norm on the class token)")
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.num_channels, "hidden_size": v.n_embd,
            "intermediate_size": v.hidden, "num_hidden_layers": v.n_layer, "num_attention_heads": v.n_head,
            "hidden_act": _ACT_TO_HF[v.activation], "layer_norm_eps": v.norm_eps, "attention_dropout": 0.0,
            "initializer_range": v.init_std, "torch_dtype": "float32"}


ADAPTERS: dict[str, HFAdapter] = {
    "vit": HFAdapter(vit_config_from_hf, vit_config_to_hf, vit_weight_map),
    "clip": HFAdapter(clip_config_from_hf, clip_config_to_hf, clip_weight_map),
    # CLIPVisionModel alone; reachable once hf.ADAPTERS maps "clip_vision_model" to this module.
    "clip_vision_model": HFAdapter(clip_vision_config_from_hf, clip_vision_config_to_hf, clip_vision_weight_map),
}
ADAPTER = ADAPTERS["vit"]  # module-level default required by hf.ADAPTERS; get_adapter picks per model_type

__all__ = ["ADAPTER", "ADAPTERS", "clip_config_from_hf", "clip_config_to_hf", "clip_weight_map",
           "clip_vision_config_from_hf", "clip_vision_config_to_hf", "clip_vision_weight_map",
           "vit_config_from_hf", "vit_config_to_hf", "vit_weight_map"]
