"""Family registry and the polymodal checkpoint folder.

A polymodal model folder holds ``config.json`` (the family's Config, plus a
``"family"`` key), ``model.safetensors`` and, when there is one, the
tokenizer files. Families register here by name, so a config.json is enough
to rebuild the right class: nothing in a checkpoint is ever executed.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import CheckpointError, atomic_dir, load_safetensors, read_json, save_safetensors

# family -> (module, Config class, Model class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "gpt": ("polymodal.models.gpt", "GPTConfig", "GPT"),
    "vit": ("polymodal.models.vit", "ViTConfig", "ViT"),
    "clip": ("polymodal.models.clip", "CLIPConfig", "CLIP"),
    "encoder": ("polymodal.models.encoder", "EncoderConfig", "build_encoder"),
    "seq2seq": ("polymodal.models.seq2seq", "Seq2SeqConfig", "Seq2Seq"),
    "task": ("polymodal.models.heads", "TaskConfig", "build_task_model"),
    "vlm": ("polymodal.models.vlm", "VLMConfig", "VLM"),
    "visualbert": ("polymodal.models.fusion", "VisualBERTConfig", "VisualBERT"),
    "vilbert": ("polymodal.models.fusion", "ViLBERTConfig", "ViLBERT"),
    "efficientnet": ("polymodal.models.efficientnet", "EfficientNetConfig", "EfficientNet"),
}


def register_family(family: str, module: str, config_cls: str, model_cls: str) -> None:
    FAMILIES[family] = (module, config_cls, model_cls)


def _classes(family: str):
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module, cfg, mdl = FAMILIES[family]
    m = importlib.import_module(module)
    return getattr(m, cfg), getattr(m, mdl)


def config_from_dict(d: dict[str, Any], source: str = "config.json"):
    family = d.get("family")
    if family is None:
        raise CheckpointError(f"{source}: no 'family' key (not a polymodal config; Hugging Face folders load via polymodal.load)")
    cfg_cls, _ = _classes(family)
    try:
        return cfg_cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def build_model(config) -> nn.Module:
    _, model_cls = _classes(config.family)
    return model_cls(config)


def save_model(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer) atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.config.save(tmp / "config.json")
        save_safetensors(_dedup_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    from ..interop.weight_map import load_into

    folder = Path(folder)
    config = config_from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device="cpu")
    if hasattr(model, "tie_weights"):  # to_empty() gives tied parameters separate storage
        model.tie_weights()
    sd = load_safetensors(folder / "model.safetensors")
    verify_checksums(folder, sd)
    check_finite(sd.items(), str(folder / "model.safetensors"))
    load_into(model, sd, str(folder / "model.safetensors"))
    _rebuild_buffers(model)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def verify_checksums(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """A training checkpoint's ``trainer_state.json`` records the SHA-256 of ``model.safetensors``
    and of every tensor in it (``train.checkpoint``): a loaded file that does not match raises
    ``CheckpointError`` naming the file and, where one differs, the tensor. Folders without
    that record (exports, Hugging Face folders) have nothing to verify."""
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        return
    expected = (read_json(state_path).get("checksums") or {}).get("model.safetensors")
    if not isinstance(expected, dict) or "sha256" not in expected:
        return
    path = folder / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() == expected["sha256"]:
        return
    for name, sha in (expected.get("tensors") or {}).items():
        t = sd.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing (SHA-256 checksum mismatch with {state_path.name})")
        flat = t.detach().contiguous().reshape(-1)
        if hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest() != sha:
            raise CheckpointError(f"{path}: tensor {name!r} does not match its SHA-256 checksum in "
                                  f"{state_path.name} (the file is corrupt)")
    raise CheckpointError(f"{path}: SHA-256 checksum mismatch with {state_path.name} (header or metadata corrupt)")


def check_finite(named_tensors, source: str) -> None:
    """Refuses weights holding NaN or inf (a corrupt file, or a run that diverged), naming the
    tensor: such a model would only print garbage."""
    for name, t in named_tensors:
        # the sum is NaN/inf whenever an element is (and is ~20x cheaper than isfinite); only
        # then, or on an overflowing sum, is the element-wise test run
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) \
                and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} has {bad} non-finite values (NaN or inf); the "
                                  "checkpoint is corrupt or its training diverged")


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied parameters (lm_head tied to wte)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():  # named_parameters drops duplicates already
        out[name] = p
        seen.add(name)
    for name, b in model.named_buffers():
        out[name] = b
    persistent = model.state_dict()
    return {k: v for k, v in out.items() if k in persistent}


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (RoPE tables, sinusoid tables) were built on the meta
    device; recompute them by re-running each module's constructor logic."""
    from ..nn.positions import RotaryEmbedding, SinusoidalPositions, sinusoidal_table

    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            n = m.cos_table.shape[0]
            m.inv_freq = 1.0 / (m.theta ** (torch.arange(0, m.rotary_dim, 2, dtype=torch.float32) / m.rotary_dim))
            m._build(n)
        elif isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(*m.table.shape)
