"""GGUF import: llama.cpp model files -> our ``GPT`` + ``Tokenizer``.

A GGUF file (llama.cpp's ``ggml/docs/gguf.md``) is a header of typed key/value
metadata (the config and the tokenizer) followed by tensors, each either plain
(F32/F16/BF16) or block-quantised. We parse the container with the ``gguf``
package (``gguf.GGUFReader``) and dequantise with our own vectorised numpy code,
written from the block layouts of ggml (``ggml/src/ggml-common.h``,
``ggml-quants.c: dequantize_row_*``):

| type | block | bytes | layout                                         | x_i                        |
|------|-------|-------|------------------------------------------------|----------------------------|
| Q8_0 | 32    | 34    | d:f16, q[32]:i8                                | d q_i                      |
| Q4_0 | 32    | 18    | d:f16, qs[16]: low nibbles = x0..15, high = x16..31 | d (q_i - 8)           |
| Q4_1 | 32    | 20    | d:f16, m:f16, qs[16] (as Q4_0)                 | d q_i + m                  |
| Q5_0 | 32    | 22    | d:f16, qh:u32 (bit i = fifth bit of x_i), qs[16] | d (q_i - 16)             |
| Q5_1 | 32    | 24    | d:f16, m:f16, qh:u32, qs[16]                   | d q_i + m                  |
| Q4_K | 256   | 144   | d:f16, dmin:f16, scales[12] (8 x 6-bit scale + 6-bit min), qs[128] | d sc_j q_i - dmin m_j |
| Q5_K | 256   | 176   | as Q4_K plus qh[32] (bit j = fifth bit of sub-block j) before qs | as Q4_K  |
| Q6_K | 256   | 210   | ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16]:i8, d:f16 | d sc_j (q_i - 32) |

In Q4_K each 64 outputs read 32 bytes of ``qs``: low nibbles are sub-block 2c,
high nibbles sub-block 2c+1. In Q6_K each 128 outputs read 64 bytes of ``ql``
and 32 of ``qh``; output o uses scale o // 16. Every other type the installed ``gguf``
package dequantises (Q2_K, Q3_K, IQ*, TQ*, MXFP4, ...) goes through ``gguf.quants.dequantize``.

The blocks of Q4_0/Q4_1/Q4_K and Q8_0/Q5_* linear weights are also kept, moved by the same
weight map (fusion and the RoPE row permutation act on whole block rows), as
``model.quant_source``: ``polymodal.inference.quantize`` repacks them into its int4 kernel
layouts with no re-quantisation (``block_factors``: the codes, fp32 scales and mins; exact).

Tensor names (llama architecture, ``gguf.constants.MODEL_TENSORS``) map to ours
through the same declarative ``WeightMap`` as Hugging Face checkpoints.
llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``)
reorders the rows of W_q and W_k of each head from the "rotate-half" RoPE
layout of Hugging Face (feature i paired with i + d/2) to the interleaved layout
of the original LLaMA code (feature 2i paired with 2i+1):
``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``. We undo it with the inverse
``w.reshape(n_head, d/2, 2, in).swapaxes(1, 2)`` (the same as transformers'
``LlamaTensorProcessor._reverse_permute_weights``), using the KV head count for W_k.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` metadata as a byte-level BPE
(Radford et al. 2019) ``tokenizers.Tokenizer``, with the pre-tokenizer regex that
llama.cpp uses for ``tokenizer.ggml.pre`` (``llama-vocab.cpp``).

Dequantising costs seconds and opening the reader parses ~100k strings, so the
first load writes a polymodal folder (float32 safetensors + config + tokenizer)
to a cache (``$POLYMODAL_CACHE``, default ``~/.cache/polymodal``) keyed by the file's
SHA-256: copies of one file share an entry. The hash is remembered in ``index.json``
under the file's path, size and mtime, so later loads read only the cached folder; an
entry no existing file maps to any more is pruned when a new one is written
(``polymodal cache`` lists and clears them). The entry also holds the quantised blocks
(``gguf_blocks.safetensors``), read one weight at a time when the model is quantised.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..io import CheckpointError
from ..models.gpt import GPTConfig
from .weight_map import Rule, WeightMap, copy, custom, fuse

CACHE_VERSION = "2"  # bump when the cached layout or the conversion changes (2: + gguf_blocks.safetensors)

# ---------------------------------------------------------------------------------- dequantisers
# ggml type ids (ggml.h enum ggml_type); kept here so the library does not depend on gguf's enum values.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0",
              Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", BF16: "BF16"}
# type -> (elements per block, bytes per block)
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22),
         Q5_1: (32, 24), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


def _f16(b: np.ndarray) -> np.ndarray:
    """(N, 2) uint8 -> (N, 1) float32 from little-endian IEEE half."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, 16) packed bytes -> (N, 32) uint8: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(N, 4) bytes = one little-endian uint32 -> (N, 32) uint8: bit i is element i's fifth bit."""
    return ((np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4: 8 six-bit scales and mins from 12 bytes; the top 2 bits of sub-blocks 4..7
    hide in the spare high bits of bytes 0..7."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


# Blocks -> the integers and per-group factors that define them: (q, scales, mins or None, group, bits).
# bits 4: q in [0, 15] and x = s q + m, or x = s (q - 8) without m (Q4_0's own form, kept so that
# even the sign of a zero matches ggml); bits 8: q int8 and x = s q (+ m).
# The products (fp16 d) x (6-bit sc) of the K-quants are exact in fp32, so these factors are exact.
def _factors_q4_0(b):
    return _nibbles(b[:, 2:]), _f16(b[:, :2]), None, 32, 4


def _factors_q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 32, 4


def _factors_q8_0(b):
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, :2]), None, 32, 8


