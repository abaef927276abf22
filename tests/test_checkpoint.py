"""Training checkpoints: exact resume, validation of every file, atomic saves."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from polymodal.io import CheckpointError, load_safetensors
from polymodal.train import checkpoint as C
from polymodal.train.loop import Trainer, train

from test_train import make_shards, nano_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n_train=50_000)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (dropout on, so the RNG state matters)."""
    out = tmp_path_factory.mktemp("run")
    train(nano_recipe(shards, max_steps=4, eval_interval=2, model_overrides={"dropout": 0.1}), out)
    return out


def test_resume_reproduces_uninterrupted_losses_exactly(shards, tmp_path):
    # dropout > 0 and grad_accum > 1: the torch RNG and the data generator must both be restored
    recipe = nano_recipe(shards, max_steps=6, eval_interval=3, grad_accum=2, model_overrides={"dropout": 0.1})
    train(recipe, tmp_path / "full")
    train(recipe, tmp_path / "split", stop_at=3)
    assert [s for s, _ in losses(tmp_path / "split")] == [1, 2, 3]
    res = train(recipe, tmp_path / "split", resume=True)
    assert res["step"] == 6
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert split == full  # bit-exact in fp32, not merely close
    a = load_safetensors(tmp_path / "full" / "checkpoints" / "step-0000006" / "model.safetensors")
    b = load_safetensors(tmp_path / "split" / "checkpoints" / "step-0000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_folder_layout(saved_run):
    assert (saved_run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    ck = C.load_checkpoint(saved_run / "checkpoints" / "step-0000004")
    names = {p.name for p in ck.folder.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= names
    assert json.loads((ck.folder / "config.json").read_text())["family"] == "gpt"
    st = ck.trainer_state
    assert st["step"] == 4 and st["items_seen"] == 4 * 8 * 32 and st["recipe"]["recipe"]["model"] == "nano"
    assert st["best"] > 0 and st["metric"] == "loss" and "data_position" in st
    assert "lm_head.weight" not in ck.model_sd  # tied to wte.weight, stored once
    assert {"torch_cpu", "python_mt", "numpy_mt"} <= set(ck.rng[0][0])  # batches are a function of the step
    # nothing in the folder is a pickle
    for p in ck.folder.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), p


def test_optimizer_state_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors, meta = C.optimizer_to_tensors(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and all(isinstance(v, str) for v in meta.values())
    back = C.optimizer_from_tensors(tensors, meta, "x")
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt2.load_state_dict(back)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(opt2.state_dict()["state"][i][k], v)
    assert opt2.param_groups[0]["lr"] == 0.1


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_model_file_names_the_file(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path / "run")
    f = run / "checkpoints" / "step-0000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        C.load_checkpoint(f.parent)
    with pytest.raises(CheckpointError, match=r"newest checkpoint .*step-0000004 is broken.*model\.safetensors.*step-0000002"):
        C.resume(run)


def test_corrupted_optimizer_file_names_file_and_tensor(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path / "run")
    f = run / "checkpoints" / "step-0000004" / "optimizer.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit inside the last tensor's data: safetensors itself cannot notice
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: tensor 'state\.\d+\.\w+' is corrupt"):
        C.load_checkpoint(f.parent)
    raw[8:40] = b"\x00" * 32  # a destroyed header
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        C.load_checkpoint(f.parent)


def test_missing_file_and_fallback(saved_run, tmp_path, shards):
    run = _copy_run(saved_run, tmp_path / "run")
    (run / "checkpoints" / "step-0000004" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: file not found"):
        C.resume(run)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ck = C.resume(run, fallback=True)
    assert ck.folder.name == "step-0000002" and any("broken" in str(x.message) for x in w)
    # the trainer resumes from the fallback and continues at step 2
    trainer = Trainer(nano_recipe(shards, max_steps=4, eval_interval=2, model_overrides={"dropout": 0.1}), run,
                      resume=True, fallback=True)
    assert trainer.step == 2
    trainer.close()


def test_crash_during_save_keeps_previous_checkpoint(saved_run, tmp_path, monkeypatch):
    run = _copy_run(saved_run, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    real = C._write_tensors

    def crashing(tensors, path, meta):
        if path.name == "optimizer.safetensors":
            path.write_bytes(b"half a file")  # the writer dies halfway through
            raise OSError("disk full")
        return real(tensors, path, meta)

    monkeypatch.setattr(C, "_write_tensors", crashing)
    ck = C.load_checkpoint(run / "checkpoints" / "step-0000004")
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(run, step=6, model_config=ck.config, model_sd=ck.model_sd, optimizer_sd=ck.optimizer_sd,
                          trainer_state={}, rng={0: C.capture_rng()})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no step-6, no temp folder
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert C.resume(run).trainer_state["step"] == 4


def test_keeps_last_k(shards, tmp_path):
    train(nano_recipe(shards, max_steps=5, eval_interval=1, keep_checkpoints=2), tmp_path / "run")
    assert [p.name for p in C.list_checkpoints(tmp_path / "run")] == ["step-0000004", "step-0000005"]


def test_polymodal_load_resolves_a_training_run(saved_run):
    """`polymodal.load(run)` (and `generate --model run`) takes the newest checkpoint."""
    import polymodal

    newest = saved_run / "checkpoints" / (saved_run / "checkpoints" / "latest").read_text().strip()
    ids = torch.arange(8)[None] % 60
    want = polymodal.load(newest).model(ids)
    for path in (saved_run, saved_run / "checkpoints", saved_run / "checkpoints" / "latest"):
        got = polymodal.load(path).model(ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
