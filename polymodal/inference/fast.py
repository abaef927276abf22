"""Fast decoding: pick dtype / quantisation / compilation per device, and a static-shape decode step.

A decode step of a causal LM (one new token per row, attending to the KV cache)
is memory-bound: it reads all weights once (Williams et al., 2009, the
"roofline" model: time >= bytes / bandwidth). On CPU the levers are therefore

1. fewer weight bytes: bf16 (2 B), int8 (1 B) or int4 (0.5 B + group scales)
   weights (``polymodal.inference.quant``);
2. less per-op overhead: a SmolLM2 step launches ~30 small ops per layer, which
   costs as much as the matmuls at batch 1; ``torch.compile`` fuses the
   elementwise ones (RMSNorm, RoPE, SwiGLU, residual adds) into a few C++ loops.

A compiled graph is specialised to tensor shapes, and the ordinary cache
returns K/V of a growing length ``pos + 1``, so every step would be a new shape.
``FastDecoder`` instead attends over the *whole* preallocated cache with a
boolean key mask (``cache.key_valid``: slots not yet written are False, which
gives causality for a single query), and writes the new K/V at a position held
in a tensor. The decode step then has one static shape per (batch, cache length)
and compiles once. Attention over the unused tail of the cache is wasted work,
so size the cache to prompt + new tokens (``generate`` does).

Prefill (many tokens) and anything else unusual (no cache, ``inputs_embeds``,
explicit ``position_ids``) goes to the wrapped model's ordinary forward, which
writes the same cache, so the two paths interleave freely.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import KVCache
from ..nn.positions import apply_rotary
from .quant import QuantLinear, quantize

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class FastDecoder(nn.Module):
    """Wraps a GPT-family model; single-token cached steps run a static-shape (optionally
    compiled) decode step, everything else the model's own forward.

    Exposes ``config``, ``new_cache`` and the GPT ``forward`` signature, so
    ``polymodal.generate.generate`` and the server use it like the model itself.
    """

    def __init__(self, model: nn.Module, compile: bool = False, compile_mode: str | None = None,
                 compile_scope: Literal["block", "step"] = "block", static: bool | None = None):
        super().__init__()
        missing = [a for a in ("config", "wte", "blocks", "ln_f", "lm_head", "new_cache") if not hasattr(model, a)]
        if missing:
            raise TypeError(f"FastDecoder needs a GPT-family decoder (polymodal.models.gpt.GPT); "
                            f"{type(model).__name__} has no {', '.join(missing)}")
        self.model = model
        self.config = model.config
        self.compiled = False
        self._block = _block_step
        self._step = self._decode_impl
        self.compile_error: str | None = None
        # Eager, the static step is *slower* than the model's own cached forward (it attends
        # over the whole buffer through a masked SDPA; measured 4.3 vs 5.4-6 tok/s, SmolLM2 int4
        # batch 1), so by default it is used only when compiled.
        self.static = static
        if compile:
            self.enable_compile(compile_mode, compile_scope)

    # -- public API ------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        if self.compiled and max_len is not None:
            # Each cache length is a new static shape (a recompile): round up to a multiple of
            # 128 so prompts of similar length share one compiled step.
            max_len = min(-(-max_len // 128) * 128, self.config.block_size)
        return self.model.new_cache(batch_size, max_len, dtype=dtype, device=device)

    def enable_compile(self, mode: str | None = None, scope: Literal["block", "step"] = "block") -> bool:
        """Compiles the decode step; returns False (and keeps eager) if torch.compile is unusable.

        scope "block": one block at a time. The blocks share code and shapes, so one
        compiled graph serves all of them (compiling the whole 30-layer SmolLM2 step took
        ~4.5 min on the loaded 2-core machine, a block ~45 s); Python still runs the loop.
        scope "step": the whole step is one graph (no per-block Python/guard overhead)."""
        if scope not in ("block", "step"):
            raise ValueError(f"compile scope must be 'block' or 'step', got {scope!r}")
        try:
            import torch._dynamo  # noqa: F401
            if scope == "block":
                self._block = torch.compile(_block_step, mode=mode, dynamic=False, fullgraph=True)
            else:
                self._step = torch.compile(self._decode_impl, mode=mode, dynamic=False, fullgraph=True)
            self.compiled = True
        except Exception as e:  # pragma: no cover - depends on the platform's compiler
            self.compile_error = f"{type(e).__name__}: {e}"
            self._block, self._step, self.compiled = _block_step, self._decode_impl, False
        return self.compiled

    def supports_static_decode(self) -> bool:
        c = self.config
        kinds = set(getattr(c, "attention_pattern", ("causal",)))
        return kinds <= {"causal", "local"}

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False,
                inputs_embeds=None):
        static = self.compiled if self.static is None else self.static
        if (static and cache is not None and inputs_embeds is None and position_ids is None
                and input_ids.shape[1] == 1 and type(cache) is KVCache and self.supports_static_decode()):
            return self.decode(input_ids, cache, attention_mask)
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          last_only=last_only, inputs_embeds=inputs_embeds)

    def decode(self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None):
        """One token per row (B, 1) -> logits (B, 1, V); writes slot ``cache.pos`` and advances it."""
        pos = cache.pos
        if pos + 1 > cache.max_len:
            raise ValueError(f"KV cache overflow: {pos} cached + 1 new token > capacity {cache.max_len}")
        if pos + 1 > self.config.block_size:
            raise ValueError(f"sequence of {pos + 1} tokens is longer than the model's context "
                             f"({self.config.block_size} tokens)")
        if attention_mask is None:
            new_valid = torch.ones(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        else:
            new_valid = attention_mask[:, -1:].to(torch.bool)
            cache.has_padding = cache.has_padding or not bool(new_valid.all())
        pos_t = torch.tensor([pos], device=input_ids.device)
        kv = cache.key_valid.clone() if self.compiled else None
        try:
            logits = self._step(input_ids, pos_t, new_valid, cache.k, cache.v, cache.key_valid)
        except Exception as e:
            if not self.compiled:
                raise
            # A compile failure (no C++ compiler, an op without a lowering): eager from now on.
            # Only key_valid could have been written before the failure; K/V slot ``pos`` is
            # simply rewritten.
            self.compile_error = f"{type(e).__name__}: {e}"
            self._block, self._step, self.compiled = _block_step, self._decode_impl, False
            cache.key_valid.copy_(kv)
            logits = self._decode_impl(input_ids, pos_t, new_valid, cache.k, cache.v, cache.key_valid)
        cache.advance(1)
        return logits

    # -- the static-shape step (what torch.compile sees) -----------------------------------
    def _decode_impl(self, ids, pos_t, new_valid, ks: list, vs: list, key_valid):
        m, c = self.model, self.config
        # The new token's position = number of real tokens before it (left padding is not
        # counted), exactly as GPT.hidden_states numbers positions.
        positions = key_valid.sum(-1, keepdim=True)  # (B, 1)
        key_valid.index_copy_(1, pos_t, new_valid)
        slots = torch.arange(key_valid.shape[1], device=ids.device)
        masks = {"causal": key_valid[:, None, None, :]}  # unwritten slots are False: causal for 1 query
        if "local" in c.attention_pattern:
            masks["local"] = masks["causal"] & (slots > pos_t - c.local_window)[None, None, None, :]
        x = m.wte(ids)
        if m.wpe is not None:
            x = x + m.wpe(positions).to(x.dtype)
        rope = m.rope(positions) if m.rope is not None else None
        for i, blk in enumerate(m.blocks):
            j = blk.attn.layer_idx
            x = self._block(blk, x, rope, ks[j], vs[j], pos_t, masks[c.layer_kind(i)])
        return m.lm_head(m.ln_f(x))


def _block_step(blk, x, rope, k_buf, v_buf, pos_t, mask):
    """``Block.forward`` for one new token attending over the whole cache buffer."""
    x = blk._sub(x, blk.norm1, lambda h: _attend(blk.attn, h, rope, k_buf, v_buf, pos_t, mask))
    return blk._sub(x, blk.norm2, blk.mlp)


def _attend(attn, h, rope, k_buf, v_buf, pos_t, mask):
    """Self-attention of one new token over the full cache buffer (see module docstring)."""
    b = h.shape[0]
    q_out, kv_out = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    q, k, v = attn.qkv(h).split([q_out, kv_out, kv_out], dim=-1)
    q, k, v = attn._heads(q, attn.n_head), attn._heads(k, attn.n_kv_head), attn._heads(v, attn.n_kv_head)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k_buf.index_copy_(2, pos_t, k.to(k_buf.dtype))
    v_buf.index_copy_(2, pos_t, v.to(v_buf.dtype))
    y = F.scaled_dot_product_attention(q, k_buf.to(q.dtype), v_buf.to(q.dtype), attn_mask=mask, scale=attn.scale,
                                       enable_gqa=attn.n_head != attn.n_kv_head)
    return attn.proj(y.transpose(1, 2).reshape(b, 1, q_out))


# -- choosing the defaults ---------------------------------------------------------------------

def default_plan(device: torch.device | str) -> dict:
    """The defaults ``prepare_for_decoding`` picks per device (measured: docs/inference.md)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        # GPUs have the bandwidth and tensor cores for bf16; compile removes launch overhead.
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"dtype": torch.bfloat16 if bf16_ok else torch.float16, "quant": None, "compile": True}
    if dev.type == "cpu":
        # int4 group-wise weights with the fused AVX-512/AVX2 kernel read 4x fewer bytes than bf16.
        return {"dtype": torch.bfloat16, "quant": "int4", "compile": False}
    return {"dtype": torch.float32, "quant": None, "compile": False}


