"""Hugging Face T5 / BART folders <-> polymodal ``seq2seq`` models.

Config fields follow ``T5Config`` (d_model, d_kv, d_ff, num_layers, num_decoder_layers,
num_heads, relative_attention_num_buckets, relative_attention_max_distance,
feed_forward_proj, layer_norm_epsilon, dropout_rate, tie_word_embeddings and, from
transformers 5, scale_decoder_outputs) and ``BartConfig`` (d_model, encoder_layers,
decoder_layers, encoder/decoder_attention_heads, encoder/decoder_ffn_dim,
activation_function, max_position_embeddings, scale_embedding, dropout).

Weight names follow ``modeling_t5.py`` (``T5ForConditionalGeneration``: ``shared``,
``{encoder,decoder}.block.N.layer.K.{SelfAttention,EncDecAttention}.{q,k,v,o}``,
``relative_attention_bias`` in block 0 of each stack, ``layer_norm``,
``DenseReluDense.{wi,wo}`` or ``{wi_0,wi_1,wo}``, ``final_layer_norm``, ``lm_head``) and
``modeling_bart.py`` (``BartForConditionalGeneration``: ``model.shared``,
``model.{encoder,decoder}.embed_positions``, ``layernorm_embedding``,
``layers.N.{self_attn,encoder_attn}.{q,k,v,out}_proj``, ``*_layer_norm``, ``fc1``/``fc2``,
``final_logits_bias``). Separate q/k/v become our fused self-attention ``qkv``, cross k/v our
fused ``kv``, T5 v1.1's wi_0/wi_1 our gated ``fc`` = [gate; up]; exports split them back.
The per-stack ``embed_tokens`` copies of the shared embedding are ignored on import.
"""
from __future__ import annotations

from typing import Any

from ..io import CheckpointError
from ..models.seq2seq import Seq2SeqConfig
from .hf import HFAdapter
from .weight_map import WeightMap, copy, fuse

_ACT_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}


def _need(hf: dict[str, Any], key: str):
    if key not in hf:
        raise CheckpointError(f"config.json: missing field {key!r}")
    return hf[key]


