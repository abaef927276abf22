"""``polymodal train``: a GPT from a YAML recipe (``configs/*.yaml``), on the one Trainer."""
from __future__ import annotations

import json


def train(recipe: str, data: str | None = None, out: str = "runs/train", minutes: float | None = None,
          max_steps: int | None = None, eval_every: int | None = None, batch_size: int | None = None,
          lr: float | None = None, device: str | None = None, dtype: str | None = None, resume: bool = False,
          overwrite: bool = False, fallback: bool = False, distributed: str | None = None,
          compile: bool | None = None, seed: int | None = None, threads: int | None = None) -> dict:
    """Train a GPT from a YAML recipe (multi-process: torchrun --nproc-per-node N -m polymodal.cli train ...).

    Args:
        recipe: YAML recipe (a path, or a name in configs/: shakespeare-char.yaml, nano-test.yaml, gpt2-small-owt-style.yaml)
        data: token-shard folder from 'polymodal prepare' (overrides the recipe)
        out: run folder (config.json, metrics.jsonl, curve.png, tb/, checkpoints/, model/)
        minutes: wall-clock training budget, 0 = no limit (overrides the recipe)
        max_steps: optimizer steps (overrides the recipe)
        eval_every: evaluate (and checkpoint) every N steps (overrides the recipe)
        batch_size: windows per micro-step, over all ranks (overrides the recipe)
        lr: peak learning rate (overrides the recipe)
        device: auto, cpu, cuda, cuda:N (overrides the recipe)
        dtype: auto, bf16 or fp32 (overrides the recipe)
        resume: continue from <out>/checkpoints/latest
        overwrite: start over in an --out folder that already holds checkpoints (deletes them)
        fallback: with --resume, fall back to the previous checkpoint if the newest is broken
        distributed: none, ddp or fsdp (overrides the recipe; launch with torchrun)
        compile: torch.compile the model (overrides the recipe)
        seed: random seed (overrides the recipe)
        threads: torch threads (overrides the recipe)
    """
    from ..train.loop import train as run
    from ..train.recipes import load_recipe

    if minutes is not None and minutes < 0:
        raise ValueError(f"--minutes must be >= 0 (0 = no limit), got {minutes}")
    d = load_recipe(recipe, data=data, max_minutes=minutes, max_steps=max_steps, eval_interval=eval_every,
                    batch_size=batch_size, lr=lr, device=device, dtype=dtype, distributed=distributed,
                    compile=compile, seed=seed, threads=threads)
    res = run(d, out, resume=resume, fallback=fallback, overwrite=overwrite)
    print(json.dumps({k: res[k] for k in ("step", "stop_reason", "val_loss", "val_ppl", "best", "elapsed_s",
                                          "checkpoint", "model")}, indent=2))
    return res