def _factors_q5_0(b):  # d:f16, qh:u32 (fifth bits), qs[16]; x = d (q - 16)
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return (q.astype(np.int16) - 16).astype(np.int8), _f16(b[:, :2]), None, 32, 8


def _factors_q5_1(b):  # d:f16, m:f16, qh:u32, qs[16]; x = d q + m
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return q.astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4]), 32, 8


def _k_quant_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``qs``: each 64 outputs read 32 bytes, low nibbles = sub-block 2c, high = 2c+1."""
    n = qs.shape[0]
    qs = qs.reshape(n, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)


def _factors_q4_k(b):  # d, dmin:f16, scales[12], qs[128]; x = (d sc_j) q - dmin mn_j
    sc, mn = _k_scales(b[:, 4:16])
    return _k_quant_nibbles(b[:, 16:144]), _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn), 32, 4


def _factors_q5_k(b):  # d, dmin, scales[12], qh[32] (bit j = sub-block j's fifth bit), qs[128]
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    qh = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = _k_quant_nibbles(b[:, 48:176]) | (qh.reshape(n, 256) << 4)
    return q.astype(np.int8), _f16(b[:, 0:2]) * sc, -(_f16(b[:, 2:4]) * mn), 32, 8


_FACTORS = {Q4_0: _factors_q4_0, Q4_1: _factors_q4_1, Q8_0: _factors_q8_0, Q5_0: _factors_q5_0,
            Q5_1: _factors_q5_1, Q4_K: _factors_q4_k, Q5_K: _factors_q5_k}


def _dequant_factors(q, s, m, g, bits) -> np.ndarray:
    """x from the factors, with the fp32 operations of gguf.quants in the same order (bit-exact)."""
    n = q.shape[0]
    q = q.reshape(n, -1, g).astype(np.float32)
    if bits == 4 and m is None:
        q = q - 8.0
    x = q * s.reshape(n, -1, 1)
    if m is not None:
        x = x + m.reshape(n, -1, 1)
    return x.reshape(n, -1)


def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _dequant_factors(*_factors_q4_k(blocks))


def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(blocks[:, 208:210])
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = (lo | (hi << 4)).reshape(n, 256).astype(np.float32) - 32.0
    return (d * np.repeat(scales, 16, axis=1)) * q


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int, what: str = "tensor") -> np.ndarray:
    """Raw little-endian bytes of one tensor -> flat float32 array of ``n_elements``.

    Our vectorised code for the types above; every other type the installed ``gguf`` package
    can dequantise (Q2_K, Q3_K, IQ*, TQ*, MXFP4, ...) through ``gguf.quants.dequantize``."""
    per_block, nbytes = BLOCK.get(ggml_type) or _gguf_block(ggml_type, what)
    name = TYPE_NAMES.get(ggml_type) or _type_name(ggml_type)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n_elements % per_block:
        raise CheckpointError(f"{what}: {n_elements} elements is not a multiple of the {name} block size {per_block}")
    want = n_elements // per_block * nbytes
    if raw.size != want:
        raise CheckpointError(f"{what}: {raw.size} bytes of {name} data, expected {want} (truncated or corrupt file)")
    if ggml_type == F32:
        return raw.view(np.float32).copy()
    if ggml_type == F16:
        return raw.view(np.float16).astype(np.float32)
    if ggml_type == BF16:  # bfloat16 is the top half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, nbytes)
    if ggml_type in _FACTORS:
        return _dequant_factors(*_FACTORS[ggml_type](blocks)).reshape(-1)
    if ggml_type == Q6_K:
        return dequant_q6_k(blocks).reshape(-1)
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type)), np.float32).reshape(-1)


def _gguf_block(ggml_type: int, what: str) -> tuple[int, int]:
    """(elements, bytes) per block of a type only the ``gguf`` package dequantises, or a clear error."""
    try:
        import gguf

        t = gguf.GGMLQuantizationType(ggml_type)
        size = gguf.GGML_QUANT_SIZES[t]
        gguf.quants.dequantize(np.zeros(size[1], np.uint8), t)  # one zero block: raises if unsupported
        return size
    except (ImportError, ValueError, KeyError, NotImplementedError):
        pass
    raise CheckpointError(f"{what}: unsupported quantisation type {_type_name(ggml_type)}; supported: "
                          f"{sorted(TYPE_NAMES.values())} and what gguf.quants dequantises")


def _type_name(t: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(t).name
    except (ImportError, ValueError):
        return f"ggml type {t}"


# ------------------------------------------------------------------------------------ RoPE permute
def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's interleaved-RoPE row order for one of W_q / W_k (rows = n_head * d)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (rotate-half -> interleaved); the inverse of ``unpermute_rope``."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------- header checks
# GGUF value types (ggml/docs/gguf.md, gguf_metadata_value_type) -> size in bytes; 8 = string, 9 = array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
GGML_MAX_DIMS = 4


class _HeaderWalker:
    """Walks a GGUF header checking every count and length against the bytes that remain.

    The ``gguf`` package's reader trusts the counts it reads: an array field claiming 2**60
    elements makes it loop and allocate without bound. A count or length that the rest of the
    file cannot hold is refused here, before the file is handed over, so the reader only ever
    sees a header whose every element exists (its memory is bounded by the file size)."""

    def __init__(self, path: Path):
        import mmap

        self.path, self.pos = path, 0
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF header: {what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes but the file ends {self.size - self.pos} bytes later")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        import struct

        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def count(self, min_item: int, what: str) -> int:
        n = self.uint("<Q", what)
        if n * min_item > self.size - self.pos:
            raise self.fail(f"{what} is {n}, more than the remaining {self.size - self.pos} bytes can hold")
        return n

    def string(self, what: str) -> bytes:
        n = self.count(1, f"length of {what}")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _VALUE_SIZES:
            self.take(_VALUE_SIZES[vtype], what)
        elif vtype == _STRING:
            self.count(1, f"string length of {what}")
            self.pos -= 8
            self.string(what)
        elif vtype == _ARRAY and depth < 4:
            item = self.uint("<I", f"item type of {what}")
            if item not in _VALUE_SIZES and item not in (_STRING, _ARRAY):
                raise self.fail(f"{what}: unknown array item type {item}")
            size = _VALUE_SIZES.get(item, 8)  # a string or array item takes at least its 8-byte count
            n = self.count(size, f"element count of array {what}")
            if item in _VALUE_SIZES:
                self.take(n * size, what)
            else:
                for _ in range(n):
                    self.value(item, what, depth + 1)
        else:
            raise self.fail(f"{what}: unknown value type {vtype}")

    def walk(self) -> None:
        if self.buf[:4] != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {bytes(self.buf[:4])!r}, expected b'GGUF')")
        self.pos = 4
        version = self.uint("<I", "version")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = self.uint("<Q", "tensor count")
        n_kv = self.count(13, "metadata key count")  # key length 8 + type 4 + at least 1 byte of value
        if n_tensors * 24 > self.size - self.pos:  # name length 8, dims 4, type 4, offset 8
            raise self.fail(f"tensor count {n_tensors} is more than the file can describe")
        for i in range(n_kv):
            key = self.string(f"metadata key {i}").decode("utf-8", "replace")
            self.value(self.uint("<I", f"type of {key!r}"), repr(key))
        for i in range(n_tensors):
            name = self.string(f"name of tensor {i}").decode("utf-8", "replace")
            n_dims = self.uint("<I", f"dimension count of tensor {name!r}")
            if n_dims > GGML_MAX_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions (GGML allows {GGML_MAX_DIMS})")
            for _ in range(n_dims):
                if self.uint("<Q", f"shape of tensor {name!r}") >= 2 ** 48:
                    raise self.fail(f"tensor {name!r} has an impossible dimension")
            self.take(12, f"type and offset of tensor {name!r}")


def validate_header(path: str | Path) -> None:
    """Raises ``CheckpointError`` (naming the file and the field) for a GGUF header whose counts
    or lengths run past the end of the file; costs one pass over the header's strings."""
    w = _HeaderWalker(Path(path))
    try:
        w.walk()
    finally:
        if hasattr(w.buf, "close"):
            w.buf.close()


