"""Weight-only quantisation of linear layers for memory-bound decoding.

At batch 1 a decode step reads every weight once and does two flops per
weight, so its speed is set by bytes read, not by arithmetic. Storing weights
in fewer bits and dequantising inside the matmul kernel cuts those bytes.
Three layouts, each exact to what it stores:

* ``Int8Linear``: int8, per-output-channel symmetric (LLM.int8() without outliers,
  Dettmers et al., 2022, eq. 1; the "absmax" scheme):
      s_n = max_k |W_nk| / 127,   q_nk = round(W_nk / s_n) in [-127, 127],
      y = x W^T ~= (x q^T) * s   (the scale factors out of the sum over k).
* ``Int4Linear``: 4-bit codes in groups of ``g`` consecutive inputs, affine
  (llama.cpp's Q4_1 / Q4_K, the min/max "zero point" scheme of GPTQ, Frantar et al.,
  2023, sec. 3) or symmetric (Q4_0):
      W = s q + m   (q in [0, 15]),   or   W = s (q - 8)   when there is no min m.
  torch's kernel takes the "mid-point" zero z = m + 8 s: W = (q - 8) s + z.
* ``Int8GroupLinear``: 8-bit codes in groups of ``g`` inputs, W = s q (+ m)
  (llama.cpp's Q8_0, Q5_0, Q5_1, Q5_K). torch has no grouped int8 kernel, so the
  codes are split into two 4-bit planes, q = 16 h + l with h = q >> 4 in [-8, 7] and
  l = q & 15, which the int4 kernel runs as one matmul over 2K inputs:
      W = [(h + 8) - 8] (16 s)  +  [l - 8] s + (8 s + m),   x' = [x, x].
  It reads 1 byte per weight, like int8, with the file's own per-group scales.

``quantize`` builds these from float weights, or -- when the model was loaded from
a quantised GGUF file -- from the file's own blocks (``model.quant_source``), with
no re-quantisation: the codes are the file's, and the scales and mins are kept in
fp32, which holds every fp16 ``d``/``m`` and every 6-bit x fp16 product of a K-quant
exactly, so ``dequantize()`` equals ``gguf.quants.dequantize`` bit for bit.

Every quantised layer has three interchangeable paths that the tests compare:
``reference`` (dequantise to a float matrix, then ``F.linear``: easy to read,
exact), ``kernel`` (the fused CPU kernels ``torch._weight_int8pack_mm`` and
``aten._weight_int4pack_mm_for_cpu``, which never materialise the float matrix) and
``dense`` (``F.linear`` with a cached bf16 copy of the dequantised weight). Both fast
paths compute in bf16 (fp32 activations are cast around them: the CPU kernels run
~40x slower with fp32 or fp16 activations, and their scales must have the
activations' dtype, so the kernel sees the fp32 scales rounded once to bf16).

Kernel choice per shape (``QuantLinear.path_for``): the kernels are weight-streaming
GEMV loops whose time grows linearly with the number of activation rows M (each row
re-dequantises the packed weight: t_k = M c N K, with c measured at 1 thread as
0.029 ns per weight-row for int4, 0.056 for the two-plane int8 groups, 0.063 for
int8 per channel), while a dense bf16 GEMM of a matrix read from DRAM costs
~2 N K / BW, flat in M up to tens of rows on a CPU with native bf16. The dense copy
wins from M* = 2 / (BW c) rows: at the ~20 GB/s of a quiet 2-core machine 3.4
(int4) and ~1.7 (int8) -- ``DENSE_ROWS`` = 4 and 2 (rows = batch x new tokens, so
a batch-8 decode step or any prefill). More threads divide c, so M* grows with the
thread count. The copy is built on first use (2 bytes per weight of memory;
``set_quant_impl(model, "fast")`` never builds it). On CPUs without native bf16 a
dense bf16 GEMM is barely faster than fp32 and int4 stayed fastest at batch 8
(docs/inference.md), so the thresholds are 32 and 16 there. These are estimates
from a loaded machine: measure the crossover on a quiet one with
``bench/smollm2_decode.py --modes bf16,int4,int4-kernel --batch 1 2 4 8``.

The output projection's logits get one more step (``QuantLinear._refine``): bf16
logits near |25| are 0.125 apart, coarser than the top-2 margin of a small LM, so its
16 largest logits are recomputed in fp32 from the exact weight rows.
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Iterable, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8", "int4")
QUANT_IMPLS = ("auto", "fast", "dense", "reference")

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
# logits of an output projection recomputed in fp32 per row: the true top token is among the bf16
# top 16 unless 16 logits lie within the bf16 rounding (~0.1 at |logit| ~ 25) of the maximum
REFINE_TOP = 16

# Rows (product of the leading dims of x) at or above which "auto" takes the dense bf16 copy,
# by whether the CPU has native bf16 (AVX512-BF16 / AMX) and kernel family: M* = 2 / (BW c)
# (module docstring). Estimates; re-measure with bench/smollm2_decode.py on a quiet machine.
DENSE_ROWS = {
    True: {"int4": 4, "int8": 2},  # native bf16: dense bf16 ~flat in rows, kernels ~linear
    False: {"int4": 32, "int8": 16},  # emulated bf16: the kernels stayed ahead at batch 8
}


@functools.lru_cache(maxsize=None)
def _native_bf16() -> bool:
    from ..runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


def default_dense_rows(kind: str) -> int:
    return DENSE_ROWS[_native_bf16()][kind]


class QuantFactors(NamedTuple):
    """A weight as the integers and per-group factors that define it, exactly:

    ``bits == 4``: q (out, in) uint8 in [0, 15]; W = s q + m, or W = s (q - 8) when mins is None.
    ``bits == 8``: q (out, in) int8;            W = s q + m, or W = s q       when mins is None.
    scales / mins: (out, in / group_size) float32, group g covering inputs [g k, g (k + 1)).
    """
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group_size: int
    bits: int
    label: str = ""  # where the factors came from, e.g. "GGUF Q4_1"


class QuantSource(Protocol):
    """What a loader attaches as ``model.quant_source``: the stored quantisation of a weight, by
    parameter name (e.g. ``"blocks.0.attn.qkv.weight"``), or None where it has none."""

    def factors(self, name: str) -> QuantFactors | None: ...


class QuantLinear(nn.Module):
    """Common part of the quantised layers: shape bookkeeping, bias, path choice, dense copy."""

    in_features: int
    out_features: int
    kind = "int8"  # the kernel family, for DENSE_ROWS
    _keep_dtype: tuple[str, ...] = ("_dense",)  # buffers that a model-wide .to(dtype) must not cast

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.impl = "auto"
        self.dense_rows: int | None = default_dense_rows(self.kind)
        # > 0 on an output projection: its top ``refine_top`` logits are recomputed in fp32 (below)
        self.refine_top = 0
        self.register_buffer("_dense", None, persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float weight this layer stands for."""
        return self.dequantize_rows(None).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        """Rows ``rows`` (all if None) of the weight, float32, exactly as ``dequantize`` gives them."""
        raise NotImplementedError

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel on bf16 ``x`` (no bias)."""
        raise NotImplementedError

    def has_kernel(self) -> bool:
        raise NotImplementedError

    def path_for(self, x: torch.Tensor) -> Literal["kernel", "dense", "reference"]:
        """Which path ``forward(x)`` takes (see the module docstring for the rule)."""
        if self.impl == "reference":
            return "reference"
        cpu_fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        if self.impl == "dense":
            return "dense"
        if not (cpu_fast and self.has_kernel()):
            return "reference"
        if self.impl == "auto" and self.dense_rows is not None and x.numel() >= self.dense_rows * self.in_features:
            # Inside a torch.compile trace the copy cannot be built (a mutation of module state);
            # an eager prefill builds it before any compiled multi-row step runs.
            if self._dense is not None or not torch.compiler.is_compiling():
                return "dense"
        return "kernel"

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised weight in ``dtype``, cached (non-persistent: not saved)."""
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = self.dequantize(torch.float32).to(dtype)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path_for(x)
        if path == "reference":
            return self.forward_reference(x)
        # both fast paths run in bf16 on CPU (fp32 activations: the kernels are ~40x slower in fp32)
        cdtype = torch.bfloat16 if x.device.type == "cpu" and x.dtype == torch.float32 else x.dtype
        xc = x.to(cdtype)
        y = self.forward_fast(xc) if path == "kernel" else F.linear(xc, self.dense_weight(cdtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.refine_top and y.dtype != torch.float32:
            return self._refine(x, y)
        return y.to(x.dtype)

    def _refine(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """fp32 logits whose ``refine_top`` largest entries are exact fp32 dot products.

        bf16 output rounding spaces logits near 25 by 0.125, while the top-2 margin of a small
        LM is often smaller (SmolLM2 on "What is the capital of France?": "The" 25.33 vs "L"
        25.24 in fp32), so a bf16 argmax is decided by rounding ties. The kernels accumulate
        in fp32 but must return bf16; recomputing the few candidates from the exact weight rows
        (k x in_features multiply-adds per row) restores fp32 decisions, as llama.cpp's fp32
        logits have. The other logits keep their bf16 values (sampling-level error, ~0.4%)."""
        k = min(self.refine_top, self.out_features)
        y32 = y.float()
        idx = y32.topk(k, dim=-1).indices  # (..., k); the true top token is among them
        lead = idx.shape[:-1]
        w = self.dequantize_rows(idx.reshape(-1)).reshape(*lead, k, self.in_features)
        exact = (w @ x.float().unsqueeze(-1)).squeeze(-1)  # (..., k)
        if self.bias is not None:
            exact = exact + self.bias.float()[idx]
        return y32.scatter(-1, idx, exact)

    def _apply(self, fn, recurse=True):
        # A model-wide .to(bfloat16) must not round the stored scales (exact to the file) or the
        # kernel's bf16 tables: only device moves apply to the _keep_dtype buffers.
        keep = {k: self._buffers[k] for k in self._keep_dtype if self._buffers.get(k) is not None}
        device = self._device()
        out = super()._apply(fn, recurse)
        for k, v in keep.items():
            moved = self._buffers[k]
            if moved is not None and moved.dtype != v.dtype:
                self._buffers[k] = v.to(moved.device)
        if self._device() != device:
            self._dense = None
            self._on_device_change()
        return out

    def _device(self) -> torch.device:
        return self.qweight.device

    def _on_device_change(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = (x q^T) * s with q int8 (out, in) and one scale per output channel."""

    kind = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # all-zero rows keep a finite scale
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)  # follows the model's dtype: the kernel takes x's dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantize_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return q.float() * s.float()[:, None]

    def has_kernel(self) -> bool:
        return _HAS_INT8_KERNEL

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.qweight, self.scales.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        # Scale after the product: sum_k x_k q_nk s_n = s_n sum_k x_k q_nk.
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _check_factors(f: QuantFactors, bits: int) -> tuple[int, int, int]:
    out_f, in_f = f.q.shape
    g = f.group_size
    if f.bits != bits or in_f % g or tuple(f.scales.shape) != (out_f, in_f // g) or (
            f.mins is not None and tuple(f.mins.shape) != tuple(f.scales.shape)):
        raise ValueError(f"inconsistent {bits}-bit factors: q {tuple(f.q.shape)}, scales {tuple(f.scales.shape)}, "
                         f"group {g}, bits {f.bits}")
    return out_f, in_f, g


class _Int4KernelLayout(QuantLinear):
    """The int4 kernel's side of Int4Linear and Int8GroupLinear: each gives its codes in [0, 15]
    (``_kernel_codes``, (out, K')) and per-group [scale, zero] (``_kernel_factors``, float64
    (out, K'/g, 2), exact) such that the kernel's W = (code - 8) scale + zero is the layer's weight."""

    _keep_dtype = ("scales", "mins", "_sz", "_dense")
    group_size: int

    def _kernel_codes(self) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_factors(self) -> torch.Tensor:
        raise NotImplementedError

    def _build_kernel_layout(self) -> None:
        # Non-persistent buffers (not saved; moved with the module, and visible to torch.compile
        # as ordinary module state).
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_sz", None, persistent=False)
        # The kernel needs out % 16 == 0: extra rows are zero-weight (code 8, scale 0, zero 0)
        # and sliced off after the matmul.
        self._n_pad = -self.out_features % 16
        if not self.has_kernel() or self.qweight.device.type != "cpu":
            return
        q = F.pad(self._kernel_codes().to(torch.int32), (0, 0, 0, self._n_pad), value=8)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self._sz = self.kernel_table(torch.bfloat16)

    def kernel_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's (K'/g, out_padded, 2) scale/zero table in ``dtype`` (the activations'
        dtype, which the kernel requires): one rounding from the exact float64 values, so in
        float32 the kernel uses exactly the layer's weights (bf16: the fast path's rounding)."""
        sz = F.pad(self._kernel_factors(), (0, 0, 0, 0, 0, self._n_pad))
        return sz.transpose(0, 1).to(dtype).contiguous()

    def has_kernel(self) -> bool:
        return _HAS_INT4_KERNEL and self.group_size in INT4_KERNEL_GROUPS

    def path_for(self, x: torch.Tensor):
        path = super().path_for(x)
        return "reference" if path == "kernel" and self._packed is None else path

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K') activations -> (M, out); fp32 ``x2`` runs the (slow, exact-weight) fp32 kernel."""
        sz = self._sz if x2.dtype == torch.bfloat16 else self.kernel_table(x2.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, sz)
        return y[:, : self.out_features] if self._n_pad else y

    def _on_device_change(self) -> None:
        self._build_kernel_layout()  # the tiled layout is CPU-only: rebuild or drop it

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}" + (f", {self.label}" if self.label else "")


class Int4Linear(_Int4KernelLayout):
    """Group-wise 4-bit weights, W = s q + m (or s (q - 8) without mins) per group of ``group_size``.

    ``qweight`` (out, in/2) uint8 holds two 4-bit values per byte (low nibble = even input index):
    the readable, serialisable form the reference path unpacks. ``scales``/``mins`` are float32 and
    keep that dtype under ``.to(dtype)``. The fused kernel wants its own tiled layout, which is
    derived from them once (``_packed`` and the bf16 ``_sz``, not saved).
    """

    kind = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        out_f, in_f = weight.shape
        if in_f % group_size or group_size % 2:
            raise ValueError(f"Int4Linear: in_features={in_f} is not a multiple of group_size={group_size}")
        w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        # The kernel's scale and mid-point zero are rounded to bf16 *before* q is computed, so the
        # stored (q, s, m = z - 8 s) dequantise to what the bf16 kernel computes.
        scales = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.bfloat16).float()
        zeros = (lo + 8 * scales).to(torch.bfloat16).float()
        q = (torch.round((w - zeros[..., None]) / scales[..., None]) + 8).clamp(0, 15).to(torch.uint8)
        self._init(QuantFactors(q.reshape(out_f, in_f), scales, zeros - 8 * scales, group_size, 4, "min/max int4"),
                   bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        return cls(linear.weight, linear.bias, group_size)

    @classmethod
    def from_factors(cls, f: QuantFactors, bias: torch.Tensor | None = None) -> "Int4Linear":
        self = cls.__new__(cls)
        self._init(f, bias)
        return self

    def _init(self, f: QuantFactors, bias: torch.Tensor | None) -> None:
        out_f, in_f, g = _check_factors(f, 4)
        if g % 2:
            raise ValueError(f"Int4Linear: group_size={g} must be even")
        QuantLinear.__init__(self, in_f, out_f, bias)
        self.group_size, self.label = g, f.label
        q = f.q.to(torch.uint8)
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scales", f.scales.float().contiguous())  # (out, in / group_size)
        self.register_buffer("mins", None if f.mins is None else f.mins.float().contiguous())
        self._build_kernel_layout()

    def unpacked(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """q as (out, in) integers in [0, 15] (only ``rows`` if given)."""
        packed = self.qweight if rows is None else self.qweight[rows]
        q = torch.stack([packed & 15, packed >> 4], dim=-1)
        return q.reshape(packed.shape[0], self.in_features)

    def dequantize_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        # The same fp32 operations, in the same order, as gguf.quants / ggml's dequantize_row_*:
        # s q + m (Q4_1: d q + m; Q4_K: (d sc) q - dmin mn) and s (q - 8) (Q4_0), one rounding each.
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        q = self.unpacked(rows).float()
        n = q.shape[0]
        q = q.reshape(n, -1, self.group_size)
        if self.mins is None:
            w = (q - 8) * pick(self.scales)[..., None]
        else:
            w = q * pick(self.scales)[..., None] + pick(self.mins)[..., None]
        return w.reshape(n, self.in_features)

    def _kernel_codes(self) -> torch.Tensor:
        return self.unpacked()

    def _kernel_factors(self) -> torch.Tensor:
        s = self.scales.double()
        z = torch.zeros_like(s) if self.mins is None else self.mins.double() + 8 * s  # exact in float64
        return torch.stack([s, z], dim=-1)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # the kernel needs a contiguous (M, K) input (h[:, -1:] of a batch is a strided view)
        y = self._kernel_mm(x.reshape(-1, shape[-1]).contiguous())
        return y.reshape(*shape[:-1], self.out_features)


class Int8GroupLinear(_Int4KernelLayout):
    """Group-wise 8-bit weights, W = s q (+ m) per group of ``group_size`` inputs (Q8_0, Q5_*).

    ``qweight`` (out, in) int8; ``scales``/``mins`` (out, in / group_size) float32, kept in fp32.
    The kernel runs the codes as two 4-bit planes through the int4 kernel (module docstring).
    """

    kind = "int8"

    def __init__(self, f: QuantFactors, bias: torch.Tensor | None = None):
        out_f, in_f, g = _check_factors(f, 8)
        super().__init__(in_f, out_f, bias)
        self.group_size, self.label = g, f.label
        self.register_buffer("qweight", f.q.to(torch.int8).contiguous())
        self.register_buffer("scales", f.scales.float().contiguous())
        self.register_buffer("mins", None if f.mins is None else f.mins.float().contiguous())
        self._build_kernel_layout()

    @classmethod
    def from_factors(cls, f: QuantFactors, bias: torch.Tensor | None = None) -> "Int8GroupLinear":
        return cls(f, bias)

    def dequantize_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        # gguf.quants: Q8_0 / Q5_0 d q; Q5_1 d q + m; Q5_K (d sc) q - dmin mn (fp32, one rounding each)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        q = pick(self.qweight).float()
        n = q.shape[0]
        w = q.reshape(n, -1, self.group_size) * pick(self.scales)[..., None]
        if self.mins is not None:
            w = w + pick(self.mins)[..., None]
        return w.reshape(n, self.in_features)

    def _kernel_codes(self) -> torch.Tensor:
        q = self.qweight.to(torch.int32)
        return torch.cat([(q >> 4) + 8, q & 15], dim=1)  # q = 16 (hi - 8) + lo; >> keeps the sign

    def _kernel_factors(self) -> torch.Tensor:
        s = self.scales.double()
        m = torch.zeros_like(s) if self.mins is None else self.mins.double()
        return torch.cat([torch.stack([16 * s, torch.zeros_like(s)], -1),  # plane h: (hi - 8) 16 s
                          torch.stack([s, 8 * s + m], -1)], dim=1)  # plane l: (lo - 8) s + 8 s + m

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._kernel_mm(torch.cat([x2, x2], dim=-1))  # one input copy per plane
        return y.reshape(*shape[:-1], self.out_features)


def layer_from_factors(f: QuantFactors, bias: torch.Tensor | None = None) -> QuantLinear:
    """The layout that holds ``f`` exactly: Int4Linear for 4-bit codes, Int8GroupLinear for 8-bit."""
    if f.bits == 4:
        return Int4Linear.from_factors(f, bias)
    if f.bits == 8:
        return Int8GroupLinear(f, bias)
    raise ValueError(f"no layout for {f.bits}-bit codes")


def _int4_group(in_features: int, group_size: int) -> int | None:
    """Largest group <= group_size (halving, down to 16) dividing in_features."""
    g = group_size
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def _from_source(source: QuantSource, name: str, lin: nn.Linear) -> QuantLinear | None:
    """The layer built from the checkpoint's own quantisation of ``name``, or None (none stored,
    no layout for it, or the weight has changed since loading, e.g. fine-tuned)."""
    f = source.factors(f"{name}.weight")
    if f is None or tuple(f.q.shape) != tuple(lin.weight.shape):
        return None
    layer = layer_from_factors(f, None if lin.bias is None else lin.bias.detach().cpu())
    w = lin.weight.detach()
    # The model may have been cast (prepare_for_decoding casts before quantising): the file's
    # exact weight rounded to the model's dtype is what an unchanged layer holds.
    if not torch.equal(layer.dequantize(torch.float32).to(w.dtype), w.cpu()):
        return None
    return layer.to(w.device)


def quantize(
    model: nn.Module,
    mode: Literal["int8", "int4", "checkpoint"] = "int8",
    group_size: int = 32,
    skip: Iterable[str] = (),
    modes: dict[str, str] | None = None,
    source: QuantSource | None | Literal["auto"] = "auto",
    logits: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Replaces ``nn.Linear`` layers of ``model`` (in place) by quantised ones.

    ``source``: the checkpoint's own quantisation ("auto" = ``model.quant_source``, which
    ``polymodal.load`` attaches to a model read from a quantised GGUF). A layer the checkpoint
    stores quantised keeps exactly the file's codes and scales (Int4Linear for Q4_0/Q4_1/Q4_K,
    Int8GroupLinear for Q8_0/Q5_*), whatever ``mode`` says; ``mode`` applies to the other layers
    (float tensors, or types without a kernel layout such as Q6_K). ``mode="checkpoint"``
    quantises only the layers the checkpoint stores quantised and leaves the rest in float.

    The output projection is quantised too: for SmolLM2 it is the largest matrix
    (49152 x 576). A tied input embedding keeps its float table (a lookup reads one
    row per token, so it costs no bandwidth), i.e. the tie is broken.
    ``skip``: glob patterns of module names to leave in float (e.g. ``["lm_head"]``).
    ``modes``: per-module overrides, glob -> "int8" | "int4" | "none" (first match wins), e.g.
    ``{"lm_head": "int8"}``: an int4 re-quantisation of a higher-precision output matrix costs accuracy.
    int4 layers whose in_features has no group size in (group_size, group_size/2, ..., 16)
    fall back to int8.
    ``logits``: globs of output projections, whose ``REFINE_TOP`` largest logits the fast paths
    recompute in fp32 (``QuantLinear._refine``: bf16 logits tie). Returns the model.
    """
    if mode not in QUANT_MODES + ("checkpoint",):
        raise ValueError(f"unknown quantisation mode {mode!r}; choose from {QUANT_MODES + ('checkpoint',)}")
    rules = [(p, "none") for p in skip] + list((modes or {}).items())
    for _, m in rules:
        if m not in QUANT_MODES + ("none",):
            raise ValueError(f"unknown quantisation mode {m!r} in modes/skip; choose from {QUANT_MODES + ('none',)}")
    if source == "auto":
        source = getattr(model, "quant_source", None)

    def mode_of(name: str) -> str:
        return next((m for p, m in rules if fnmatch.fnmatch(name, p)), mode)

    targets = [(name, m, mode_of(name)) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, lin, layer_mode in targets:
        if layer_mode == "none":
            continue
        with torch.no_grad():
            new = _from_source(source, name, lin) if source is not None else None
            if new is None and layer_mode == "checkpoint":
                continue
            if new is None and layer_mode == "int4" and (g := _int4_group(lin.in_features, group_size)) is not None:
                new = Int4Linear.from_linear(lin, g)
            elif new is None:
                new = Int8Linear.from_linear(lin)
            # bias (and Int8Linear's scales) in the model's dtype, so the kernels need no per-call
            # cast; Int4/Int8Group keep their exact fp32 scales (QuantLinear._apply)
            new.to(lin.weight.dtype)
            if any(fnmatch.fnmatch(name, p) for p in logits):
                new.refine_top = REFINE_TOP
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def set_quant_impl(model: nn.Module, impl: str, dense_rows: int | None | Literal["default"] = "default") -> None:
    """Switches every quantised layer between "auto" (kernel or dense copy by shape), "fast"
    (always the kernel), "dense" (always the dense copy) and "reference" (dequantise + F.linear).
    ``dense_rows``: the rows at which "auto" switches to the dense copy (None = never)."""
    if impl not in QUANT_IMPLS:
        raise ValueError(f"unknown quantised-matmul impl {impl!r}; choose from {QUANT_IMPLS}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.impl = impl
            if dense_rows != "default":
                m.dense_rows = dense_rows


def quantized_bytes(model: nn.Module) -> int:
    """Bytes a batch-1 decode step reads for the weights of ``model`` (quantised + float linears):
    codes plus the kernel's bf16 scale (and zero) tables."""
    n = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            n += m.qweight.numel() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, Int4Linear):
            n += m.qweight.numel() + m.scales.numel() * 2 * 2
        elif isinstance(m, Int8GroupLinear):
            n += m.qweight.numel() + m.scales.numel() * 2 * 2 * 2  # two planes, each scale + zero
        elif type(m) is nn.Linear:
            n += m.weight.numel() * m.weight.element_size()
    return n
