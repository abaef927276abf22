"""Token shards: a flat array of token ids on disk, sampled as language-modelling windows.

A shard is the corpus tokenised and concatenated into one raw ``uint16``/``uint32`` file
(nanoGPT's ``train.bin``/``val.bin``), opened with ``np.memmap`` so it is never loaded
whole. A training example is a window of ``block_size + 1`` consecutive ids: the model
reads ``x = w[:-1]`` and is scored on predicting ``y = w[1:]``, the next-token objective
of Radford et al. 2018 ("Improving Language Understanding by Generative Pre-Training"),
eq. 1: ``L(U) = sum_i log P(u_i | u_{i-k}, ..., u_{i-1})``.

Window starts are drawn from a caller-owned ``torch.Generator``: saving and restoring its
state (``generator.get_state()``/``set_state()``) replays the exact same batches, which
is what an exact training resume needs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}


class TokenShards:
    """One ``.bin`` token file opened read-only with ``np.memmap``.

    Args:
        path: the ``.bin`` file (e.g. ``data/shakespeare_char/train.bin``).
        dtype: numpy dtype of the ids; ``None`` reads it from ``meta.json`` next to the file.
    """

    def __init__(self, path: str | Path, dtype: str | np.dtype | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: token shard not found (run 'polymodal prepare' first)")
        self.meta: dict = {}
        meta_path = self.path.with_name("meta.json")
        if meta_path.is_file():
            try:
                self.meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
        if dtype is None:
            if "dtype" not in self.meta:
                raise ValueError(f"{self.path}: dtype not given and no meta.json with a 'dtype' next to it")
            dtype = self.meta["dtype"]
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"{self.path}: unsupported token dtype {dtype!r} (one of {sorted(_DTYPES)})")
            dtype = _DTYPES[dtype]
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{self.path}: size {size} bytes is not a multiple of {self.dtype} "
                             f"({self.dtype.itemsize} bytes): wrong dtype or truncated file")
        n = size // self.dtype.itemsize
        # np.memmap refuses empty files; an empty shard is still a valid (useless) object.
        self.data = np.memmap(self.path, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, dtype={self.dtype.name}, tokens={len(self)})"

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")

    def _check(self, batch_size: int, block_size: int) -> None:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if block_size + 1 > len(self):
            raise ValueError(f"{self.path}: block_size + 1 = {block_size + 1} tokens needed per window but the "
                             f"shard holds only {len(self)} tokens; lower block_size or add data")

    def _windows(self, starts: np.ndarray, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        w = np.stack([self.data[s:s + block_size + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(w)
        x, y = w[:, :-1], w[:, 1:]
        device = torch.device(device)
        if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: ``x`` and ``y = x`` shifted by one, int64 ``(B, T)``.

        Window starts are ``torch.randint(len - block_size, (batch_size,), generator=generator)``,
        uniform over every position where a full window fits; the generator alone decides them.
        """
        self._check(batch_size, block_size)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        starts = torch.randint(len(self) - block_size, (batch_size,), generator=generator)
        return self._windows(starts.numpy(), block_size, device)

    def num_eval_windows(self, block_size: int) -> int:
        """How many non-overlapping windows ``iter_eval_batches`` yields in total."""
        return (len(self) - 1) // block_size if block_size >= 1 else 0

    def iter_eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None,
                          device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic evaluation batches: consecutive, non-overlapping windows starting at 0,
        ``block_size``, ``2*block_size``, ... so every target position is scored once. The last
        batch may be smaller; at most ``max_batches`` batches."""
        self._check(batch_size, block_size)
        starts = np.arange(self.num_eval_windows(block_size)) * block_size
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._windows(starts[i:i + batch_size], block_size, device)