# --------------------------------------------------------------------------------------- reading
class GGUFFile:
    """Metadata and lazily dequantised tensors of one GGUF file; every error names the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        validate_header(self.path)  # counts and lengths fit the file: the reader cannot run away
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on a bad header
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} ends at byte {end} but the file has {size} "
                                      "bytes (truncated file)")

    def meta(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read metadata {key!r} ({e})") from None

    def require(self, key: str) -> Any:
        v = self.meta(key)
        if v is None:
            raise CheckpointError(f"{self.path}: metadata {key!r} is missing")
        return v

    def shape(self, name: str) -> tuple[int, ...]:
        # ggml lists dims fastest-first (ne0 = columns); torch wants (rows, columns)
        return tuple(int(x) for x in reversed(list(self.tensors[name].shape)))

    def tensor(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        flat = dequantize(t.data, int(t.tensor_type), int(t.n_elements), what=f"{self.path}: tensor {name!r}")
        return torch.from_numpy(flat.reshape(self.shape(name)))


class _LazyTensors(Mapping):
    """name -> dequantised tensor, computed on access (one tensor in memory at a time)."""

    def __init__(self, f: GGUFFile):
        self.f = f

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.f.tensor(k)

    def __contains__(self, k: object) -> bool:
        return k in self.f.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.f.tensors)

    def __len__(self) -> int:
        return len(self.f.tensors)


# --------------------------------------------------------------------------------- architectures
# arch -> whether llama.cpp permuted W_q/W_k for interleaved RoPE (LlamaModel yes; Qwen2Model keeps
# the NEOX/rotate-half layout and adds q/k/v biases).
ARCHS = {"llama": {"permute_qk": True}, "qwen2": {"permute_qk": False}}


def config_from_gguf(f: GGUFFile) -> GPTConfig:
    arch = f.require("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{f.path}: unknown architecture general.architecture={arch!r}; supported: {sorted(ARCHS)}")
    m = lambda k, d=None: f.meta(f"{arch}.{k}", d)  # noqa: E731
    r = lambda k: f.require(f"{arch}.{k}")  # noqa: E731
    n_embd, n_head = int(r("embedding_length")), int(r("attention.head_count"))
    n_kv = m("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        raise CheckpointError(f"{f.path}: per-layer {arch}.attention.head_count_kv is not supported")
    head_dim = int(m("attention.key_length", n_embd // n_head))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{f.path}: attention.value_length != key_length is not supported")
    rope_dim = int(m("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{f.path}: partial RoPE ({arch}.rope.dimension_count={rope_dim}, head dim {head_dim}) "
                              "is not supported")
    scaling = m("rope.scaling.type")
    if scaling not in (None, "none") and float(m("rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise CheckpointError(f"{f.path}: RoPE scaling {scaling!r} is not supported")
    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: tensor 'token_embd.weight' is missing")
    tokens = f.reader.fields.get("tokenizer.ggml.tokens")
    vocab = m("vocab_size") or (len(tokens.data) if tokens is not None else f.shape("token_embd.weight")[0])

    def tok_id(key):
        v = f.meta(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < int(vocab) else None

    qwen = arch == "qwen2"
    return GPTConfig(
        name=str(f.meta("general.name") or f.path.stem),
        vocab_size=int(vocab),
        block_size=int(m("context_length", 2048)),
        n_layer=int(r("block_count")),
        n_head=n_head,
        n_kv_head=int(n_kv),
        n_embd=n_embd,
        head_dim=None if head_dim * n_head == n_embd else head_dim,
        intermediate_size=int(r("feed_forward_length")),
        norm="rmsnorm",
        # stored as float32 metadata: round-trip through str to recover the 1e-5 the config meant
        norm_eps=float(str(np.float32(m("attention.layer_norm_rms_epsilon", 1e-5)))),
        mlp="gated", activation="silu", position="rope",
        rope_theta=float(m("rope.freq_base", 10000.0)),
        prenorm=True,
        tie_embeddings="output.weight" not in f.tensors,
        qkv_bias=qwen, out_bias=False, mlp_bias=False,
        scale_residual_init=False,
        bos_token_id=tok_id("bos_token_id"), eos_token_id=tok_id("eos_token_id"), pad_token_id=tok_id("padding_token_id"),
    )


def gguf_weight_map(c: GPTConfig, arch: str = "llama") -> WeightMap:
    q, kv, hid = c.n_head * c.hd, c.kv_heads * c.hd, c.hidden
    if ARCHS[arch]["permute_qk"]:
        nh, nkv = c.n_head, c.kv_heads
        qkv = custom(["blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight"], ["blocks.{}.attn.qkv.weight"],
                     lambda ts: [torch.cat([unpermute_rope(ts[0], nh), unpermute_rope(ts[1], nkv), ts[2]])],
                     lambda ts: [permute_rope(a, n) if n else a
                                 for a, n in zip(torch.split(ts[0], [q, kv, kv]), (nh, nkv, 0))])
    else:
        qkv = fuse(["blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight"], "blocks.{}.attn.qkv.weight",
                   [q, kv, kv])
    rules: list[Rule] = [
        copy("token_embd.weight", "wte.weight"),
        copy("output_norm.weight", "ln_f.weight"),
        copy("blk.{}.attn_norm.weight", "blocks.{}.norm1.weight"),
        copy("blk.{}.ffn_norm.weight", "blocks.{}.norm2.weight"),
        qkv,
        copy("blk.{}.attn_output.weight", "blocks.{}.attn.proj.weight"),
        fuse(["blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight"], "blocks.{}.mlp.fc.weight", [hid, hid]),  # [gate; up]
        copy("blk.{}.ffn_down.weight", "blocks.{}.mlp.proj.weight"),
    ]
    if c.qkv_bias:
        rules.append(fuse(["blk.{}.attn_q.bias", "blk.{}.attn_k.bias", "blk.{}.attn_v.bias"], "blocks.{}.attn.qkv.bias",
                          [q, kv, kv]))
    ignore_ours = []
    if c.tie_embeddings:
        ignore_ours.append("lm_head.weight")
    else:
        rules.append(copy("output.weight", "lm_head.weight"))
    # rope_freqs.weight only appears with RoPE scaling (refused above); nothing else is ignorable.
    return WeightMap(rules, c.n_layer, ignore_hf=[], ignore_ours=ignore_ours)


def _expected_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv, hid = c.n_embd, c.n_head * c.hd, c.kv_heads * c.hd, c.hidden
    out = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,), "output.weight": (c.vocab_size, d)}
    for i in range(c.n_layer):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_q.weight": (q, d),
                    b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, q),
                    b + "ffn_gate.weight": (hid, d), b + "ffn_up.weight": (hid, d), b + "ffn_down.weight": (d, hid),
                    b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
    return out


def model_from_gguf(f: GGUFFile) -> torch.nn.Module:
    from .hf import build_uninitialised
    from .weight_map import load_into

    config = config_from_gguf(f)
    arch = f.meta("general.architecture")
    for name, shape in _expected_shapes(config).items():
        if name in f.tensors and f.shape(name) != shape:
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {f.shape(name)}, the metadata implies {shape}")
    ours = gguf_weight_map(config, arch).to_ours(_LazyTensors(f), source=str(f.path))
    model = build_uninitialised(config)
    load_into(model, ours, source=str(f.path), assign=True)  # all float32, freshly dequantised: adopt, don't copy
    return model.eval()


# -------------------------------------------------------------------- quantised blocks for kernels
# Types whose blocks become a layout of polymodal.inference.quant unchanged (the 4- and 8-bit
# codes with their per-32 scales and mins): Q4_0/Q4_1/Q4_K -> Int4Linear, Q8_0/Q5_0/Q5_1/Q5_K ->
# Int8GroupLinear. Q6_K's groups of 16 are finer than torch's int4 kernel allows (32..256), so a
# Q6_K layer is dequantised and quantised like a float one.
REPACKABLE = tuple(_FACTORS)
BLOCKS_FILE = "gguf_blocks.safetensors"


def block_factors(rows, ggml_type: int, label: str | None = None):
    """(out, bytes per row) uint8 blocks of one matrix -> ``polymodal.inference.quant.QuantFactors``."""
    from ..inference.quant import QuantFactors

    rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    n_rows = rows.shape[0]
    q, s, m, g, bits = _FACTORS[ggml_type](np.ascontiguousarray(rows).reshape(-1, BLOCK[ggml_type][1]))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(n_rows, -1))  # noqa: E731
    return QuantFactors(t(q), t(s), None if m is None else t(m), g, bits,
                        label or f"GGUF {TYPE_NAMES[ggml_type]}")


def quant_blocks(f: GGUFFile, config: GPTConfig) -> dict[str, tuple[int, torch.Tensor]]:
    """Our linear-weight name -> (ggml type, (out, bytes per row) uint8 blocks), for the weights the
    file stores in a REPACKABLE type. The same weight map as the float load moves the blocks: a
    block is a run of one row, so fusing (cat of rows) and the Q/K RoPE un-permutation (a row
    order) apply to block rows as to float rows. A fused matrix whose parts have different types
    (e.g. Q4_K_M's Q6_K attn_v beside Q4_K attn_q/k) has no single layout and is left out."""
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for r in gguf_weight_map(config, f.meta("general.architecture")).rules:
        ts = [f.tensors.get(n) for n in r.hf]
        if len(r.ours) != 1 or any(t is None or len(t.shape) != 2 for t in ts):
            continue
        types = {int(t.tensor_type) for t in ts}
        qt = types.pop()
        if types or qt not in REPACKABLE:
            continue
        rows = [torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(f.shape(n)[0], -1))
                for n, t in zip(r.hf, ts)]
        (ours,) = r.ours
        if ours == "wte.weight":  # the embedding is a lookup, not a matmul: only a tied lm_head uses it
            if not config.tie_embeddings:
                continue
            ours = "lm_head.weight"
        out[ours] = (qt, r.to_ours(rows)[0].contiguous())
    return out


