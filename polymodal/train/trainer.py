"""The one training loop. Every training command builds a :class:`~polymodal.train.tasks.base.Task`
and hands it to :class:`Trainer`; the Trainer owns what every objective shares:

* **device and precision**: the device from ``--device`` (auto: CUDA when present), bf16 autocast
  only where the hardware computes bf16 natively (``polymodal.runtime``), optional ``torch.compile``;
* **scale-out**: DDP or FSDP2 under ``torchrun`` (``distributed.py``): each rank computes the mean
  loss of its equal slice of the global batch and the gradients are averaged, so N ranks equal one
  process on the full batch;
* **steps**: gradient accumulation over ``grad_accum`` micro-batches (each loss divided by it) and
  clipping of the global gradient norm (Pascanu et al., 2013, eq. 7);
* **optimizer**: AdamW (Loshchilov & Hutter, 2019) with the one decay rule of ``optim.py``;
* **schedule**: linear warmup, then cosine or linear decay (``schedule.py``), ending at
  ``max_steps`` or, with a wall-clock budget, at the step the budget is estimated to allow
  (re-estimated at every evaluation and checkpointed, so a resume continues on the same curve);
* **evaluation** every ``eval_every`` steps; the best model by the task's metric and direction is
  exported to ``<out>/model``, and ``patience`` evaluations without improvement stop the run;
* **checkpoints**: atomic, hashed ``<out>/checkpoints/step-N`` folders with a ``latest`` pointer
  (``checkpoint.py``); resume restores weights, AdamW moments, the step (the data position: a
  Task's batches are a pure function of the step), the schedule and every RNG, so on the CPU an
  interrupted and resumed run equals an uninterrupted one bit for bit. Evaluation runs between
  saved and restored RNG states, so the eval cadence never changes training. Ctrl-C saves first;
  a kill -9 loses at most the steps since the last checkpoint;
* **logs**: one ``metrics.jsonl`` (trimmed back to the checkpoint on resume), TensorBoard in
  ``tb/``, one ``curve.png``, and ``config.json`` with the full recipe;
* **progress**: one tqdm bar sized from the start to the budget (seconds when a wall-clock budget
  ends the run, steps otherwise) with the train loss, the latest val metric and the throughput.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import CheckpointError, atomic_write_text, save_figure
from . import distributed as D
from .checkpoint import capture_rng, model_state, restore_rng, resume as resume_checkpoint, save_checkpoint
from .optim import make_adamw
from .schedule import SCHEDULES, lr_at
from .tasks.base import Task


# For the kill -9 tests only: with POLYMODAL_KILL_AT_STEP=N the process SIGKILLs itself after step N's
# logging and checkpointing (no cleanup, no Ctrl-C handler), at a point a test can choose exactly.
_KILL_AT_STEP = int(os.environ.get("POLYMODAL_KILL_AT_STEP", "0") or 0) or None


@dataclass
class TrainArgs:
    """What the Trainer needs from a command's flags (the shared flag vocabulary)."""

    out: str = "runs/train"
    minutes: float = 0.0  # wall-clock budget; 0 = no limit
    max_steps: int = 0  # 0 = epochs x steps per epoch
    epochs: float = 1.0  # used when max_steps is 0 and the task knows its epoch length
    eval_every: int = 0  # 0 = once per epoch (or every 250 steps for streams); < 0 = only at the end
    lr: float = 1e-3
    min_lr: float = 0.0  # the schedule's floor, as a fraction of lr
    warmup: float = 0.0  # steps (>= 1) or a fraction of the planned steps (< 1)
    schedule: str = "cosine"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # AdamW's epsilon (BERT and CLIP used 1e-6)
    grad_accum: int = 1
    grad_clip: float = 1.0
    patience: int = 0  # stop after this many evaluations without a better metric (0 = never)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = at every evaluation
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    fallback: bool = False  # resume from the previous checkpoint when the newest is broken
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    export_best: bool = True  # write <out>/model at each better evaluation (and at the end if none)
    peak_flops: float = 0.0  # MFU denominator (0 = the device's estimate)

    def __post_init__(self):
        if self.minutes is None:
            self.minutes = 0.0
        if self.minutes < 0:
            raise ValueError(f"--minutes must be >= 0 (0 = no limit), got {self.minutes}")
        if self.max_steps is None:
            self.max_steps = 0
        if self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.distributed not in ("auto",) + D.MODES:
            raise ValueError(f"--distributed must be auto, none, ddp or fsdp, got {self.distributed!r}")
        for k in ("grad_accum", "log_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    from ..runtime import native_bf16

    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


def default_peak_flops(device: torch.device, dtype: str) -> float:
    """Peak dense FLOP/s for MFU's denominator.

    CPU: threads x 2.5 GHz x 64 fp32 FLOP/cycle (two AVX-512 FMA ports x 16 lanes x 2) = 1.6e11
    per core; native bf16 (AVX512-BF16 dot products, AMX) about twice that. CUDA: the bf16 dense
    tensor-core peak of common parts (fp32/TF32 at half), the A100's for unknown parts."""
    from ..runtime import native_bf16

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
                 "3090": 71e12, "V100": 125e12, "T4": 65e12}
        peak = next((v for k, v in table.items() if k in name), 312e12)
        return peak if dtype == "bf16" else peak / 2
    per_core = 1.6e11 * (2.0 if dtype == "bf16" and native_bf16(device) else 1.0)
    return per_core * torch.get_num_threads()


