"""Learning-rate schedules.

Linear warmup followed by cosine decay (Loshchilov & Hutter, 2017, "SGDR", eq. 5,
without restarts; the warmup is from Goyal et al., 2017, sec. 2.2), as used for
GPT-2/GPT-3 (Brown et al., 2020, appendix B):

    lr(s) = lr_max * (s + 1) / warmup                                   if s < warmup
    lr(s) = min_lr + (lr_max - min_lr) * (1 + cos(pi * r)) / 2          if warmup <= s <= decay_steps
            with r = (s - warmup) / (decay_steps - warmup)
    lr(s) = min_lr                                                      if s > decay_steps

``s`` counts optimizer steps from 0. The warmup uses ``s + 1`` so the very
first update already has a non-zero learning rate (an lr of 0 would waste a step).
``schedule="constant"`` keeps lr_max after the warmup; ``"linear"`` decays
linearly from lr_max to min_lr instead of along the cosine.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, *, lr: float, warmup: int, decay_steps: int, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (0-based); pure, so it needs no state to resume."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose from {SCHEDULES}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if step >= decay_steps or decay_steps <= warmup:
        return min_lr
    r = (step - warmup) / (decay_steps - warmup)
    if schedule == "linear":
        return lr - (lr - min_lr) * r
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))