def prepare_for_decoding(
    model: nn.Module,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    quant: Literal["auto", "int8", "int4", "checkpoint", "none"] | None = "auto",
    compile: bool | Literal["auto"] = "auto",
    group_size: int = 32,
    compile_mode: str | None = None,
    compile_scope: Literal["block", "step"] = "block",
    quant_modes: dict[str, str] | None = None,
) -> FastDecoder:
    """Moves/casts/quantises ``model`` (in place) and wraps it in a ``FastDecoder``.

    ``"auto"`` picks the measured fastest correct setting for ``device`` (see
    ``default_plan``); pass explicit values to override. Quantisation applies to
    CPU only by default; ``quant="none"`` keeps float weights. Layers that the checkpoint stores
    quantised (a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q5_* blocks, ``model.quant_source``) keep the file's own
    codes and scales with any quantising ``quant``; ``quant="checkpoint"`` quantises only those.
    ``quant_modes``: per-layer overrides for ``quantize``; None = with int4, keep the output
    projection in int8 (on SmolLM2 an int4 lm_head cut the greedy agreement with fp32 from
    32/32 to 5-13 tokens; int8 there costs ~3 ms/token more at batch 1, docs/inference.md).
    Pass ``{}`` to quantise every layer with ``quant``.
    """
    plan = default_plan(device)
    if dtype == "auto":
        dtype = plan["dtype"]
    elif isinstance(dtype, str):
        try:
            dtype = _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)} or 'auto'") from None
    if quant == "auto":
        quant = plan["quant"]
    if quant == "none":
        quant = None
    if compile == "auto":
        compile = plan["compile"]
    model = model.to(device=device, dtype=dtype).eval()
    if quant is not None and not any(isinstance(mm, QuantLinear) for mm in model.modules()):
        if quant_modes is None:
            quant_modes = {"lm_head": "int8"} if quant == "int4" else {}
        quantize(model, quant, group_size=group_size, modes=quant_modes)
    for p in model.parameters():
        p.requires_grad_(False)
    return FastDecoder(model, compile=bool(compile), compile_mode=compile_mode, compile_scope=compile_scope)


