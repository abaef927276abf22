"""One small class per training objective, all run by :class:`polymodal.train.trainer.Trainer`
(see ``base.py`` for the interface)."""
from .base import EpochSampler, Task, shard

__all__ = ["EpochSampler", "Task", "shard"]
