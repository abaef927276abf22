"""Training: the loop (``loop``), AdamW groups (``optim``), warmup + cosine (``schedule``),
atomic checkpoints (``checkpoint``), DDP / FSDP2 (``distributed``), ``polymodal train`` and
``polymodal quickstart`` (``commands``, ``quickstart``)."""
from .checkpoint import CheckpointError, load_checkpoint, resume
from .loop import Trainer, TrainConfig, train
from .optim import make_adamw, param_groups
from .schedule import lr_at

__all__ = ["CheckpointError", "load_checkpoint", "resume", "Trainer", "TrainConfig", "train", "make_adamw",
           "param_groups", "lr_at"]
