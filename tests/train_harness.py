"""Shared checks for every training command and Task (imported by the test files, not collected).

* :func:`kill9_resume_matches` runs a command to the end in one folder; in another it runs the same
  command with ``POLYMODAL_KILL_AT_STEP`` so the process SIGKILLs itself mid-run (a real kill -9:
  no handler, no cleanup), then ``--resume``; the final checkpoints' weights must be equal bit for
  bit and the metrics.jsonl training records equal (timings aside).
* :func:`two_ranks_match_one` trains a Task with 2 gloo processes (DDP) and with one process on the
  same global batch; losses and final weights must agree to 1e-5.
* :func:`losses` reads metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("elapsed_s", "_per_s", "mfu", "grad_norm_time")


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=REPO)


def records(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def _untimed(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not any(t in k for t in TIMING_KEYS)}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ck = Path(out) / "checkpoints"
    return load_file(str(ck / (ck / "latest").read_text().strip() / "model.safetensors"))


def kill9_resume_matches(args: list[str], tmp: Path, kill_at: int, out_flag: str = "--out") -> None:
    """``args`` must end training on a step count (--max-steps) and checkpoint before ``kill_at``."""
    a, b = tmp / "uninterrupted", tmp / "killed"
    r = run_cli([*args, out_flag, str(a)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*args, out_flag, str(b)], env={"POLYMODAL_KILL_AT_STEP": str(kill_at)})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert not (b / "summary.json").exists()  # it really died mid-run
    r = run_cli([*args, out_flag, str(b), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs after kill -9 + resume"
    ra, rb = [_untimed(x) for x in records(a)], [_untimed(x) for x in records(b)]
    assert ra == rb, "metrics.jsonl differs after kill -9 + resume"
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["last"] == sb["last"] and sa["best"] == sb["best"] and sa["step"] == sb["step"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, factory: Callable, fkw: dict, akw: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from polymodal.train.trainer import TrainArgs, Trainer

    t = Trainer(factory(**fkw), TrainArgs(out=out, distributed="ddp", **akw))
    t.fit()
    save_file({n: p.detach().clone().contiguous() for n, p in t.raw_model.named_parameters()},
              str(Path(out) / f"params-rank{rank}.safetensors"))
    t.close()


def two_ranks_match_one(factory: Callable, factory_kwargs: dict, tmp: Path, atol: float = 1e-5, **args_kwargs) -> None:
    """``factory(**factory_kwargs)`` must be a module-level callable returning the Task (it is
    pickled by reference into the worker processes). Dropout must be off (ranks draw their own)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from polymodal.train.trainer import TrainArgs, Trainer

    akw = {"progress": False, "tensorboard": False, "plot": False, "dtype": "fp32", "device": "cpu", **args_kwargs}
    one = tmp / "one"
    torch.set_num_threads(1)
    t = Trainer(factory(**factory_kwargs), TrainArgs(out=str(one), **akw))
    t.fit()
    ref = {n: p.detach().clone() for n, p in t.raw_model.named_parameters()}
    t.close()
    two = tmp / "two"
    mp.spawn(_rank_worker, args=(2, _free_port(), factory, factory_kwargs, akw, str(two)), nprocs=2, join=True)
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) > 0
    assert l2 == __import__("pytest").approx(l1, abs=atol, rel=0)
    p0 = load_file(str(two / "params-rank0.safetensors"))
    p1 = load_file(str(two / "params-rank1.safetensors"))
    for k in ref:
        assert torch.equal(p0[k], p1[k]), k
        torch.testing.assert_close(p0[k], ref[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def loss_falls(out: Path, first_n: int = 3, last_n: int = 3, margin: float = 0.0) -> tuple[float, float]:
    ls = losses(out)
    assert len(ls) >= first_n + last_n, ls
    a, b = sum(ls[:first_n]) / first_n, sum(ls[-last_n:]) / last_n
    assert b < a - margin, f"loss did not fall: first {a:.4f}, last {b:.4f}"
    return a, b
