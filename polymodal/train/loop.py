"""The training loop for causal language models (GPT family).

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

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import TokenShards
from ..io import CheckpointError, read_json, save_figure
from ..models.gpt import GPT, GPTConfig, lm_loss
from . import distributed as D
from .checkpoint import capture_rng, model_state, restore_rng, resume as resume_checkpoint, save_checkpoint
from .optim import make_adamw
from .schedule import SCHEDULES, lr_at


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


# ------------------------------------------------------------------------------------------------
# hardware helpers
def cpu_has_fast_bf16() -> bool:
    """AMX tiles or AVX512-BF16: only then is a bf16 matmul faster than fp32 on a CPU
    (without them bf16 is converted to fp32 and is slower; measured on this repo's CI CPU)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # noqa: BLE001 - capability probes must never break training
                pass
    return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def default_peak_flops(device: torch.device, dtype: str) -> float:
    """Peak dense FLOP/s used as MFU's denominator (override with the recipe's ``peak_flops``).

    CPU: threads x 2.5 GHz x 64 fp32 FLOP/cycle (two AVX-512 FMA ports x 16 lanes x 2) = 1.6e11
    per core, so ~3e11 for 2 cores; bf16 with AMX ~5x that (~1.5e12 for 2 cores), otherwise the
    fp32 figure (bf16 is emulated). CUDA: bf16 dense tensor-core peak of common parts, fp32 /
    TF32 at half of it; unknown parts fall back to the A100's 312 TFLOP/s.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
                 "3090": 71e12, "V100": 125e12, "T4": 65e12}
        peak = next((v for k, v in table.items() if k in name), 312e12)
        return peak if dtype == "bf16" else peak / 2
    per_core = 1.6e11 * (5.0 if dtype == "bf16" and cpu_has_fast_bf16() else 1.0)
    return per_core * torch.get_num_threads()


def flops_per_token(model: GPT, seq_len: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if model.wpe is not None:  # a position table is a lookup, not a matmul
        n -= sum(p.numel() for p in model.wpe.parameters())
    return 6 * n + 12 * c.n_layer * seq_len * c.n_head * c.hd


# ------------------------------------------------------------------------------------------------
# data
def load_data(folder: str | Path):
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; prepare token shards first (polymodal prepare)")
    meta = read_json(meta_path)
    dtype = meta.get("dtype", "uint16")
    out = {}
    for split in ("train", "val"):
        p = folder / f"{split}.bin"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (expected next to {meta_path.name})")
        out[split] = TokenShards(p, dtype)
    return out["train"], out["val"], meta


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from ..tokenizers import Tokenizer

        return Tokenizer.load(folder)
    except Exception:  # noqa: BLE001 - a checkpoint is still useful without its tokenizer
        return None


# ------------------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimizer, data and run folder of one training run.

    ``Trainer(recipe, out).fit()`` trains until ``max_steps`` or ``max_minutes``, evaluating every
    ``eval_interval`` steps and checkpointing to ``<out>/checkpoints``; ``resume=True`` continues
    from ``<out>/checkpoints/latest``.
    """

    def __init__(self, recipe: TrainConfig | dict, out: str | Path = "runs/train", *, resume: bool = False,
                 fallback: bool = False, overwrite: bool = False):
        self.cfg = recipe if isinstance(recipe, TrainConfig) else TrainConfig.from_dict(recipe)
        cfg = self.cfg
        self.out = Path(out)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.dist = D.setup(cfg.distributed, cfg.device)
        self.device = self.dist.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {self.dist.world} ranks")

        self.train_data, self.val_data, self.meta = load_data(cfg.data)
        self.tokenizer = _load_tokenizer(Path(cfg.data))
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("vocab_size", int(self.meta["vocab_size"]))
        overrides.setdefault("block_size", cfg.block_size)
        if cfg.block_size > overrides["block_size"]:
            raise ValueError(f"recipe block_size {cfg.block_size} exceeds the model's context {overrides['block_size']}")

        ckpt = None
        existing = not resume and (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir())
        D.barrier(self.dist)  # every rank looks before rank 0 may delete
        if existing:
            if not overwrite:
                raise ValueError(f"{self.out}: already holds checkpoints; pass resume=True to continue that run, "
                                 "overwrite=True to start over, or choose another output folder")
            if self.dist.is_main:
                import shutil

                for sub in ("checkpoints", "tb"):
                    shutil.rmtree(self.out / sub, ignore_errors=True)
            D.barrier(self.dist)
        if resume:
            ckpt = resume_checkpoint(self.out, fallback=fallback)
            model_config = ckpt.config
        else:
            model_config = GPTConfig.from_preset(cfg.model, **overrides)
        # The same init on every rank: seed before building (DDP also broadcasts rank 0's weights).
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(model_config).to(self.device)
        self.flops_per_token = flops_per_token(self.raw_model, cfg.block_size)
        # tokens/s counts the whole job, so the denominator is the peak of all ranks together
        self.peak = cfg.peak_flops or default_peak_flops(self.device, self.dtype) * self.dist.world
        # Dropout differs per rank; the data sampler is shared so all ranks draw the same global batch
        # and each takes its slice (1 rank x B == 2 ranks x B/2 exactly).
        torch.manual_seed(cfg.seed + 1 + self.dist.rank)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.step = 0
        self.tokens_seen = 0
        self.best_val = math.inf
        self.decay_steps = cfg.decay_steps
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        self._last_eval: tuple[int, float] | None = None

        fsdp = self.dist.mode == "fsdp" and self.dist.active
        if ckpt is not None and not fsdp:
            from ..interop.weight_map import load_into

            load_into(self.raw_model, ckpt.model_sd, str(ckpt.folder / "model.safetensors"))
        # FSDP2 swaps parameters for sharded DTensors, so the optimizer is built after wrapping.
        self.model = D.wrap(self.raw_model, self.dist)
        self.optimizer = make_adamw(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                    fused=False if fsdp else None)
        if ckpt is not None:
            self._restore(ckpt, fsdp)
        self.step_fn = self.model
        if cfg.compile:
            self.step_fn = torch.compile(self.model)

        self._writer = None
        self._metrics_path = self.out / "metrics.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            self._trim_metrics()
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if resume else None)
                except Exception:  # noqa: BLE001 - tensorboard is optional
                    self._writer = None

    # -- state --------------------------------------------------------------------------------
    def _restore(self, ck, fsdp: bool) -> None:
        st = ck.trainer_state
        self.step = int(st["step"])
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.best_val = float(st.get("best_val_loss") or math.inf)
        self.decay_steps = st.get("decay_steps", self.decay_steps)
        self.elapsed_before = float(st.get("elapsed_s", 0.0))
        if fsdp:
            sd = dict(ck.model_sd)
            if ck.config.tie_embeddings:
                sd["lm_head.weight"] = sd["wte.weight"]
            D.load_full_state(self.model, self.optimizer, sd, ck.optimizer_sd, self.dist)
        else:
            if ck.optimizer_sd is not None:
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
            restore_rng(tensors, meta, self.data_gen, str(ck.folder / "rng.safetensors"))
            if rank != self.dist.rank:  # a resume with more ranks than saved: decorrelate dropout
                torch.manual_seed(self.cfg.seed + 1 + self.dist.rank + self.step)

    def save(self) -> Path | None:
        """Checkpoint now (a collective in multi-process runs; rank 0 writes)."""
        model_sd, opt_sd = D.full_state(self.model, self.optimizer, self.dist)
        keep = set(model_state(self.raw_model))
        model_sd = {k: v for k, v in model_sd.items() if k in keep}
        rngs = {self.dist.rank: capture_rng(self.data_gen)}
        if self.dist.active:
            gathered = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, rngs[self.dist.rank])
            rngs = dict(enumerate(gathered))
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen,
                "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                "decay_steps": self.decay_steps, "elapsed_s": self.elapsed,
                "recipe": self.cfg.to_dict(), "world_size": self.dist.world,
                "data_position": {"sampler": "uniform random windows", "generator": "rng.safetensors:data_generator",
                                  "windows_drawn": self.step * self.cfg.grad_accum * self.cfg.batch_size},
            }
            path = save_checkpoint(self.out, step=self.step, model_config=self.raw_model.config, model_sd=model_sd,
                                   optimizer_sd=opt_sd, trainer_state=state, rng=rngs, tokenizer=self.tokenizer,
                                   keep=self.cfg.keep_checkpoints)
        D.barrier(self.dist)
        return path

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    # -- one step -------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _rank_slice(self, x: torch.Tensor) -> torch.Tensor:
        per = x.shape[0] // self.dist.world
        return x[self.dist.rank * per:(self.dist.rank + 1) * per]

    def train_step(self) -> float:
        """One optimizer step; returns the mean loss over the global batch."""
        cfg = self.cfg
        self.model.train()
        lr = lr_at(self.step, lr=cfg.lr, warmup=cfg.warmup, decay_steps=self.decay_steps or cfg.max_steps,
                   min_lr=cfg.min_lr, schedule=cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.train_data.get_batch(cfg.batch_size, cfg.block_size, self.data_gen)
            x, y = self._rank_slice(x).to(self.device), self._rank_slice(y).to(self.device)
            sync = micro == cfg.grad_accum - 1
            ctx = self.model.no_sync() if (self.dist.mode == "ddp" and self.dist.active and not sync) else contextlib.nullcontext()
            if self.dist.mode == "fsdp" and self.dist.active:
                self.model.set_requires_gradient_sync(sync)
            with ctx:
                with self._autocast():
                    loss = lm_loss(self.step_fn(x), y)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float().item() / cfg.grad_accum
        if cfg.grad_clip and cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.last_grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.block_size * cfg.grad_accum
        self.last_lr = lr
        return D.all_reduce_mean(total, self.dist)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of validation windows (the same windows at every eval)."""
        cfg = self.cfg
        self.model.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 3)
        losses = []
        for _ in range(cfg.eval_batches):
            x, y = self.val_data.get_batch(cfg.batch_size, cfg.block_size, gen)
            x, y = self._rank_slice(x).to(self.device), self._rank_slice(y).to(self.device)
            with self._autocast():
                losses.append(float(lm_loss(self.model(x), y)))
        self.model.train()
        return D.all_reduce_mean(sum(losses) / len(losses), self.dist)

    # -- logging --------------------------------------------------------------------------------
    def _trim_metrics(self) -> None:
        """On resume drop records past the checkpoint, so metrics.jsonl reads as one run."""
        self.history = []
        if not self._metrics_path.is_file():
            return
        keep = []
        for line in self._metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= self.step:
                keep.append(line)
                self.history.append(rec)
        self._metrics_path.write_text("".join(k + "\n" for k in keep))

    def log(self, rec: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.history.append(rec)
        with open(self._metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, rec["step"])

    def plot(self) -> None:
        if not (self.dist.is_main and self.cfg.plot):
            return
        plot_losses(self.history, self.out / "loss.png")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Trains to ``max_steps`` (or ``stop_at``) or until ``max_minutes`` is spent; then a final
        eval and checkpoint. Ctrl-C checkpoints before re-raising."""
        cfg = self.cfg
        last = min(cfg.max_steps, stop_at) if stop_at else cfg.max_steps
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        self._t0 = time.perf_counter()
        self._start_step = self.step
        self._budget_fitted = self.decay_steps is not None and cfg.decay_steps is None and budget is not None
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=last, initial=self.step, desc="train", dynamic_ncols=True, leave=True)
        window_t, window_tokens = time.perf_counter(), 0
        stop_reason = "max_steps"
        val_loss = None
        try:
            while self.step < last:
                if budget is not None and self.elapsed >= budget:
                    stop_reason = "time budget"
                    break
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}; lower lr or check the data")
                window_tokens += cfg.batch_size * cfg.block_size * cfg.grad_accum
                if budget is not None and cfg.decay_steps is None and (
                        (self.decay_steps is None and self.step - self._start_step == 20)
                        or (self._budget_fitted and self.step % cfg.eval_interval == 0)):
                    self._fit_schedule_to_budget(budget)
                    if bar is not None:  # show the steps the budget is expected to allow
                        bar.total = min(self.decay_steps, last)
                        bar.refresh()
                rec = None
                if self.step % cfg.log_interval == 0 or self.step == last:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    rec = {"step": self.step, "loss": loss, "lr": self.last_lr, "tokens": self.tokens_seen,
                           "tokens_per_s": tps, "mfu": self.flops_per_token * tps / self.peak,
                           "elapsed_s": round(self.elapsed, 3)}
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
                if self.step % cfg.eval_interval == 0:
                    val_loss = self._eval_record(rec or {"step": self.step, "loss": loss, "lr": self.last_lr,
                                                         "tokens": self.tokens_seen, "elapsed_s": round(self.elapsed, 3)})
                    rec = None
                    window_t = time.perf_counter()  # do not charge eval time to training throughput
                if rec is not None:
                    self.log(rec)
                if self.step % ckpt_every == 0 and self.step < last:
                    self.save()
                if bar is not None:
                    bar.update(1)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            path = self.save()
            if self.dist.is_main:
                print(f"\ninterrupted at step {self.step}; checkpoint saved to {path}")
            raise
        if bar is not None:
            bar.close()
        if self._last_eval is not None and self._last_eval[0] == self.step:  # same on every rank
            val_loss = self._last_eval[1]
        else:
            val_loss = self._eval_record({"step": self.step, "tokens": self.tokens_seen,
                                          "elapsed_s": round(self.elapsed, 3)})
        path = self.save()
        self.plot()
        if self._writer is not None:
            self._writer.flush()
        return {"step": self.step, "tokens": self.tokens_seen, "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 50)), "best_val_loss": self.best_val,
                "elapsed_s": self.elapsed, "stop_reason": stop_reason, "checkpoint": str(path) if path else None}

    def _eval_record(self, rec: dict[str, Any]) -> float:
        v = self.evaluate()
        self._last_eval = (self.step, v)
        self.best_val = min(self.best_val, v)
        rec = {**rec, "val_loss": v, "val_ppl": math.exp(min(v, 50))}
        self.log(rec)
        self.plot()
        return v

    def _fit_schedule_to_budget(self, budget: float) -> None:
        """With a time budget and no explicit decay_steps, the cosine should end when time runs
        out: estimate the steps that fit from the time per step so far (evals included) and set
        decay_steps; re-estimated at every eval, since a shared machine's speed drifts. The value
        is checkpointed, so a resume continues on the same schedule."""
        done = self.step - self._start_step
        per_step = (self.elapsed - self.elapsed_before) / max(done, 1)
        est = int(self.step + max(budget - self.elapsed, 0.0) / per_step * 0.98)
        est = D.broadcast_object(est, self.dist)
        self.decay_steps = max(min(est, self.cfg.max_steps), self.cfg.warmup + 1, self.step)
        self._budget_fitted = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        D.cleanup(self.dist)


def plot_losses(history: list[dict[str, Any]], path: str | Path) -> None:
    """Train and val loss against step, written with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def train(recipe: TrainConfig | dict, out: str | Path = "runs/train", *, resume: bool = False,
          fallback: bool = False, overwrite: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """Builds a :class:`Trainer`, fits, closes; returns the final summary dict."""
    trainer = Trainer(recipe, out, resume=resume, fallback=fallback, overwrite=overwrite)
    try:
        return trainer.fit(stop_at=stop_at)
    finally:
        trainer.close()
