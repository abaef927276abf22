"""Weight-only quantisation of linear layers for memory-bound decoding.

At batch 1 a decode step reads every weight once and does two flops per
weight, so its speed is set by bytes read, not by arithmetic. Storing weights
in fewer bits and dequantising inside the matmul kernel cuts those bytes:

* int8, per-output-channel symmetric (LLM.int8() without outliers, Dettmers et
  al., 2022, eq. 1; the "absmax" scheme):
      s_n = max_k |W_nk| / 127,   q_nk = round(W_nk / s_n) in [-127, 127],
      y = x W^T ~= (x q^T) * s   (the scale factors out of the sum over k).
* int4, group-wise asymmetric (the min/max "zero point" scheme of GPTQ, Frantar
  et al., 2023, sec. 3, and of llama.cpp's Q4_1), on groups of ``g``
  consecutive input features:
      s = (max - min) / 15,  q = round((W - min) / s) in [0, 15],
      W ~= (q - 8) * s + z   with  z = min + 8 s
  (the "mid-point" zero that torch's int4 kernels take).

Every quantised layer has two interchangeable paths that the tests compare:
``reference`` (dequantise to a float matrix, then ``F.linear``: easy to read)
and ``fast`` (the fused CPU kernels ``torch._weight_int8pack_mm`` and
``aten._weight_int4pack_mm_for_cpu``, which never materialise the float
matrix; bf16 activations: fp32 ones are cast to bf16 around them, since the
kernels are ~10x slower in fp32). ``fast`` and ``auto`` both take the kernels
wherever they exist and fall back to the reference path elsewhere (GPU).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8", "int4")
QUANT_IMPLS = ("auto", "fast", "reference")

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


class QuantLinear(nn.Module):
    """Common part of the quantised layers: shape bookkeeping, bias, path choice."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.impl = "auto"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float weight this layer stands for."""
        raise NotImplementedError

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fast_available(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return self.forward_reference(x)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # Both CPU kernels are ~10x slower with fp32 activations than with bf16 (measured,
            # docs/inference.md), so fp32 inputs go through them in bf16 and come back in fp32.
            xb = x.to(torch.bfloat16)
            if self.fast_available(xb):
                return self._fast_with_bias(xb).to(x.dtype)
        if not self.fast_available(x):
            return self.forward_reference(x)
        return self._fast_with_bias(x)

    def _fast_with_bias(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_fast(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = (x q^T) * s with q int8 (out, in) and one fp32 scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # all-zero rows keep a finite scale
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)  # follows the model's dtype under .to(dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def fast_available(self, x: torch.Tensor) -> bool:
        return _HAS_INT8_KERNEL and x.device.type == "cpu" and x.dtype == torch.bfloat16

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scales.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        # Scale after the product: sum_k x_k q_nk s_n = s_n sum_k x_k q_nk.
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)



class Int4Linear(QuantLinear):
    """Group-wise 4-bit weights, W ~= (q - 8) * s + z per group of ``group_size`` inputs.

    ``qweight`` (out, in/2) uint8 holds two 4-bit values per byte (low nibble =
    even input index): the readable, serialisable form the reference path
    unpacks. The fused kernel wants its own tiled layout, which is derived
    from it once (``_packed``, not saved).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        out_f, in_f = weight.shape
        if in_f % group_size or group_size % 2:
            raise ValueError(f"Int4Linear: in_features={in_f} is not a multiple of group_size={group_size}")
        super().__init__(in_f, out_f, bias)
        self.group_size = group_size
        w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        # Scales and zeros are rounded to bf16 *before* q is computed, so the stored
        # (q, s, z) dequantise exactly to what the bf16 kernel computes.
        scales = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.bfloat16).float()
        zeros = (lo + 8 * scales).to(torch.bfloat16).float()
        q = (torch.round((w - zeros[..., None]) / scales[..., None]) + 8).clamp(0, 15).to(torch.uint8)
        q = q.reshape(out_f, in_f)
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scales", scales)  # (out, in / group_size)
        self.register_buffer("zeros", zeros)
        self._build_kernel_layout()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        return cls(linear.weight, linear.bias, group_size)

    def unpacked(self) -> torch.Tensor:
        """q as (out, in) integers in [0, 15]."""
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1)
        return q.reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_size
        q = self.unpacked().float().reshape(self.out_features, -1, g)
        w = (q - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _build_kernel_layout(self) -> None:
        # Non-persistent buffers (not saved; moved and cast with the module, and visible to
        # torch.compile as ordinary module state).
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_sz", None, persistent=False)
        if not _HAS_INT4_KERNEL or self.qweight.device.type != "cpu":
            return
        # The kernel needs out_features % 16 == 0: pad with zero rows, slice them off after.
        self._n_pad = -self.out_features % 16
        q = self.unpacked().to(torch.int32)
        s, z = self.scales, self.zeros
        if self._n_pad:
            q = F.pad(q, (0, 0, 0, self._n_pad), value=8)
            s = F.pad(s, (0, 0, 0, self._n_pad))
            z = F.pad(z, (0, 0, 0, self._n_pad))
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self._sz = torch.stack([s.t(), z.t()], dim=-1).contiguous()  # (in/g, out, 2), dtype of scales

    def fast_available(self, x: torch.Tensor) -> bool:
        return self._packed is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        sz = self._sz.to(x.dtype)  # no-op when the model and its activations share a dtype
        shape = x.shape
        # the kernel needs a contiguous (M, K) input (h[:, -1:] of a batch is a strided view)
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, sz)
        if self._n_pad:
            y = y[:, : self.out_features]
        return y.reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        device = self.qweight.device
        out = super()._apply(fn, recurse)
        if self.qweight.device != device:
            self._build_kernel_layout()  # the tiled layout is CPU-only: rebuild or drop it
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _int4_group(in_features: int, group_size: int) -> int | None:
    """Largest group <= group_size (halving, down to 16) dividing in_features."""
    g = group_size
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def quantize(
    model: nn.Module,
    mode: Literal["int8", "int4"] = "int8",
    group_size: int = 32,
    skip: Iterable[str] = (),
    modes: dict[str, str] | None = None,
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (in place) by an Int8Linear / Int4Linear.

    The output projection is quantised too: for SmolLM2 it is the largest matrix
    (49152 x 576). A tied input embedding keeps its float table (a lookup reads one
    row per token, so it costs no bandwidth), i.e. the tie is broken.
    ``skip``: glob patterns of module names to leave in float (e.g. ``["lm_head"]``).
    ``modes``: per-module overrides, glob -> "int8" | "int4" | "none" (first match wins), e.g.
    ``{"lm_head": "int8"}``: SmolLM2's GGUF stores its body in Q4_1, which int4 re-quantises almost
    exactly, but its embedding/output matrix in higher precision, where int4 costs accuracy.
    int4 layers whose in_features has no group size in (group_size, group_size/2, ..., 16)
    fall back to int8. Returns the model.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantisation mode {mode!r}; choose from {QUANT_MODES}")
    rules = [(p, "none") for p in skip] + list((modes or {}).items())
    for _, m in rules:
        if m not in QUANT_MODES + ("none",):
            raise ValueError(f"unknown quantisation mode {m!r} in modes/skip; choose from {QUANT_MODES + ('none',)}")

    def mode_of(name: str) -> str:
        return next((m for p, m in rules if fnmatch.fnmatch(name, p)), mode)

    targets = [(name, m, mode_of(name)) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, lin, layer_mode in targets:
        if layer_mode == "none":
            continue
        with torch.no_grad():
            if layer_mode == "int4" and (g := _int4_group(lin.in_features, group_size)) is not None:
                new = Int4Linear.from_linear(lin, g)
            else:
                new = Int8Linear.from_linear(lin)
            # scales/zeros in the model's dtype, so the kernels need no per-call cast (int4's
            # are bf16 values already; int8's are used in bf16 by the kernel anyway)
            new.to(lin.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def set_quant_impl(model: nn.Module, impl: str) -> None:
    """Switches every quantised layer between "auto", "fast" and "reference"."""
    if impl not in QUANT_IMPLS:
        raise ValueError(f"unknown quantised-matmul impl {impl!r}; choose from {QUANT_IMPLS}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.impl = impl


def quantized_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads for the weights of ``model`` (quantised + float linears)."""
    n = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            n += m.qweight.numel() + m.scales.numel() * 4
        elif isinstance(m, Int4Linear):
            n += m.qweight.numel() + (m.scales.numel() + m.zeros.numel()) * 2
        elif type(m) is nn.Linear:
            n += m.weight.numel() * m.weight.element_size()
    return n
