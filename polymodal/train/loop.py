"""``polymodal train``'s recipe (``TrainConfig``, the YAML files in ``configs/``) for causal language
models, run by the one engine (``trainer.py``) with :class:`~polymodal.train.tasks.causal_lm.CausalLMTask`.

Objective: the mean next-token cross-entropy L = -1/(B T) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})
(Radford et al., 2018, eq. 1), minimised with AdamW (``optim.py``) under a warmup + cosine
learning-rate schedule (``schedule.py``). One optimizer step sees
``batch_size * grad_accum * block_size`` tokens: the gradient of the mean loss over the global
batch is accumulated over ``grad_accum`` micro-batches (each loss divided by ``grad_accum``) and,
in multi-process runs, averaged over ranks (``distributed.py``). The global gradient norm is
clipped to ``grad_clip`` (Pascanu et al., 2013, eq. 7).

Throughput is reported as model FLOPs utilisation (Chowdhery et al., 2022, "PaLM", appendix B):

    MFU = (6 N + 12 L T d) * tokens_per_second / peak_flops

where 6N counts the forward (2N) and backward (4N) multiply-adds of the N non-embedding-table
weights and 12 L T d the attention score/value products of L layers of width d over context T.

Exact resume: the learning rate is a pure function of the step, and the checkpoint restores
the weights, the AdamW moments, the step, and every RNG (dropout and the data sampler's
generator), so in fp32 the losses after a resume equal those of an uninterrupted run bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed as D
from . import trainer as engine
from .schedule import SCHEDULES
from .tasks.causal_lm import CausalLMTask, flops_per_token
from .trainer import default_peak_flops, resolve_dtype

__all__ = ["TrainConfig", "Trainer", "train", "flops_per_token", "default_peak_flops", "resolve_dtype"]


@dataclass
class TrainConfig:
    """A training recipe (the YAML files in ``configs/`` hold these fields)."""

    # model: a GPTConfig preset plus overrides (vocab_size defaults to the data's meta.json)
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data: a folder written by polymodal.data.prepare (train.bin, val.bin, meta.json)
    data: str = ""
    batch_size: int = 32  # global windows per micro-step (split across ranks)
    block_size: int = 128
    grad_accum: int = 1
    # optimisation
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    schedule: str = "cosine"
    decay_steps: int | None = None  # default: max_steps (or the time-budget estimate)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 1000
    max_minutes: float | None = None
    # evaluation / logging / checkpointing
    eval_interval: int = 250
    eval_batches: int = 20  # fixed val windows: eval_batches x batch_size, the same at every eval
    log_interval: int = 10
    checkpoint_interval: int | None = None  # default: eval_interval
    keep_checkpoints: int = 3
    # runtime
    dtype: str = "auto"  # auto | bf16 | fp32 (bf16 = autocast, weights stay fp32)
    compile: bool = False
    distributed: str = "none"  # none | ddp | fsdp
    device: str = "auto"
    threads: int | None = None
    peak_flops: float | None = None  # whole job's peak FLOP/s for MFU; default: default_peak_flops() x ranks
    seed: int = 1337
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        # YAML reads "3e-4" (no dot) as a string; coerce numeric fields and name the bad one
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = {"float": float, "int": int, "float | None": float, "int | None": int}.get(str(f.type))
            if kind is not None and v is not None and not isinstance(v, bool):
                try:
                    setattr(self, f.name, kind(v) if kind is float or not isinstance(v, float) or v.is_integer() else v)
                except (TypeError, ValueError):
                    raise ValueError(f"recipe field {f.name!r} must be a number, got {v!r}") from None
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.distributed not in D.MODES:
            raise ValueError(f"distributed must be one of {D.MODES}, got {self.distributed!r}")
        for k in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "log_interval"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _args(cfg: TrainConfig, out, resume: bool, fallback: bool, overwrite: bool) -> engine.TrainArgs:
    """The recipe's names for the engine's shared flags."""
    return engine.TrainArgs(
        out=str(out), minutes=cfg.max_minutes or 0.0, max_steps=cfg.max_steps, eval_every=cfg.eval_interval,
        lr=cfg.lr, min_lr=cfg.min_lr / cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule,
        weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, grad_accum=cfg.grad_accum,
        grad_clip=cfg.grad_clip, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
        distributed=cfg.distributed, seed=cfg.seed, threads=cfg.threads or 0, log_every=cfg.log_interval,
        checkpoint_every=cfg.checkpoint_interval or 0, keep_checkpoints=cfg.keep_checkpoints, resume=resume,
        overwrite=overwrite, fallback=fallback, progress=cfg.progress, tensorboard=cfg.tensorboard, plot=cfg.plot,
        peak_flops=(cfg.peak_flops or 0.0))


class Trainer(engine.Trainer):
    """The engine's Trainer on a causal-LM recipe: ``Trainer(recipe, out).fit()``."""

    def __init__(self, recipe: TrainConfig | dict, out: str | Path = "runs/train", *, resume: bool = False,
                 fallback: bool = False, overwrite: bool = False):
        self.cfg = recipe if isinstance(recipe, TrainConfig) else TrainConfig.from_dict(recipe)
        cfg = self.cfg
        model_config = None
        if resume:  # the run's own model config, whatever the preset now says
            from .checkpoint import latest_checkpoint
            from ..models.registry import config_from_dict
            from ..io import read_json

            newest = latest_checkpoint(out)
            if newest is not None and (newest / "config.json").is_file():
                model_config = config_from_dict(read_json(newest / "config.json"), str(newest / "config.json"))
        task = CausalLMTask(cfg.data, cfg.model, cfg.model_overrides, cfg.batch_size, cfg.block_size,
                            cfg.eval_batches, cfg.seed, model_config=model_config)
        if cfg.decay_steps:
            task.fixed_decay_steps = cfg.decay_steps
        super().__init__(task, _args(cfg, out, resume, fallback, overwrite), recipe={"recipe": cfg.to_dict()})
        if cfg.decay_steps and self.decay_steps is None:
            self.decay_steps = cfg.decay_steps
        self.tokenizer = task.tokenizer
        self.val_data, self.train_data = task.val_data, task.train_data

    def _fit_schedule_to_budget(self, budget: float) -> None:
        if not self.cfg.decay_steps:  # an explicit decay_steps wins over the budget estimate
            super()._fit_schedule_to_budget(budget)

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        s = super().fit(stop_at=stop_at)
        v = (s["last"] or {}).get("loss", math.inf)
        return {**s, "tokens": self.items_seen, "val_loss": v, "val_ppl": math.exp(min(v, 50)),
                "best_val_loss": s["best"]}


def train(recipe: TrainConfig | dict, out: str | Path = "runs/train", *, resume: bool = False,
          fallback: bool = False, overwrite: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Builds a :class:`Trainer`, fits, closes; returns the final summary dict."""
    trainer = Trainer(recipe, out, resume=resume, fallback=fallback, overwrite=overwrite)
    try:
        return trainer.fit(stop_at=stop_at)
    finally:
        trainer.close()
