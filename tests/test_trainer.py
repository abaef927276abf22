"""The one Trainer (polymodal/train/trainer.py) on its own and through `polymodal train`:
kill -9 + resume equals an uninterrupted run, best-model selection and patience, the one weight
decay rule, a budget-sized progress bar, --config/--print-config, and the bad inputs of issue 12."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from train_harness import kill9_resume_matches, records, run_cli
from test_train import make_shards, nano_recipe

from polymodal.train.tasks.base import EpochSampler, Task, shard
from polymodal.train.trainer import TrainArgs, Trainer, fit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n_train=50_000)


def _recipe(tmp: Path, shards: Path, **kw) -> Path:
    import yaml

    r = tmp / "recipe.yaml"
    r.write_text(yaml.safe_dump({**nano_recipe(shards, **kw), "model_overrides": {"dropout": 0.1}}))
    return r


# -- resume -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_kill9_then_resume_equals_uninterrupted(shards, tmp_path):
    """Dropout on, so the restored RNG matters; killed after step 5, resumed from step 4."""
    recipe = _recipe(tmp_path, shards, max_steps=8, eval_interval=2)
    kill9_resume_matches(["train", "--recipe", str(recipe), "--threads", "1"], tmp_path, kill_at=5)


# -- a toy task for the engine's own rules ----------------------------------------------------------
class _Cfg:
    def save(self, path):
        Path(path).write_text(json.dumps({"family": "toy"}))


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.lin = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(1, 1))

    def no_weight_decay(self):
        return {"scale"}

    def forward(self, x):
        return self.lin(x) * self.scale


class ScriptedTask(Task):
    """Regression on a fixed line; evaluate() returns a scripted metric sequence."""
    name, metric, mode = "scripted", "score", "max"

    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])
        self.sampler = EpochSampler(64, 8, seed=0)

    def build_model(self):
        return Line()

    def batch(self, index, rank, world):
        i = self.sampler.indices(index)
        return shard(self.x[i], rank, world), shard(self.y[i], rank, world)

    def loss(self, model, batch):
        return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1])}

    def evaluate(self, model):
        v = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"score": v}

    def steps_per_epoch(self):
        return self.sampler.steps_per_epoch

    def export(self, model, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({"step_marker": model.lin.weight.detach().clone()}, Path(folder) / "w.pt")
        return Path(folder)


def _quiet(**kw):
    return TrainArgs(progress=False, tensorboard=False, plot=False, dtype="fp32", device="cpu", **kw)


def test_best_model_and_patience(tmp_path):
    """Scores 1, 3, 2, 2: the best is step 4's (eval 2); patience 2 stops after eval 4 (step 8)."""
    task = ScriptedTask([1.0, 3.0, 2.0, 2.0, 5.0])
    s = fit(task, _quiet(out=str(tmp_path / "r"), max_steps=40, eval_every=2, patience=2, lr=0.01))
    assert s["stop_reason"] == "patience" and s["step"] == 8
    assert s["best"] == 3.0 and s["best_step"] == 4
    vals = [r["val_score"] for r in records(tmp_path / "r") if "val_score" in r]
    assert vals == [1.0, 3.0, 2.0, 2.0]
    assert (tmp_path / "r" / "model" / "w.pt").is_file()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["best_step"] == 4


def test_one_weight_decay_rule():
    from polymodal.models.gpt import GPT, GPTConfig
    from polymodal.train.optim import param_groups

    decay, no_decay = param_groups(Line(), 0.1)
    assert decay["names"] == ["lin.weight"] and set(no_decay["names"]) == {"lin.bias", "scale"}
    groups = param_groups(GPT(GPTConfig.from_preset("nano")), 0.1)
    assert "wpe.weight" in groups[1]["names"] and "wte.weight" in groups[1]["names"]
    assert all("norm" not in n and not n.endswith("bias") for n in groups[0]["names"])


def test_epoch_sampler_is_a_pure_function_of_the_step():
    a, b = EpochSampler(10, 4, seed=3), EpochSampler(10, 4, seed=3)
    seq = [a.indices(s) for s in range(9)]
    assert [b.indices(s) for s in reversed(range(9))][::-1] == seq  # any order, same batches
    epoch0 = sum(seq[:3], [])[:10]
    assert sorted(epoch0) == list(range(10))  # without replacement within an epoch
    assert all(len(x) == 4 for x in seq)


