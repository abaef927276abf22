"""Training checkpoints: one folder per save, written atomically, validated on load.

Layout of ``<run>/checkpoints/step-0000123/``::

    config.json            model config with "family" (rebuilds the model via polymodal.models.registry)
    model.safetensors      weights (tied weights stored once)
    tokenizer*.json        when a tokenizer is given
    optimizer.safetensors  AdamW state flattened to tensors "state.<i>.<key>"; the non-tensor parts
                           (param_groups, scalar state) are JSON in the safetensors metadata
    rng.safetensors        torch CPU / CUDA / data-sampler generator states, python and numpy RNGs
                           (one file per rank in multi-process training: rng-rank<r>.safetensors)
    trainer_state.json     step, tokens seen, best val loss, recipe, data position, and a SHA-256 of
                           every file above and of every tensor in it

Nothing is pickled. A save is built in a temporary sibling folder and renamed into place
(``polymodal.io.atomic_dir``); only then is ``<run>/checkpoints/latest`` rewritten
(``atomic_write_text``), so a crash at any point leaves the previous checkpoint and the
pointer to it intact. Loading re-hashes every file: a truncated or bit-flipped file raises
``CheckpointError`` naming the file and, where it can be located, the tensor.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..io import CheckpointError, atomic_dir, atomic_write_text, load_safetensors, read_json, save_safetensors

STEP_RE = re.compile(r"^step-(\d+)$")
REQUIRED = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# hashing
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# optimizer state <-> tensors
def optimizer_to_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flattens ``optimizer.state_dict()`` into named tensors plus JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().to("cpu")
            else:
                scalars.setdefault(str(idx), {})[k] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalar_state": json.dumps(scalars),
            "format": "polymodal-optimizer-v1"}
    return tensors, meta


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> dict:
    try:
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("scalar_state", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: optimizer metadata missing or not JSON ({e})") from None
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        # keys are "state.<param index or FQN>.<slot>"; slot names (exp_avg, step...) have no dots
        m = re.fullmatch(r"state\.(.+)\.([^.]+)", name)
        if not m:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
        state.setdefault(_key(m.group(1)), {})[m.group(2)] = t
    for idx, st in scalars.items():
        state.setdefault(_key(idx), {}).update(st)
    return {"state": state, "param_groups": groups}


def _key(k: str) -> int | str:
    return int(k) if k.isdigit() else k


def _check_optimizer_against(optimizer: torch.optim.Optimizer, sd: dict, source: str) -> None:
    """Every saved moment tensor must match its parameter's shape (names the tensor if not)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_saved != len(params) or len(sd["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{source}: optimizer has {n_saved} parameters in {len(sd['param_groups'])} groups, "
                              f"the model's optimizer has {len(params)} in {len(optimizer.param_groups)}")
    for idx, st in sd["state"].items():
        if not isinstance(idx, int) or idx >= len(params):
            raise CheckpointError(f"{source}: state for parameter {idx} but there are only {len(params)}")
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.ndim and tuple(v.shape) != tuple(params[idx].shape):
                raise CheckpointError(f"{source}: tensor 'state.{idx}.{k}' has shape {tuple(v.shape)}, "
                                      f"parameter {idx} has shape {tuple(params[idx].shape)}")


