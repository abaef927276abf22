"""Hugging Face checkpoint folders in and out, through per-family adapters.

An adapter (one module per family, ``polymodal/interop/hf_<family>.py``)
exposes a module-level ``ADAPTER = HFAdapter(...)`` that knows how to:

* translate HF ``config.json`` to our Config and back;
* give the declarative ``WeightMap`` for a config (``hf_keys`` lets it see
  which head/prefix the saved HF class used, e.g. ``bert.`` for BertForMaskedLM);
* name the HF ``architectures`` entry for export.

``ADAPTERS`` maps an HF ``model_type`` to the module holding its adapter,
imported lazily.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..io import CheckpointError, atomic_dir, load_sharded_safetensors, read_json, save_safetensors
from ..models.config import ConfigBase
from .weight_map import WeightMap, load_into

# HF model_type -> adapter module (each defines ADAPTER)
ADAPTERS: dict[str, str] = {
    "gpt2": "polymodal.interop.hf_gpt",
    "llama": "polymodal.interop.hf_gpt",
    "qwen2": "polymodal.interop.hf_gpt",
    "vit": "polymodal.interop.hf_vision",
    "clip": "polymodal.interop.hf_vision",
    "clip_vision_model": "polymodal.interop.hf_vision",
    "bert": "polymodal.interop.hf_encoder",
    "roberta": "polymodal.interop.hf_encoder",
    "albert": "polymodal.interop.hf_encoder",
    "t5": "polymodal.interop.hf_seq2seq",
    "bart": "polymodal.interop.hf_seq2seq",
}


@dataclasses.dataclass
class HFAdapter:
    config_from_hf: Callable[[dict[str, Any]], ConfigBase]
    config_to_hf: Callable[[ConfigBase], dict[str, Any]]
    weight_map: Callable[..., WeightMap]  # (our_config, hf_keys: set[str] | None) -> WeightMap
    build: Callable[[ConfigBase], nn.Module] | None = None  # default: models.registry.build_model


def get_adapter(model_type: str) -> HFAdapter:
    if model_type not in ADAPTERS:
        raise CheckpointError(f"unknown architecture model_type={model_type!r}; supported: {sorted(ADAPTERS)}")
    module = importlib.import_module(ADAPTERS[model_type])
    # A module serving several model types (hf_gpt: gpt2/llama/qwen2) keeps one adapter per type.
    per_type = getattr(module, "ADAPTERS", None)
    return per_type[model_type] if per_type and model_type in per_type else module.ADAPTER


def is_hf_folder(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return "model_type" in d and "family" not in d


def load_hf_folder(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    from ..models.registry import build_model

    folder = Path(folder)
    hf_cfg = read_json(folder / "config.json")
    model_type = hf_cfg.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{folder / 'config.json'}: no 'model_type'; cannot tell the architecture")
    adapter = get_adapter(model_type)
    try:
        config = adapter.config_from_hf(hf_cfg)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{folder / 'config.json'}: {what}") from None
    sd = load_sharded_safetensors(folder)
    ours = adapter.weight_map(config, set(sd)).to_ours(sd, source=str(folder))
    model = build_uninitialised(config, adapter.build or build_model)
    load_into(model, ours, source=str(folder))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


_INIT_FNS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "trunc_normal_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Makes ``torch.nn.init`` fills no-ops while a model about to be overwritten is built.

    Random initialisation of a 135M-parameter model costs about a second, and building on
    the meta device instead imports ``torch._dynamo`` (several seconds) through the meta
    kernels of the init functions; allocating uninitialised memory costs neither."""
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FNS}
    try:
        for n in _INIT_FNS:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build_uninitialised(config: ConfigBase, build: Callable[[ConfigBase], nn.Module] | None = None) -> nn.Module:
    """The model for ``config`` with uninitialised weights (to be filled by ``load_into``)."""
    from ..models.registry import build_model

    with skip_init():
        return (build or build_model)(config)


def export_hf(model: nn.Module, folder: str | Path, tokenizer=None, model_type: str | None = None) -> Path:
    """Writes an HF-format folder (config.json + model.safetensors [+ tokenizer]) atomically."""
    config = model.config
    hf_cfg, reasons = None, []
    for mt in ADAPTERS:
        if model_type is not None and mt != model_type:
            continue
        adapter = get_adapter(mt)
        try:
            hf_cfg = adapter.config_to_hf(config)
        except (TypeError, ValueError, AttributeError, KeyError) as e:  # not this adapter's config class
            reasons.append(f"{mt}: {e}")
            continue
        if hf_cfg.get("model_type") == mt or model_type is not None:
            break
        hf_cfg = None
    if hf_cfg is None:
        raise CheckpointError(f"no Hugging Face export for {type(config).__name__} {getattr(config, 'name', '')!r}"
                              + (f" ({'; '.join(reasons)})" if reasons else ""))
    wm = adapter.weight_map(config, None)
    sd = wm.to_hf(model.state_dict())
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
