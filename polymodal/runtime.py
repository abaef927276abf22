"""Device and dtype chosen at run time.

bf16 is the fast path only where the hardware computes in it natively: CUDA
GPUs with bf16 support, and CPUs with AMX or AVX512-BF16 (Sapphire Rapids and
later). Elsewhere (e.g. Cascade Lake, AVX512 without BF16, measured here at
~3x *slower* bf16 matmuls than fp32) the fast path is fp32.
"""
from __future__ import annotations

import functools

import torch


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when present, else the CPU; a named device that is not here is a ValueError."""
    if isinstance(device, str) and device not in ("auto",):
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(device)  # a malformed name raises RuntimeError; see below
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build has no usable CUDA (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    return dev


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap.upper():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 where the hardware has it natively, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in (None, "auto"):
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(sorted(names))}")
    return names[dtype]