# --------------------------------------------------------------------------------------------
# RNG states as tensors
def capture_rng(data_generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every RNG that influences training (dropout, sampling of batches), as tensors."""
    t = {"torch_cpu": torch.get_rng_state()}
    if data_generator is not None:
        t["data_generator"] = data_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"torch_cuda.{i}"] = s
    version, mt, gauss = random.getstate()
    t["python_mt"] = torch.tensor(mt, dtype=torch.int64)  # 625 uint32 words fit int64 exactly
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    t["numpy_mt"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    return t, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str], data_generator: torch.Generator | None = None,
                source: str = "rng.safetensors") -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        if data_generator is not None:
            data_generator.set_state(tensors["data_generator"])
        cuda = sorted(k for k in tensors if k.startswith("torch_cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        version, gauss = json.loads(meta["python"])
        random.setstate((version, tuple(int(x) for x in tensors["python_mt"].tolist()), gauss))
        name, pos, has_gauss, g = json.loads(meta["numpy"])
        np.random.set_state((name, tensors["numpy_mt"].numpy().astype(np.uint32), pos, has_gauss, g))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing RNG entry {e}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: invalid RNG state ({e})") from None


# --------------------------------------------------------------------------------------------
# save
def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> dict:
    save_safetensors(tensors, path, metadata=meta)
    return {"sha256": _file_sha(path), "tensors": {k: _tensor_sha(v) for k, v in tensors.items()}}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent state dict with tied weights stored once (under their first name)."""
    from ..models.registry import _dedup_state_dict

    return _dedup_state_dict(model)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model_config,
    model_sd: dict[str, torch.Tensor],
    optimizer_sd: dict | None,
    trainer_state: dict[str, Any],
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, str]]],
    tokenizer=None,
    keep: int = 3,
) -> Path:
    """Writes ``<run>/checkpoints/step-XXXXXXX/`` atomically, then points ``latest`` at it and
    keeps the newest ``keep`` checkpoints. ``rng`` maps rank -> :func:`capture_rng` output."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:07d}"
    final = root / name
    with atomic_dir(final) as tmp:
        model_config.save(tmp / "config.json")
        manifest = {"model.safetensors": _write_tensors({k: v.detach().cpu() for k, v in model_sd.items()},
                                                         tmp / "model.safetensors", {"format": "pt"})}
        if optimizer_sd is not None:
            ot, om = optimizer_to_tensors(optimizer_sd)
            manifest["optimizer.safetensors"] = _write_tensors(ot, tmp / "optimizer.safetensors", om)
        for rank, (rt, rm) in sorted(rng.items()):
            fname = "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"
            manifest[fname] = _write_tensors(rt, tmp / fname, rm)
        if tokenizer is not None:
            tokenizer.save(tmp)
        state = {**trainer_state, "format_version": FORMAT_VERSION, "step": step, "checksums": manifest}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=_json_default))
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temporary ``.tmp-*`` folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(root.parent)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    for p in ckpts[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# load
class Checkpoint(NamedTuple):
    folder: Path
    config: Any  # the model Config
    model_sd: dict[str, torch.Tensor]
    optimizer_sd: dict | None
    trainer_state: dict[str, Any]
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, str]]]


def _load_verified(path: Path, expected: dict | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if expected is not None and _file_sha(path) != expected.get("sha256"):
        # Locate the damage: a readable file with a flipped bit names the tensor.
        try:
            tensors = load_safetensors(path)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: checksum mismatch; {e}") from None
        for k, sha in expected.get("tensors", {}).items():
            if k not in tensors:
                raise CheckpointError(f"{path}: tensor {k!r} is missing (checksum mismatch)")
            if _tensor_sha(tensors[k]) != sha:
                raise CheckpointError(f"{path}: tensor {k!r} is corrupt (checksum mismatch)")
        raise CheckpointError(f"{path}: checksum mismatch (header or metadata corrupt)")
    tensors = load_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from None
    return tensors, meta


def load_checkpoint(folder: str | Path, *, with_optimizer: bool = True) -> Checkpoint:
    """Reads and validates every file of one checkpoint folder."""
    from ..models.registry import config_from_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    for f in REQUIRED if with_optimizer else ("config.json", "model.safetensors", "trainer_state.json"):
        if not (folder / f).is_file():
            raise CheckpointError(f"{folder / f}: file not found (incomplete checkpoint)")
    state = read_json(folder / "trainer_state.json")
    for k in ("step", "checksums"):
        if k not in state:
            raise CheckpointError(f"{folder / 'trainer_state.json'}: missing key {k!r}")
    sums = state["checksums"]
    config = config_from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
    model_sd, _ = _load_verified(folder / "model.safetensors", sums.get("model.safetensors"))
    opt_sd = None
    if with_optimizer:
        ot, om = _load_verified(folder / "optimizer.safetensors", sums.get("optimizer.safetensors"))
        opt_sd = optimizer_from_tensors(ot, om, str(folder / "optimizer.safetensors"))
    rng = {}
    for fname in sums:
        m = re.fullmatch(r"rng(?:-rank(\d+))?\.safetensors", fname)
        if m:
            rng[int(m.group(1) or 0)] = _load_verified(folder / fname, sums[fname])
    return Checkpoint(folder, config, model_sd, opt_sd, state, rng)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not STEP_RE.match(name):
            raise CheckpointError(f"{pointer}: does not name a checkpoint ({name!r})")
        return root / name
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resume(run_dir: str | Path, *, fallback: bool = False, with_optimizer: bool = True) -> Checkpoint:
    """Loads the checkpoint ``latest`` points at.

    If it is broken, raises a ``CheckpointError`` that says so (and names the previous
    checkpoint); with ``fallback=True`` it warns and loads the newest older one that validates.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint to resume from")
    try:
        return load_checkpoint(newest, with_optimizer=with_optimizer)
    except CheckpointError as err:
        older = [p for p in list_checkpoints(run_dir) if p.name < newest.name][::-1]
        if not fallback:
            hint = f"; the previous checkpoint {older[0]} may be intact (resume with fallback)" if older else ""
            raise CheckpointError(f"newest checkpoint {newest} is broken: {err}{hint}") from None
        for p in older:
            try:
                ck = load_checkpoint(p, with_optimizer=with_optimizer)
            except CheckpointError:
                continue
            warnings.warn(f"newest checkpoint {newest} is broken ({err}); resuming from {p}", stacklevel=2)
            return ck
        raise CheckpointError(f"newest checkpoint {newest} is broken ({err}) and no older checkpoint validates") from None