class GGUFQuantSource:
    """``model.quant_source`` of a model read from a quantised GGUF file: the file's own blocks,
    by our parameter name, as ``QuantFactors`` for ``polymodal.inference.quantize``.

    Holds the blocks in memory, or only the path of the cache's ``gguf_blocks.safetensors``
    (read per weight on demand, so a cached load reads none of them until quantising)."""

    def __init__(self, blocks: dict[str, tuple[int, torch.Tensor]] | None = None, path: str | Path | None = None):
        self.blocks, self.path = blocks, None if path is None else Path(path)

    def names(self) -> list[str]:
        if self.blocks is not None:
            return list(self.blocks)
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as fh:
            return list(fh.keys())

    def raw(self, name: str) -> tuple[int, torch.Tensor] | None:
        if self.blocks is not None:
            return self.blocks.get(name)
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as fh:
            if name not in fh.keys():
                return None
            return int(fh.metadata()[name]), fh.get_tensor(name)

    def factors(self, name: str):
        try:
            got = self.raw(name)
            return None if got is None else block_factors(got[1], got[0])
        except Exception as e:  # a damaged cache file (safetensors raises its own error type)
            warnings.warn(f"{self.path or 'GGUF blocks'}: cannot read the blocks of {name!r} ({e}); "
                          "it is quantised from its float weights instead", stacklevel=3)
            return None

    def save(self, path: str | Path) -> None:
        from ..io import save_safetensors

        assert self.blocks is not None
        save_safetensors({k: v for k, (_, v) in self.blocks.items()}, path,
                         metadata={k: str(t) for k, (t, _) in self.blocks.items()})