def test_eval_does_not_change_training(tmp_path):
    """An evaluation that draws random numbers must not move the training stream."""
    class Noisy(ScriptedTask):
        def evaluate(self, model):
            torch.rand(100)
            np.random.rand(10)
            return {"score": 0.0}

    a = fit(Noisy([0]), _quiet(out=str(tmp_path / "a"), max_steps=6, eval_every=1, lr=0.01, log_every=1))
    b = fit(Noisy([0]), _quiet(out=str(tmp_path / "b"), max_steps=6, eval_every=-1, lr=0.01, log_every=1))
    la = [r["loss"] for r in records(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in records(tmp_path / "b") if "loss" in r]
    assert la == lb and a["step"] == b["step"] == 6


def test_bar_counts_budget_seconds(tmp_path):
    t = Trainer(ScriptedTask([0]), TrainArgs(out=str(tmp_path / "r"), minutes=1.5, max_steps=100_000,
                                             tensorboard=False, device="cpu"))
    bar = t._bar()
    assert bar.unit == "s" and bar.total == 90  # not 100000 steps with a made-up ETA
    bar.close()
    t.close()


# -- flags, configs and bad input -----------------------------------------------------------------
def test_config_file_and_print_config(shards, tmp_path):
    recipe = _recipe(tmp_path, shards)
    cfg = tmp_path / "flags.yaml"
    cfg.write_text(f"recipe: {recipe}\nmax-steps: 3\nlr: 0.002\n")
    r = run_cli(["train", "--config", str(cfg), "--lr", "0.004", "--print-config"])
    assert r.returncode == 0, r.stderr
    import yaml

    printed = yaml.safe_load(r.stdout)
    assert printed["max-steps"] == 3 and printed["lr"] == 0.004 and printed["recipe"] == str(recipe)
    cfg.write_text("recipe: x.yaml\nmax_stepz: 3\n")
    r = run_cli(["train", "--config", str(cfg)])
    assert r.returncode == 2 and f"{cfg}: unknown key 'max_stepz'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "-1"], "--minutes must be >= 0"),
    (["--device", "cuda"], "--device cuda: this torch build has no usable CUDA"),
    (["--device", "gpu0"], "not a device name"),
])
def test_bad_flags_are_one_line_errors(shards, tmp_path, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    r = run_cli(["train", "--recipe", str(_recipe(tmp_path, shards)), "--out", str(tmp_path / "run"), *flags])
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # no 0-step checkpoint


def test_token_ids_beyond_the_vocabulary(tmp_path):
    bad = make_shards(tmp_path / "shards", n_train=5_000)
    ids = np.fromfile(bad / "train.bin", dtype=np.uint16)
    ids[1234] = 900
    ids.tofile(bad / "train.bin")
    r = run_cli(["train", "--recipe", str(_recipe(tmp_path, bad)), "--out", str(tmp_path / "run")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad / 'train.bin'}: token id 900 at position 1234 is beyond the vocabulary" in r.stderr


def test_empty_val_file(tmp_path):
    (tmp_path / "train.txt").write_text("to be or not to be\n" * 50)
    (tmp_path / "val.txt").write_text("")
    r = run_cli(["prepare", "--inputs", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"),
                 "--out", str(tmp_path / "shards")])
    assert r.returncode == 2 and f"{tmp_path / 'val.txt'}: file is empty" in r.stderr and "Traceback" not in r.stderr
    data = tmp_path / "ts"
    data.mkdir()
    (data / "train.txt").write_text("to be or not to be\n" * 50)
    (data / "val.txt").write_text("")
    r = run_cli(["quickstart", "--data", str(data), "--out", str(tmp_path / "qs"), "--minutes", "0.05"])
    assert r.returncode == 2 and "val.txt: file is empty" in r.stderr and "Traceback" not in r.stderr


def test_non_utf8_file_names_file_and_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    r = run_cli(["ngram", "--train", str(f), "--val", str(f), "--order", "2"])
    assert r.returncode == 2 and f"{f}: not valid UTF-8" in r.stderr and "line 2" in r.stderr