def resolve_quant(model: nn.Module, device: torch.device | str, quant: str = "auto") -> str | None:
    """What a command's ``--quantize`` means for ``model``: "auto" -> "checkpoint" on CPU when the
    checkpoint is stored quantised (``model.quant_source``: it then runs its own blocks in the int4
    kernels, exact to the file), else None (float, as stored); "none" -> None; others unchanged."""
    if quant == "auto":
        has_blocks = getattr(model, "quant_source", None) is not None
        return "checkpoint" if has_blocks and torch.device(device).type == "cpu" else None
    if quant in ("none", None):
        return None
    if quant not in ("int8", "int4", "checkpoint"):
        raise ValueError(f"unknown quantisation {quant!r}; choose from auto, none, int8, int4, checkpoint")
    return quant


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                  cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float]:
    """Minimal greedy loop (no padding, no EOS) used by the benchmarks and tests.

    Returns (new tokens (B, max_new_tokens), decode seconds excluding the prefill)."""
    b, t = input_ids.shape
    cache = model.new_cache(b, t + max_new_tokens, dtype=cache_dtype)
    out = []
    with torch.inference_mode():
        logits = model(input_ids, cache=cache, last_only=True)
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            if i < max_new_tokens - 1:
                logits = model(tok, cache=cache, last_only=True)
        dt = time.perf_counter() - t0
    return torch.cat(out, 1), dt