@contextlib.contextmanager
def preserved_rng():
    """Runs the block between a saved and a restored copy of every global RNG, so what happens
    inside (evaluation, logging) cannot change the random stream training sees."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py, npy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


class Trainer:
    """``Trainer(task, args).fit()`` trains ``task`` and returns a summary dict."""

    def __init__(self, task: Task, args: TrainArgs, recipe: dict[str, Any] | None = None):
        self.task, self.args = task, args
        self.recipe = recipe if recipe is not None else {}
        self.out = Path(args.out)
        if args.threads:
            torch.set_num_threads(int(args.threads))
        from ..runtime import pick_device

        device = pick_device(args.device)  # refuses --device cuda on a build without CUDA
        mode = args.distributed
        if mode == "auto":
            import os

            mode = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
        self.dist = D.setup(mode, str(device) if args.device != "auto" else "auto")
        self.device = self.dist.device
        self.dtype = resolve_dtype(args.dtype, self.device)
        self._prepare_out_dir()

        ckpt = resume_checkpoint(self.out, fallback=args.fallback) if args.resume else None
        # The same init on every rank: seed before building (DDP also broadcasts rank 0's weights).
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        self.raw_model = task.build_model().to(self.device)
        # Dropout differs per rank; batches are a pure function of the step (Task.batch).
        torch.manual_seed(args.seed + 1 + self.dist.rank)

        self.step, self.items_seen, self.elapsed_before = 0, 0, 0.0
        self.best: float | None = None
        self.best_step, self.bad_evals = 0, 0
        self.decay_steps: int | None = None
        self.last_eval: dict[str, float] | None = None
        fsdp = self.dist.mode == "fsdp" and self.dist.active
        if ckpt is not None and not fsdp:
            self._load_weights(ckpt)
        self.model = D.wrap(self.raw_model, self.dist)
        groups = task.param_groups(self.raw_model)
        self.optimizer = make_adamw(self.raw_model, args.lr, args.weight_decay, (args.beta1, args.beta2),
                                    eps=args.eps, fused=False if fsdp else None, groups=groups)
        if ckpt is not None:
            self._restore(ckpt, fsdp)
        self.planned_steps = self._planned_steps()
        self.step_fn = torch.compile(self.model) if args.compile else self.model
        flops = task.flops_per_item(self.raw_model)
        self.flops_per_item = flops
        self.peak = (args.peak_flops or default_peak_flops(self.device, self.dtype)) * self.dist.world

        self.history: list[dict[str, Any]] = []
        self._writer = None
        self.metrics_path = self.out / "metrics.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg = {"task": task.name, **self.recipe, "trainer": args.to_dict(), "device": str(self.device),
                   "dtype": self.dtype, "world_size": self.dist.world}
            atomic_write_text(self.out / "config.json", json.dumps(cfg, indent=2, default=str))
            self._trim_metrics()
            if args.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if args.resume else None)
                except Exception:  # noqa: BLE001 - tensorboard is optional
                    self._writer = None

    # -- set-up ---------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        ck = self.out / "checkpoints"
        existing = not self.args.resume and ck.is_dir() and any(ck.iterdir())
        D.barrier(self.dist)  # every rank looks before rank 0 may delete
        if existing:
            if not self.args.overwrite:
                raise ValueError(f"{self.out}: already holds checkpoints; pass --resume to continue that run, "
                                 "--overwrite to start over, or choose another --out")
            if self.dist.is_main:
                for sub in ("checkpoints", "tb", "model"):
                    shutil.rmtree(self.out / sub, ignore_errors=True)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            D.barrier(self.dist)

    def _planned_steps(self) -> int | None:
        """max_steps, else epochs x the task's epoch length; None = only the time budget ends the run."""
        a = self.args
        if a.max_steps:
            return a.max_steps
        spe = self.task.steps_per_epoch()
        if spe:
            return max(1, math.ceil(a.epochs * spe / a.grad_accum))
        if not a.minutes:
            raise ValueError("this task streams its data: give --max-steps or --minutes")
        return None

    @property
    def eval_every(self) -> int:
        e = self.args.eval_every
        if e:
            return e
        spe = self.task.steps_per_epoch()
        return max(1, math.ceil(spe / self.args.grad_accum)) if spe else 250

    def _load_weights(self, ck) -> None:
        """The checkpoint's weights into the freshly built model: all of them, or exactly the
        subset the task checkpoints (its frozen rest came from ``build_model()``)."""
        from ..interop.weight_map import load_into

        src = str(ck.folder / "model.safetensors")
        keys = self.task.checkpoint_keys(self.raw_model)
        if keys is None:
            return load_into(self.raw_model, ck.model_sd, src)
        own = self.raw_model.state_dict()
        missing, unexpected = sorted(keys - set(ck.model_sd)), sorted(set(ck.model_sd) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{src}: does not fit this run's model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        for k, v in ck.model_sd.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{src}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        self.raw_model.load_state_dict(dict(ck.model_sd), strict=False)

    def _restore(self, ck, fsdp: bool) -> None:
        st = ck.trainer_state
        self.step = int(st["step"])
        self.items_seen = int(st.get("items_seen", 0))
        self.best = st.get("best")
        self.best_step = int(st.get("best_step", 0))
        self.bad_evals = int(st.get("bad_evals", 0))
        self.decay_steps = st.get("decay_steps")
        self.elapsed_before = float(st.get("elapsed_s", 0.0))
        self.last_eval = st.get("last_eval")
        if fsdp:
            D.load_full_state(self.model, self.optimizer, dict(ck.model_sd), ck.optimizer_sd, self.dist)
        elif ck.optimizer_sd is not None:
            from .checkpoint import _check_optimizer_against

            src = str(ck.folder / "optimizer.safetensors")
            _check_optimizer_against(self.optimizer, ck.optimizer_sd, src)
            try:
                self.optimizer.load_state_dict(ck.optimizer_sd)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{src}: does not fit this model's optimizer ({e})") from None
        rank = self.dist.rank if self.dist.rank in ck.rng else 0
        if ck.rng:
            tensors, meta = ck.rng[rank]
            restore_rng(tensors, meta, None, str(ck.folder / "rng.safetensors"))
            if rank != self.dist.rank:  # more ranks than saved: decorrelate dropout
                torch.manual_seed(self.args.seed + 1 + self.dist.rank + self.step)

    # -- state ----------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    def save(self) -> Path | None:
        """Checkpoint now (a collective in multi-process runs; rank 0 writes)."""
        model_sd, opt_sd = D.full_state(self.model, self.optimizer, self.dist)
        keep = set(model_state(self.raw_model))
        subset = self.task.checkpoint_keys(self.raw_model)
        if subset is not None:
            keep &= subset
        model_sd = {k: v for k, v in model_sd.items() if k in keep}
        rngs = {self.dist.rank: capture_rng(None)}
        if self.dist.active:
            gathered = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, rngs[self.dist.rank])
            rngs = dict(enumerate(gathered))
        path = None
        if self.dist.is_main:
            state = {"step": self.step, "items_seen": self.items_seen, "best": self.best, "best_step": self.best_step,
                     "bad_evals": self.bad_evals, "decay_steps": self.decay_steps, "elapsed_s": self.elapsed,
                     "last_eval": self.last_eval, "metric": self.task.metric, "mode": self.task.mode,
                     "world_size": self.dist.world, "recipe": self.recipe,
                     "weights": "all" if subset is None else "trainable parameters and buffers (the full model is model/)",
                     "data_position": {"micro_batches_drawn": self.step * self.args.grad_accum,
                                       "sampler": "Task.batch(index) is a pure function of the index"}}
            path = save_checkpoint(self.out, step=self.step, model_config=self.raw_model.config, model_sd=model_sd,
                                   optimizer_sd=opt_sd, trainer_state=state, rng=rngs,
                                   tokenizer=self.task.tokenizer if hasattr(self.task.tokenizer, "save") else None,
                                   keep=self.args.keep_checkpoints)
        D.barrier(self.dist)
        return path

    # -- one step -------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_now(self) -> float:
        a = self.args
        total = self.decay_steps or self.planned_steps or 1
        warm = int(a.warmup if a.warmup >= 1 else round(a.warmup * total))
        return lr_at(self.step, lr=a.lr, warmup=warm, decay_steps=total, min_lr=a.min_lr * a.lr, schedule=a.schedule)

    def to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the loss dict averaged over micro-batches and ranks."""
        a = self.args
        self.model.train()
        lr = self.lr_now()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        sums: dict[str, float] = {}
        items = 0
        ddp, fsdp = (self.dist.mode == m and self.dist.active for m in ("ddp", "fsdp"))
        for micro in range(a.grad_accum):
            batch = self.to_device(self.task.batch(self.step * a.grad_accum + micro, self.dist.rank, self.dist.world))
            items += self.task.count(batch)
            sync = micro == a.grad_accum - 1
            ctx = self.model.no_sync() if ddp and not sync else contextlib.nullcontext()
            if fsdp:
                self.model.set_requires_gradient_sync(sync)
            with ctx:
                with self.autocast():
                    out = self.task.loss(self.step_fn, batch)
                (out["loss"] / a.grad_accum).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float() if isinstance(v, torch.Tensor) else v) / a.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if a.grad_clip and a.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
            sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_step(self.raw_model)
        self.step += 1
        self.items_seen += items * self.dist.world
        self.last_lr = lr
        return {k: D.all_reduce_mean(v, self.dist) for k, v in sums.items()}

    def evaluate(self) -> dict[str, float]:
        """The task's metrics, computed between saved and restored RNG states."""
        model = self.model if self.dist.mode == "fsdp" and self.dist.active else self.raw_model
        model.eval()
        with preserved_rng(), torch.no_grad(), self.autocast():
            metrics = self.task.evaluate(model)
        self.raw_model.train()
        if self.task.metric not in metrics:
            raise KeyError(f"task {self.task.name}: evaluate() returned {sorted(metrics)}, not its metric {self.task.metric!r}")
        return {k: float(v) for k, v in metrics.items()}

    def _better(self, v: float) -> bool:
        if self.best is None or not math.isfinite(self.best):
            return math.isfinite(v)
        return v < self.best if self.task.mode == "min" else v > self.best

    def _eval_and_select(self, rec: dict[str, Any]) -> bool:
        """Evaluates, logs, exports a better model; returns True when patience runs out."""
        m = self.evaluate()
        self.last_eval, self._eval_step = m, self.step
        rec = {**rec, **{f"val_{k}": v for k, v in m.items()}}
        self.log(rec)
        v = m[self.task.metric]
        if self._better(v):
            self.best, self.best_step, self.bad_evals = v, self.step, 0
            if self.args.export_best:
                self.export()
        else:
            self.bad_evals += 1
        self.plot()
        return bool(self.args.patience) and self.bad_evals >= self.args.patience

    def export(self) -> None:
        """``<out>/model`` from rank 0; under FSDP the shards are gathered first (a collective)."""
        model = self.raw_model
        if self.dist.mode == "fsdp" and self.dist.active:
            from ..interop.weight_map import load_into

            sd, _ = D.full_state(self.model, self.optimizer, self.dist)
            if self.dist.is_main:
                with preserved_rng():
                    model = self.task.build_model()
                keep = set(model_state(model))
                load_into(model, {k: v for k, v in sd.items() if k in keep}, "gathered FSDP state")
        if self.dist.is_main:
            self.task.export(model, self.out / "model")
        D.barrier(self.dist)

    # -- logging --------------------------------------------------------------------------------
    def _trim_metrics(self) -> None:
        """On resume drop the records past the checkpoint, so metrics.jsonl reads as one run."""
        self.history = []
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= self.step:
                keep.append(line)
                self.history.append(rec)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def log(self, rec: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.history.append(rec)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, rec["step"])

    def plot(self) -> None:
        if self.dist.is_main and self.args.plot:
            plot_curve(self.history, self.out / "curve.png", self.task.metric)

    def _bar(self):
        if not (self.dist.is_main and self.args.progress):
            return None
        from tqdm.auto import tqdm

        if self.args.minutes:
            # a wall-clock budget: the bar counts its seconds, so the ETA is honest from the start
            # (a step count would show e.g. 0/100000 and a made-up ETA until the speed is known)
            total = self.args.minutes * 60
            return tqdm(total=round(total), initial=min(round(self.elapsed_before), round(total)), unit="s",
                        desc=self.task.name, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s "
                        "[{elapsed}<{remaining}{postfix}]")
        return tqdm(total=self.planned_steps, initial=self.step, unit="step", desc=self.task.name, dynamic_ncols=True)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Trains until the planned steps, the time budget, patience or ``stop_at`` (tests); then a
        final evaluation, checkpoint and curve. Ctrl-C checkpoints before re-raising."""
        a = self.args
        budget = a.minutes * 60 if a.minutes else None
        last = self.planned_steps if self.planned_steps is not None else math.inf
        if stop_at is not None:
            last = min(last, stop_at)
        every = self.eval_every
        ckpt_every = a.checkpoint_every or (every if a.eval_every >= 0 else 0)  # 0: only at the end
        self._t0 = time.perf_counter()
        self._start_step = self.step
        bar = self._bar()
        win_t, win_items, stop_reason = time.perf_counter(), 0, "max_steps"
        try:
            while self.step < last:
                if budget is not None and self.elapsed >= budget:
                    stop_reason = "time budget"
                    break
                items0 = self.items_seen
                losses = self.train_step()
                win_items += self.items_seen - items0
                if not math.isfinite(losses["loss"]):
                    raise FloatingPointError(f"loss is {losses['loss']} at step {self.step}; lower --lr or check the data")
                if budget is not None and (self.step - self._start_step == 20 or
                                           (self.decay_steps is not None and self.step % every == 0)):
                    self._fit_schedule_to_budget(budget)
                rec: dict[str, Any] | None = None
                if self.step % a.log_every == 0 or self.step == last:
                    now = time.perf_counter()
                    rate = win_items / max(now - win_t, 1e-9)
                    win_t, win_items = now, 0
                    rec = {"step": self.step, **losses, "lr": self.last_lr, f"{self.task.unit}_per_s": rate,
                           f"{self.task.unit}_seen": self.items_seen, "elapsed_s": round(self.elapsed, 3)}
                    if self.flops_per_item:
                        rec["mfu"] = self.flops_per_item * rate / self.peak
                    self._postfix(bar, losses["loss"], rate)
                if self.step == last or (a.eval_every >= 0 and self.step % every == 0):
                    patience_out = self._eval_and_select(rec or {"step": self.step, **losses, "lr": self.last_lr,
                                                                 "elapsed_s": round(self.elapsed, 3)})
                    rec = None
                    win_t = time.perf_counter()  # eval time is not training throughput
                    self._postfix(bar, losses["loss"], None)
                    if patience_out:
                        stop_reason = "patience"
                        if ckpt_every and self.step % ckpt_every == 0:
                            self.save()
                        break
                if rec is not None:
                    self.log(rec)
                if ckpt_every and self.step % ckpt_every == 0 and self.step < last:
                    self.save()
                self._advance(bar)
                if self.step == _KILL_AT_STEP:  # tests: a real kill -9 at a chosen point (see below)
                    os.kill(os.getpid(), signal.SIGKILL)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            path = self.save()
            if self.dist.is_main:
                print(f"\ninterrupted at step {self.step}; checkpoint saved to {path}; continue with --resume")
            raise
        if bar is not None:
            self._advance(bar)
            bar.close()
        return self._finish(stop_reason)

    def _finish(self, stop_reason: str) -> dict[str, Any]:
        if getattr(self, "_eval_step", None) != self.step:  # the same on every rank (history is rank 0's)
            self._eval_and_select({"step": self.step, "elapsed_s": round(self.elapsed, 3)})
        path = self.save()
        if self.args.export_best and not (self.out / "model").is_dir():
            self.export()
        self.plot()
        if self._writer is not None:
            self._writer.flush()
        summary = {"task": self.task.name, "step": self.step, "stop_reason": stop_reason, "metric": self.task.metric,
                   "best": self.best, "best_step": self.best_step, "last": self.last_eval,
                   "elapsed_s": round(self.elapsed, 1), f"{self.task.unit}_seen": self.items_seen,
                   "checkpoint": str(path) if path else None,
                   "model": str(self.out / "model") if self.args.export_best else None}
        if self.dist.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary

    def _postfix(self, bar, loss: float, rate: float | None) -> None:
        if bar is None:
            return
        post = {"step": self.step, "loss": f"{loss:.4f}"}
        if self.last_eval is not None:
            post[self.task.metric] = f"{self.last_eval[self.task.metric]:.4g}"
        if rate is not None:
            post[f"{self.task.unit}/s"] = f"{rate:,.0f}"
        bar.set_postfix(post, refresh=False)

    def _advance(self, bar) -> None:
        if bar is None:
            return
        if bar.unit == "s":
            bar.update(max(0, min(round(self.elapsed), bar.total) - bar.n))
        else:
            bar.update(self.step - bar.n)

    def _fit_schedule_to_budget(self, budget: float) -> None:
        """With a wall-clock budget the decay should end when time runs out: estimate the steps
        that fit from the time per step so far (evaluations included); re-estimated at every
        evaluation, since a shared machine's speed drifts, and checkpointed for resume."""
        done = self.step - self._start_step
        per_step = (self.elapsed - self.elapsed_before) / max(done, 1)
        est = int(self.step + max(budget - self.elapsed, 0.0) / per_step * 0.98)
        est = D.broadcast_object(est, self.dist)
        cap = self.planned_steps if self.planned_steps is not None else est
        self.decay_steps = max(min(est, cap), self.step, 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        D.cleanup(self.dist)


def plot_curve(history: list[dict[str, Any]], path: str | Path, metric: str = "loss") -> None:
    """Train loss and the val metric against the step (a second axis when the metric is not a loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if isinstance(r.get("loss"), (int, float))]
    key = f"val_{metric}"
    va = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if "loss" in metric else "train loss")
    ax.grid(alpha=0.3)
    if va:
        if "loss" in metric:
            ax.plot(*zip(*va), "o-", label=key, lw=1.5, ms=3, color="tab:orange")
            ax.legend()
        else:
            ax2 = ax.twinx()
            ax2.plot(*zip(*va), "o-", label=key, lw=1.5, ms=3, color="tab:orange")
            ax2.set_ylabel(key)
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    elif tr:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def fit(task: Task, args: TrainArgs, recipe: dict[str, Any] | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Builds a :class:`Trainer`, fits, closes; returns the summary."""
    trainer = Trainer(task, args, recipe)
    try:
        return trainer.fit(stop_at=stop_at)
    finally:
        trainer.close()


def args_from_flags(flags: dict[str, Any], **fixed: Any) -> TrainArgs:
    """The :class:`TrainArgs` part of a command's flags (its keyword arguments): every key TrainArgs
    knows is taken (None means "the default"), ``fixed`` sets what the command decides itself."""
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    kw = {k: v for k, v in flags.items() if k in names and v is not None}
    kw.update(fixed)
    return TrainArgs(**kw)


def run(task: Task, flags: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """What a training command calls: TrainArgs from its flags, the flags saved in ``config.json``
    (so ``--resume`` alone continues the same recipe), fit, close, the summary."""
    args = args_from_flags(flags, **fixed)
    return fit(task, args, recipe={"flags": {k: v for k, v in flags.items() if _jsonable(v)}})


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