# ------------------------------------------------------------------------------------- tokenizer
# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
               "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in _DIGITS_THEN_GPT2:  # each digit its own pre-token, then the GPT-2 regex (SmolLM2's tokenizer.json)
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _PRE_SPLITS:
        return pt.Sequence([pt.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not known; using the GPT-2 split regex", stacklevel=3)
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_gguf(f: GGUFFile):
    """Rebuilds the byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata (None if there is none)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    kind = f.meta("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        warnings.warn(f"{f.path}: tokenizer.ggml.model={kind!r} (only byte-level BPE 'gpt2' is rebuilt); "
                      "the model loads without a tokenizer", stacklevel=3)
        return None
    tokens = f.require("tokenizer.ggml.tokens")
    merges = f.meta("tokenizer.ggml.merges") or []
    types = f.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{f.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(f.meta("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # token types (llama.cpp llama_token_type): 3 = control (special, kept whole and skipped on
    # decode), 4 = user-defined (kept whole, decoded as text).
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    from ..tokenizers import Tokenizer

    def tid(key):
        v = f.meta(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    return Tokenizer.from_tokenizers(tok, bos=tid("bos_token_id"), eos=tid("eos_token_id"), pad=tid("padding_token_id"),
                                     unk=tid("unknown_token_id"), chat_template=f.meta("tokenizer.chat_template"),
                                     add_bos=bool(f.meta("tokenizer.ggml.add_bos_token", False))
                                     and tid("bos_token_id") is not None)


# ----------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    return Path(os.environ.get("POLYMODAL_CACHE") or Path.home() / ".cache" / "polymodal")


ENTRY_RE = re.compile(r"^gguf-[0-9a-f]{20}$")
OLD_ENTRY_RE = re.compile(r"^.+-[0-9a-f]{16}$")  # entries keyed by path + size + mtime (before content keys)
INDEX = "index.json"


def _read_index(root: Path) -> dict[str, dict]:
    try:
        d = json.loads((root / INDEX).read_text(encoding="utf-8"))
        return d["files"] if isinstance(d, dict) and isinstance(d.get("files"), dict) else {}
    except (OSError, ValueError, KeyError):
        return {}  # no index yet, or a damaged one: files are simply hashed again


def _write_index(root: Path, files: dict[str, dict]) -> None:
    from ..io import atomic_write_text

    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / INDEX, json.dumps({"version": 1, "files": files}, indent=1))
    except OSError as e:
        warnings.warn(f"could not write the GGUF cache index {root / INDEX}: {e}", stacklevel=3)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a GGUF file's bytes, remembered in the cache index under its path, size and
    mtime, so an unchanged file is hashed once (a cached load then never reads it)."""
    p = Path(path).resolve()
    st = p.stat()
    root = cache_root()
    files = _read_index(root)
    rec = files.get(str(p))
    if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("sha256"):
        return rec["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    files[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    _write_index(root, files)
    return h.hexdigest()


def cache_dir_for(path: str | Path) -> Path:
    """Cache folder of a GGUF file, keyed by its content (SHA-256) and the conversion version:
    copies of one file, or the same file touched, share one entry."""
    key = hashlib.sha256(f"{file_sha256(path)}|{CACHE_VERSION}".encode()).hexdigest()[:20]
    return cache_root() / f"gguf-{key}"


def _entry_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (ENTRY_RE.match(d.name) or (
        OLD_ENTRY_RE.match(d.name) and (d / "model.safetensors").is_file())))


def _folder_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def cache_entries() -> list[dict]:
    """Every entry of the GGUF cache: folder, bytes, the GGUF files it was converted from, and
    whether one of them still exists unchanged (``used``)."""
    root = cache_root()
    files = _read_index(root)
    sources: dict[str, list[str]] = {}
    for src, rec in files.items():
        try:
            st = Path(src).stat()
        except OSError:
            continue
        if st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
            key = hashlib.sha256(f"{rec.get('sha256')}|{CACHE_VERSION}".encode()).hexdigest()[:20]
            sources.setdefault(f"gguf-{key}", []).append(src)
    return [{"path": str(d), "name": d.name, "bytes": _folder_size(d), "sources": sources.get(d.name, []),
             "used": d.name in sources} for d in _entry_dirs(root)]


def clear_cache(unused_only: bool = False, min_age_s: float = 0.0) -> list[dict]:
    """Removes every cache entry (or, with ``unused_only``, those no existing GGUF file maps to:
    older conversions, deleted or changed files); returns the removed entries. ``min_age_s``
    spares entries written more recently (another process may be converting a file right now
    and not have its index record read back yet)."""
    import shutil
    import time

    now = time.time()
    removed = [e for e in cache_entries() if not (unused_only and e["used"])
               and now - Path(e["path"]).stat().st_mtime >= min_age_s]
    for e in removed:
        shutil.rmtree(e["path"], ignore_errors=True)
    root = cache_root()
    if not unused_only and (root / INDEX).is_file():
        (root / INDEX).unlink()
    elif unused_only:  # forget the index records of files that are gone
        _write_index(root, {k: v for k, v in _read_index(root).items() if Path(k).exists()})
    return removed


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              cache: bool = True) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a GGUF file; the first load writes the dequantised folder to the cache."""
    from ..models.registry import save_model

    path = Path(path)
    folder = cache_dir_for(path) if cache and path.is_file() else None
    if folder is not None and (folder / "model.safetensors").is_file():
        try:
            model = _load_cached_model(folder, device, dtype)
            if (folder / BLOCKS_FILE).is_file():  # the file's quantised blocks, read when quantising
                model.quant_source = GGUFQuantSource(path=folder / BLOCKS_FILE)
            tok = None
            if (folder / "tokenizer.json").is_file():
                from ..tokenizers import Tokenizer

                tok = Tokenizer.load(folder)
            return model, tok
        except CheckpointError as e:  # a damaged cache entry: rebuild it from the GGUF file
            warnings.warn(f"ignoring damaged GGUF cache {folder}: {e}", stacklevel=2)
    f = GGUFFile(path)
    model = model_from_gguf(f)
    tok = tokenizer_from_gguf(f)
    blocks = quant_blocks(f, model.config)
    if folder is not None:
        from ..io import atomic_dir

        try:
            with atomic_dir(folder) as tmp:  # one rename: a crash leaves no half-written entry
                save_model(model, tmp, tokenizer=tok)
                if blocks:
                    GGUFQuantSource(blocks).save(tmp / BLOCKS_FILE)
            if blocks:  # read back on demand, as after a cached load, instead of held in memory
                blocks = None
                model.quant_source = GGUFQuantSource(path=folder / BLOCKS_FILE)
            clear_cache(unused_only=True, min_age_s=600)  # older conversions of changed or deleted files go
        except OSError as e:
            warnings.warn(f"could not write the GGUF cache {folder}: {e}", stacklevel=2)
    if blocks:  # polymodal.inference.quantize repacks these instead of re-quantising the float weights
        model.quant_source = GGUFQuantSource(blocks)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model, tok


def _load_cached_model(folder: Path, device, dtype) -> torch.nn.Module:
    """A cached polymodal folder -> model, without random init (see ``hf.skip_init``)."""
    from ..io import load_safetensors, read_json
    from ..models.registry import config_from_dict
    from .hf import build_uninitialised
    from .weight_map import load_into

    config = config_from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
    model = build_uninitialised(config)
    # assign=True adopts the freshly read tensors instead of copying 0.5 GB into the
    # uninitialised parameters (that copy was half of the cached load time).
    load_into(model, load_safetensors(folder / "model.safetensors"), str(folder / "model.safetensors"), assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
