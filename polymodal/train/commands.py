"""``polymodal train``: train a GPT from a YAML recipe (see ``configs/*.yaml`` and ``TrainConfig``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path as given, else relative to the repository's (or the package's) ``configs/``."""
    p = Path(recipe)
    candidates = [p, REPO_ROOT / p, REPO_ROOT / "configs" / p.name, Path(__file__).resolve().parents[1] / "configs" / p.name]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"recipe {recipe}: not found (looked in {', '.join(str(c) for c in candidates)})")


def load_recipe(recipe: str | Path, **overrides) -> dict[str, Any]:
    import yaml

    path = resolve_recipe(recipe)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of TrainConfig fields")
    d.pop("description", None)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return d


def train(recipe: str, out: str = "runs/train", resume: bool = False, fallback: bool = False, overwrite: bool = False,
          max_minutes: float | None = None, max_steps: int | None = None, data: str | None = None,
          dtype: str | None = None, distributed: str | None = None, compile: bool | None = None,
          seed: int | None = None) -> dict:
    """Train a GPT from a YAML recipe (multi-process: torchrun --nproc-per-node N -m polymodal.cli train ...).

    Args:
        recipe: YAML recipe (a path, or a name in configs/, e.g. shakespeare-char.yaml)
        out: run folder (checkpoints/, metrics.jsonl, loss.png, tb/)
        resume: continue from <out>/checkpoints/latest
        fallback: with --resume, fall back to the previous checkpoint if the newest is broken
        overwrite: start over in an --out folder that already holds checkpoints (deletes them)
        max_minutes: time budget; training stops, evaluates and saves when it is spent
        max_steps: number of optimizer steps (overrides the recipe)
        data: token-shard folder from 'polymodal prepare' (overrides the recipe)
        dtype: auto, bf16 or fp32 (overrides the recipe)
        distributed: none, ddp or fsdp (overrides the recipe; launch with torchrun)
        compile: torch.compile the model (overrides the recipe)
        seed: random seed (overrides the recipe)
    """
    from .loop import train as run

    d = load_recipe(recipe, max_minutes=max_minutes, max_steps=max_steps, data=data, dtype=dtype,
                    distributed=distributed, compile=compile, seed=seed)
    res = run(d, out, resume=resume, fallback=fallback, overwrite=overwrite)
    if res.get("checkpoint"):
        print(json.dumps(res, indent=2))
    return res
