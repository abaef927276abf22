"""YAML recipes for ``polymodal train`` (``configs/*.yaml``, fields of ``loop.TrainConfig``)."""
from __future__ import annotations

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
