"""The training loop: schedule, AdamW groups, loss going down on Tiny Shakespeare, logging outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.models.gpt import GPT, GPTConfig
from polymodal.train.loop import Trainer, TrainConfig, flops_per_token, train
from polymodal.train.optim import make_adamw, param_groups
from polymodal.train.schedule import lr_at

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare"


def make_shards(folder: Path, n_train: int = 200_000) -> Path:
    """Char-level shards of the real Tiny Shakespeare text, in the polymodal.data.prepare layout."""
    if not (DATA / "train.txt").is_file():
        pytest.skip(f"{DATA} not available")
    tr = (DATA / "train.txt").read_text()[:n_train]
    va = (DATA / "val.txt").read_text()[:20_000]
    chars = sorted(set(tr + va))
    stoi = {c: i for i, c in enumerate(chars)}
    folder.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in tr], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in va], dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": len(chars),
                                                  "n_train": len(tr), "n_val": len(va)}))
    return folder


def nano_recipe(data: Path, **kw) -> dict:
    base = dict(model="nano", data=str(data), batch_size=8, block_size=32, max_steps=6, eval_interval=3,
                eval_batches=2, log_interval=1, warmup=2, lr=3e-3, min_lr=3e-4, dtype="fp32", progress=False,
                tensorboard=False, seed=7)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


# -- schedule --------------------------------------------------------------------------------------
def test_schedule_known_values():
    kw = dict(lr=1.0, warmup=10, decay_steps=110, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, **kw) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way: min + (max - min) / 2
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(10_000, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw, schedule="linear") == pytest.approx(0.55)
    assert lr_at(85, **kw, schedule="linear") == pytest.approx(1.0 - 0.9 * 0.75)
    assert lr_at(500, **kw, schedule="constant") == 1.0
    vals = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, **kw, schedule="exp")


# -- optimizer groups ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
def test_no_decay_groups_are_biases_norms_embeddings(preset):
    model = GPT(GPTConfig.from_preset(preset))
    decay, no_decay = param_groups(model, 0.1)
    names = dict(model.named_parameters())  # tied lm_head.weight is listed once, as wte.weight
    expect_no = {n for n, p in names.items()
                 if p.ndim == 1 or n.endswith(".bias") or "norm" in n or n.startswith(("wte.", "wpe.", "ln_f."))}
    assert set(no_decay["names"]) == expect_no
    assert set(decay["names"]) == set(names) - expect_no
    assert all(names[n].ndim == 2 for n in decay["names"])
    assert "wte.weight" in no_decay["names"] and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # every trainable parameter in exactly one group
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_adamw(model, 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_flops_per_token_counts_weights_and_attention():
    model = GPT(GPTConfig.from_preset("nano"))
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    assert flops_per_token(model, 64) == 6 * n + 12 * c.n_layer * 64 * c.n_embd


# -- the loop --------------------------------------------------------------------------------------
def test_loss_falls_on_tiny_shakespeare(shards, tmp_path):
    res = train(nano_recipe(shards, max_steps=30, eval_interval=30, log_interval=1, warmup=5, lr=1e-2,
                            batch_size=16, eval_batches=4), tmp_path / "run")
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[0] > 3.9  # a fresh model is near uniform over 65 characters: ln(65) = 4.17
    assert np.mean(losses[-5:]) < losses[0] - 0.8, losses  # ...and learns the character statistics
    assert res["val_loss"] < 3.3 and math.isfinite(res["val_loss"])
    assert res["val_ppl"] == pytest.approx(math.exp(res["val_loss"]))


def test_metrics_plot_tensorboard_and_grad_accum(shards, tmp_path):
    out = tmp_path / "run"
    res = train(nano_recipe(shards, max_steps=4, eval_interval=2, grad_accum=2, tensorboard=True), out)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert {"step", "loss", "lr", "tok_seen", "tok_per_s", "mfu"} <= set(r)
        assert r["tok_seen"] == r["step"] * 8 * 32 * 2 and r["tok_per_s"] > 0 and 0 < r["mfu"] < 1
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    png = (out / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert res["step"] == 4 and Path(res["checkpoint"]).name == "step-0000004"


def test_time_budget_stops_and_saves(shards, tmp_path):
    res = train(nano_recipe(shards, max_steps=10_000, max_minutes=0.02, eval_interval=10_000), tmp_path / "run")
    assert res["stop_reason"] == "time budget" and 0 < res["step"] < 10_000
    assert Path(res["checkpoint"]).is_dir() and math.isfinite(res["val_loss"])


def test_ctrl_c_saves_a_checkpoint(shards, tmp_path, monkeypatch):
    trainer = Trainer(nano_recipe(shards, max_steps=10, eval_interval=100), tmp_path / "run")
    real = trainer.train_step

    def step():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000003"


def test_recipe_errors_are_clear(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown recipe keys"):
        TrainConfig.from_dict({"modle": "nano"})
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
    assert TrainConfig(lr="3e-4").lr == 3e-4  # YAML reads 3e-4 (no dot) as a string
    with pytest.raises(ValueError, match="'lr' must be a number"):
        TrainConfig(lr="fast")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        Trainer(nano_recipe(tmp_path / "nothing"), tmp_path / "run")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN bf16 path")
def test_bf16_autocast_trains(shards, tmp_path):
    res = train(nano_recipe(shards, dtype="bf16", max_steps=4, eval_interval=4), tmp_path / "run")
    assert math.isfinite(res["val_loss"]) and res["val_loss"] < 4.5


# -- commands ---------------------------------------------------------------------------------------
def test_train_command_from_yaml_and_overrides(shards, tmp_path):
    import yaml

    from polymodal.commands.train import train as train_cmd
    from polymodal.train.recipes import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(nano_recipe(shards, max_steps=50)))
    res = train_cmd(str(recipe), out=str(tmp_path / "run"), max_steps=2)
    assert res["step"] == 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_cmd(str(recipe), out=str(tmp_path / "run"), max_steps=2)
    assert train_cmd(str(recipe), out=str(tmp_path / "run"), max_steps=3, resume=True)["step"] == 3
    for name in ("shakespeare-char.yaml", "gpt2-small-owt-style.yaml", "nano-test.yaml"):
        TrainConfig.from_dict(load_recipe(name))  # every shipped recipe is valid
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        load_recipe("no-such.yaml")


def test_quickstart_smoke(tmp_path, monkeypatch):
    """The quickstart end to end on a slice of the text: shards, n-gram baseline, training, sample, summary."""
    import yaml

    from polymodal.commands.quickstart import quickstart

    data = tmp_path / "tiny_shakespeare"
    data.mkdir()
    (data / "train.txt").write_text((DATA / "train.txt").read_text()[:30_000])
    (data / "val.txt").write_text((DATA / "val.txt").read_text()[:3_000])
    recipe = tmp_path / "qs.yaml"
    recipe.write_text(yaml.safe_dump({**nano_recipe(data), "data": "", "max_steps": 3, "eval_interval": 3}))
    monkeypatch.setenv("POLYMODAL_DATA", str(tmp_path))
    s = quickstart(minutes=1.0, recipe=str(recipe), out=str(tmp_path / "qs"), data="tiny_shakespeare",
                   ngram_order=3)
    saved = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert saved["steps"] == 3 and math.isfinite(saved["val_loss"])
    assert saved["ngram_baseline"]["order"] == 3 and 0 < saved["ngram_baseline"]["val_loss"] < 4.2
    assert len(saved["sample"]) >= 450  # 500 characters (a few may decode as multi-char <unk>)
    for f in ("metrics.jsonl", "curve.png", "checkpoints/latest"):
        assert (tmp_path / "qs" / f).is_file()
    assert s["val_loss"] == saved["val_loss"]
    with pytest.raises(FileNotFoundError, match="POLYMODAL_DATA"):
        quickstart(minutes=0.1, recipe=str(recipe), out=str(tmp_path / "qs2"), data=str(tmp_path / "nowhere"))
