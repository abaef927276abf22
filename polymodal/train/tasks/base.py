"""The Task interface: what one training objective tells the one :class:`~polymodal.train.trainer.Trainer`.

A Task owns its data and its objective; the Trainer owns everything else (device, precision,
distribution, optimizer, schedule, evaluation cadence, checkpoints, logs and progress). This is
the split of timm's ``timm/task`` and open_clip's ``task/``: the loop is written once, and a new
objective (speech, detection, video...) is one new subclass.

A Task:

* ``build_model()`` returns the model to train, built the same way for a fresh run and for a resume
  (LoRA adapters and frozen towers included: the Trainer then loads the checkpoint's weights);
* ``batch(index, rank, world)`` returns this rank's slice of global micro-batch ``index``
  (``step * grad_accum + micro``). It must be a pure function of its arguments and of ``self.seed``,
  so a resumed run draws exactly the batches an uninterrupted one would (the *data position* is the
  index: no sampler state to checkpoint);
* ``loss(model, batch)`` returns a dict with a scalar tensor ``"loss"`` (the mean over this rank's
  slice, so the ranks' average is the mean over the global batch) and optionally other scalars;
* ``evaluate(model)`` returns named metrics; ``metric`` and ``mode`` name the one that picks the
  best checkpoint;
* ``export(model, folder)`` writes the model a user loads (default: merged LoRA, config + weights +
  tokenizer), and ``count(batch)`` says how many ``unit`` items a batch holds, for throughput.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Task:
    name: str = "task"
    metric: str = "loss"  # the key of evaluate()'s dict that picks the best checkpoint
    mode: str = "min"  # "min" or "max"
    unit: str = "ex"  # what count() counts (tok, img, ex)
    seed: int = 0
    tokenizer: Any = None

    # -- what a task must define -----------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, index: int, rank: int, world: int) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int | None:
        """Micro-batches in one pass over the training data (None: the data is a stream)."""
        return None

    def count(self, batch: Any) -> int:
        """Items in this rank's batch, for the throughput shown in the progress bar."""
        for v in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]):
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        return 0

    def flops_per_item(self, model: nn.Module) -> float | None:
        """Training FLOPs per ``unit`` (forward + backward), for MFU; None when not modelled."""
        return None

    def checkpoint_keys(self, model: nn.Module) -> set[str] | None:
        """The state-dict keys a training checkpoint must hold (None: all). A task with a large
        frozen part (SmolLM2 under LoRA) returns :func:`trainable_state_keys`: the frozen weights
        are rebuilt by ``build_model()`` on resume, so saving them again at every step is waste."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Runs after every optimizer step (e.g. CLIP clamps its logit scale to log 100)."""

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Custom optimizer groups (e.g. layer-wise lr decay, via an ``lr_scale`` key); None = the one rule."""
        return None

    def export(self, model: nn.Module, folder: str | Path) -> Path:
        """The model a user loads: LoRA adapters merged into a copy, saved with the tokenizer."""
        from ...models.registry import save_model
        from ...nn.lora import LoRALinear, merge_lora

        m = model
        if any(isinstance(x, LoRALinear) for x in model.modules()):
            m = copy.deepcopy(model)
            merge_lora(m)
        return save_model(m, folder, tokenizer=self.tokenizer)

    def summary(self) -> dict[str, Any]:
        """Facts about the data, printed once before training (sizes, baselines)."""
        return {}


def trainable_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of trainable parameters plus every persistent buffer (BatchNorm statistics,
    EMA...); non-persistent buffers (RoPE tables) are not in a state dict at all."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    return (keys | {n for n, _ in model.named_buffers()}) & set(model.state_dict())


def shard(x: torch.Tensor | list, rank: int, world: int):
    """This rank's contiguous slice of a global batch (equal slices: the batch divides by world)."""
    n = len(x)
    if n % world:
        raise ValueError(f"a global batch of {n} does not split over {world} ranks; use a batch size divisible by {world}")
    per = n // world
    return x[rank * per:(rank + 1) * per]


class EpochSampler:
    """Epoch-style sampling without replacement whose position is a pure function of the step.

    Sample ``i`` of the stream is ``perm_e[i mod n]`` with ``e = i // n`` and ``perm_e`` a
    permutation drawn from ``seed + e``: the batches of any step can be recomputed from the step
    alone, which is what makes resume exact (and needs no sampler state in the checkpoint).
    ``drop_last`` steps never straddle two epochs."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self._perm: tuple[int, list[int]] | None = None
        self.steps_per_epoch = max(1, math.ceil(n / batch_size))

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
            else:
                self._perm = (epoch, list(range(self.n)))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        """The example indices of global batch ``step`` (the last batch of an epoch may be short;
        a short batch is topped up from the epoch's start so every step has ``batch_size``)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
        if len(idx) < self.batch_size:
            idx = idx + perm[:self.batch_size - len(idx)]
        return idx