def _act(name: str, field: str) -> str:
    if name not in _ACT_FROM_HF:
        raise CheckpointError(f"config.json: {field}={name!r} is not supported; choose from {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def config_from_hf(hf: dict[str, Any]) -> Seq2SeqConfig:
    mt = hf.get("model_type")
    if mt == "t5":
        return _t5_from_hf(hf)
    if mt == "bart":
        return _bart_from_hf(hf)
    raise CheckpointError(f"config.json: model_type {mt!r} is not an encoder-decoder (t5, bart)")


def _t5_from_hf(hf: dict[str, Any]) -> Seq2SeqConfig:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise CheckpointError(f"config.json: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    gated = parts[0] == "gated" and len(parts) == 2
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # T5Config's own special case
    tie = hf.get("tie_word_embeddings", True)
    n_layer = _need(hf, "num_layers")
    return Seq2SeqConfig(
        name=hf.get("_name_or_path") or "t5", variant="t5", vocab_size=_need(hf, "vocab_size"),
        n_embd=_need(hf, "d_model"), n_head=_need(hf, "num_heads"), head_dim=_need(hf, "d_kv"),
        intermediate_size=_need(hf, "d_ff"), n_layer=n_layer, n_decoder_layer=hf.get("num_decoder_layers") or n_layer,
        norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), prenorm=True,
        mlp="gated" if gated else "plain", activation=_act(act, "feed_forward_proj"), bias=False, attn_scale=1.0,
        position="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), block_size=None,
        final_norm=True, tie_embeddings=tie,
        # transformers < 5 rescales exactly when tied; 5.x saves the choice explicitly.
        rescale_output=hf.get("scale_decoder_outputs", tie), final_logits_bias=False,
        dropout=hf.get("dropout_rate", 0.1), init_std=hf.get("initializer_factor", 1.0) * 0.02,
        pad_token_id=hf.get("pad_token_id", 0), eos_token_id=_one(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
    )


def _one(x):
    return x[0] if isinstance(x, list) else x


def _bart_from_hf(hf: dict[str, Any]) -> Seq2SeqConfig:
    heads, dheads = _need(hf, "encoder_attention_heads"), hf.get("decoder_attention_heads")
    ffn, dffn = _need(hf, "encoder_ffn_dim"), hf.get("decoder_ffn_dim")
    if dheads not in (None, heads) or dffn not in (None, ffn):
        raise CheckpointError(f"config.json: encoder and decoder must share heads and ffn_dim "
                              f"(got {heads}/{dheads} heads, {ffn}/{dffn} ffn_dim)")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise CheckpointError("config.json: pre-norm BART variants (mBART normalize_before/add_final_layer_norm) "
                              "are not supported")
    return Seq2SeqConfig(
        name=hf.get("_name_or_path") or "bart", variant="bart", vocab_size=_need(hf, "vocab_size"),
        n_embd=_need(hf, "d_model"), n_head=heads, intermediate_size=ffn, n_layer=_need(hf, "encoder_layers"),
        n_decoder_layer=hf.get("decoder_layers") or hf["encoder_layers"], norm="layernorm", norm_eps=1e-5,
        prenorm=False, mlp="plain", activation=_act(hf.get("activation_function", "gelu"), "activation_function"),
        bias=True, attn_scale=None, position="learned", block_size=_need(hf, "max_position_embeddings"),
        position_offset=2, embed_norm=True, embed_scale=bool(hf.get("scale_embedding", False)), final_norm=False,
        tie_embeddings=hf.get("tie_word_embeddings", True), rescale_output=False, final_logits_bias=True,
        dropout=hf.get("dropout", 0.1), init_std=hf.get("init_std", 0.02), pad_token_id=hf.get("pad_token_id", 1),
        bos_token_id=hf.get("bos_token_id", 0), eos_token_id=_one(hf.get("eos_token_id", 2)),
        decoder_start_token_id=hf.get("decoder_start_token_id", 2),
    )


def config_to_hf(c: Seq2SeqConfig) -> dict[str, Any]:
    if not isinstance(c, Seq2SeqConfig):
        raise TypeError(f"not a seq2seq config: {type(c).__name__}")
    return _t5_to_hf(c) if c.variant == "t5" else _bart_to_hf(c)


def _require(c: Seq2SeqConfig, what: str, **expected) -> None:
    bad = {k: getattr(c, k) for k, v in expected.items() if getattr(c, k) != v}
    if bad:
        raise ValueError(f"a {what} export needs {expected}; this config has {bad}")


def _t5_to_hf(c: Seq2SeqConfig) -> dict[str, Any]:
    _require(c, "T5", norm="rmsnorm", prenorm=True, bias=False, attn_scale=1.0, position="relative",
             embed_norm=False, embed_scale=False, final_norm=True, final_logits_bias=False)
    if c.activation not in _ACT_TO_HF:
        raise ValueError(f"activation {c.activation!r} has no Hugging Face name")
    if c.mlp == "gated":
        proj = "gated-gelu" if c.activation == "gelu_tanh" else f"gated-{_ACT_TO_HF[c.activation]}"
    else:
        proj = _ACT_TO_HF[c.activation]
    return dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=c.vocab_size, d_model=c.n_embd,
        d_kv=c.hd, d_ff=c.intermediate_size, num_layers=c.n_layer, num_decoder_layers=c.n_dec, num_heads=c.n_head,
        relative_attention_num_buckets=c.relative_buckets, relative_attention_max_distance=c.relative_max_distance,
        dropout_rate=c.dropout, layer_norm_epsilon=c.norm_eps, initializer_factor=1.0, feed_forward_proj=proj,
        is_encoder_decoder=True, use_cache=True, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id, tie_word_embeddings=c.tie_embeddings,
        scale_decoder_outputs=c.rescale_output,
    )


def _bart_to_hf(c: Seq2SeqConfig) -> dict[str, Any]:
    _require(c, "BART", norm="layernorm", prenorm=False, bias=True, attn_scale=None, position="learned",
             position_offset=2, embed_norm=True, final_norm=False, mlp="plain", rescale_output=False,
             final_logits_bias=True, norm_eps=1e-5)
    if c.hd * c.n_head != c.n_embd:
        raise ValueError(f"BART needs head_dim * n_head == n_embd ({c.hd} * {c.n_head} != {c.n_embd})")
    if c.activation not in _ACT_TO_HF:
        raise ValueError(f"activation {c.activation!r} has no Hugging Face name")
    return dict(
        architectures=["BartForConditionalGeneration"], model_type="bart", vocab_size=c.vocab_size, d_model=c.n_embd,
        encoder_layers=c.n_layer, decoder_layers=c.n_dec, encoder_attention_heads=c.n_head,
        decoder_attention_heads=c.n_head, encoder_ffn_dim=c.intermediate_size, decoder_ffn_dim=c.intermediate_size,
        activation_function=_ACT_TO_HF[c.activation], max_position_embeddings=c.block_size, dropout=c.dropout,
        attention_dropout=c.dropout, activation_dropout=0.0, init_std=c.init_std, scale_embedding=c.embed_scale,
        is_encoder_decoder=True, use_cache=True, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, decoder_start_token_id=c.decoder_start_token_id,
        forced_eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_embeddings,
    )


def _untie_if_file_has_head(c: Seq2SeqConfig, hf_keys: set[str] | None) -> None:
    """A file that carries its own ``lm_head.weight`` (T5 v1.1 saved by transformers 5, which writes
    tie_word_embeddings=true yet keeps a separate head) gets an untied head: with equal values
    the logits are the same, with different ones this is the only correct load."""
    if hf_keys is not None and "lm_head.weight" in hf_keys and c.tie_embeddings:
        c.tie_embeddings = False


def weight_map(c: Seq2SeqConfig, hf_keys: set[str] | None = None) -> WeightMap:
    _untie_if_file_has_head(c, hf_keys)
    rules = _t5_rules(c) if c.variant == "t5" else _bart_rules(c)
    if not c.tie_embeddings:
        rules.append(copy("lm_head.weight", "lm_head.weight"))
    p = "" if c.variant == "t5" else "model."
    ignore_hf = [f"{p}encoder.embed_tokens.weight", f"{p}decoder.embed_tokens.weight",
                 # T5Model/T5ForConditionalGeneration ignore this unused tensor of old checkpoints too
                 "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"]
    return WeightMap(rules, 0, ignore_hf=ignore_hf, ignore_ours=["lm_head.weight"] if c.tie_embeddings else [])


def _t5_rules(c: Seq2SeqConfig) -> list:
    inner, ff = c.n_head * c.hd, c.intermediate_size
    rules = [copy("shared.weight", "embed.weight")]
    for side, n in (("encoder", c.n_layer), ("decoder", c.n_dec)):
        rules += [
            copy(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{side}.rel_bias.weight"),
            copy(f"{side}.final_layer_norm.weight", f"{side}.ln_f.weight"),
        ]
        for i in range(n):
            h, o = f"{side}.block.{i}.layer.", f"{side}.blocks.{i}."
            sa = f"{h}0.SelfAttention."
            rules += [
                fuse([f"{sa}q.weight", f"{sa}k.weight", f"{sa}v.weight"], f"{o}attn.qkv.weight", [inner] * 3),
                copy(f"{sa}o.weight", f"{o}attn.proj.weight"),
                copy(f"{h}0.layer_norm.weight", f"{o}norm1.weight"),
            ]
            ffl = 1
            if side == "decoder":
                ca = f"{h}1.EncDecAttention."
                rules += [
                    copy(f"{ca}q.weight", f"{o}cross_attn.q.weight"),
                    fuse([f"{ca}k.weight", f"{ca}v.weight"], f"{o}cross_attn.kv.weight", [inner] * 2),
                    copy(f"{ca}o.weight", f"{o}cross_attn.proj.weight"),
                    copy(f"{h}1.layer_norm.weight", f"{o}norm_cross.weight"),
                ]
                ffl = 2
            d = f"{h}{ffl}.DenseReluDense."
            if c.mlp == "gated":  # ours: fc = [gate; up] = [wi_0; wi_1]
                rules.append(fuse([f"{d}wi_0.weight", f"{d}wi_1.weight"], f"{o}mlp.fc.weight", [ff, ff]))
            else:
                rules.append(copy(f"{d}wi.weight", f"{o}mlp.fc.weight"))
            rules += [copy(f"{d}wo.weight", f"{o}mlp.proj.weight"), copy(f"{h}{ffl}.layer_norm.weight", f"{o}norm2.weight")]
    return rules


def _wb(hf: str, ours: str) -> list:
    return [copy(f"{hf}.weight", f"{ours}.weight"), copy(f"{hf}.bias", f"{ours}.bias")]


def _bart_rules(c: Seq2SeqConfig) -> list:
    d = c.n_embd
    rules = [copy("model.shared.weight", "embed.weight"), copy("final_logits_bias", "final_logits_bias")]
    for side, n in (("encoder", c.n_layer), ("decoder", c.n_dec)):
        m = f"model.{side}."
        rules += [copy(f"{m}embed_positions.weight", f"{side}.wpe.weight"), *_wb(f"{m}layernorm_embedding", f"{side}.ln_emb")]
        for i in range(n):
            h, o = f"{m}layers.{i}.", f"{side}.blocks.{i}."
            rules += [fuse([f"{h}self_attn.{p}_proj.{w}" for p in "qkv"], f"{o}attn.qkv.{w}", [d] * 3)
                      for w in ("weight", "bias")]
            rules += [*_wb(f"{h}self_attn.out_proj", f"{o}attn.proj"), *_wb(f"{h}self_attn_layer_norm", f"{o}norm1")]
            if side == "decoder":
                rules += _wb(f"{h}encoder_attn.q_proj", f"{o}cross_attn.q")
                rules += [fuse([f"{h}encoder_attn.{p}_proj.{w}" for p in "kv"], f"{o}cross_attn.kv.{w}", [d] * 2)
                          for w in ("weight", "bias")]
                rules += [*_wb(f"{h}encoder_attn.out_proj", f"{o}cross_attn.proj"),
                          *_wb(f"{h}encoder_attn_layer_norm", f"{o}norm_cross")]
            rules += [*_wb(f"{h}fc1", f"{o}mlp.fc"), *_wb(f"{h}fc2", f"{o}mlp.proj"),
                      *_wb(f"{h}final_layer_norm", f"{o}norm2")]
    return rules


ADAPTER = HFAdapter(config_from_hf=config_from_hf, config_to_hf=config_to_hf, weight_map=weight_map)
