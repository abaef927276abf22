"""Safe, atomic file I/O shared by training checkpoints and checkpoint conversion.

* Weights are read with safetensors only (never unpickled), and every failure
  names the file (and the tensor, where there is one).
* A checkpoint folder is written into a temporary sibling and renamed into
  place, so a crash in the middle of a save leaves the previous one intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch


class CheckpointError(RuntimeError):
    """A checkpoint (or one of its files) is missing, truncated, corrupt or mismatched."""


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Loads every tensor of one .safetensors file; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def load_sharded_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Loads ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_safetensors(folder / shard)
            for name, file in weight_map.items():
                if file == shard and name not in tensors:
                    raise CheckpointError(f"{folder / shard}: tensor {name!r} listed in {index.name} is missing")
            out.update(tensors)
        return out
    single = folder / "model.safetensors"
    if single.is_file():
        return load_safetensors(single)
    if (folder / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{folder}: only pytorch_model.bin found; polymodal reads safetensors only (pickle files can "
            "execute code). Convert it with a trusted tool first."
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage (tied weights); clone to keep each entry standalone.
    seen: dict[int, str] = {}
    clean = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        clean[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen[ptr] = k
    save_file(clean, str(path), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields a temporary folder; on success it replaces ``final`` in one rename.

    If the body raises (or the process dies), ``final`` is untouched and the
    temporary folder is removed (or left as ``.tmp-*``, ignored by loaders).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder should read like any other
    try:
        yield tmp
        for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure atomically (temp file + rename, so a crash never leaves half a
    PNG where a plot was) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
