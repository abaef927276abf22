"""train-seq2seq on the one engine: kill -9 + resume == one run, 2 ranks == 1 process, the loss falls
on real Multi30k and BBC News slices, exact batches, --minutes 0 = no limit, and one-line errors
for bad inputs (misaligned files, non-UTF-8 bytes, empty splits, malformed JSON lines).

Budget: tiny models (1 layer, width 32) and a few steps; the whole file runs in about a minute.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from train_harness import kill9_resume_matches, loss_falls, records, run_cli, two_ranks_match_one

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
M30K, BBC = DATA / "multi30k", DATA / "bbc_news_summary"
needs_m30k = pytest.mark.skipif(not (M30K / "train.en").is_file(), reason="needs ../shared/data/multi30k")
needs_bbc = pytest.mark.skipif(not (BBC / "val.jsonl").is_file(), reason="needs ../shared/data/bbc_news_summary")
TINY = ["--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--n-head", "4", "--max-src-len", "32",
        "--max-tgt-len", "32", "--threads", "1"]
TINY_MODEL = dict(n_layer=1, n_embd=32, n_head=4)


def make_task(data: str, preset: str = "t5-tiny", dropout: float = 0.0, **kw):
    """A tiny Seq2SeqTask (module level: the 2-rank test pickles it by reference)."""
    from polymodal.train.tasks.seq2seq import Seq2SeqTask

    kw = {"vocab_size": 300, "model_overrides": TINY_MODEL, "max_src_len": 32, "max_tgt_len": 32, "batch_size": 8,
          "bucket": 4, "limit": 200, "val_limit": 24, **kw}
    return Seq2SeqTask(data, "translate", preset, dropout=dropout, **kw)


def _quiet(out, **kw):
    from polymodal.train.trainer import TrainArgs

    return TrainArgs(out=str(out), progress=False, tensorboard=False, plot=False, device="cpu", dtype="fp32",
                     threads=1, **kw)


# -- must-show invariants ------------------------------------------------------------------------

@needs_m30k
def test_kill9_then_resume_equals_one_run(tmp_path):
    """Dropout on (0.1), bucketed batches: the RNG and the data position both come back exactly."""
    kill9_resume_matches(["train-seq2seq", "--data", str(M30K), "--limit", "200", "--val-limit", "24", *TINY,
                          "--batch-size", "8", "--bucket", "4", "--max-steps", "6", "--eval-every", "2",
                          "--warmup", "2", "--lr", "3e-3", "--minutes", "0"], tmp_path, kill_at=3)


@needs_m30k
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """BART, 2 micro-batches per step, rows of uneven length: the loss is normalised by the global
    token count, so the ranks' mean equals the one-process token mean."""
    two_ranks_match_one(make_task, {"data": str(M30K), "preset": "bart-tiny"}, tmp_path, max_steps=3, eval_every=3,
                        lr=3e-3, warmup=1, grad_accum=2, log_every=1)


@needs_m30k
def test_loss_falls_on_multi30k(tmp_path):
    from polymodal.train.trainer import fit

    task = make_task(str(M30K), vocab_size=1000, model_overrides=dict(n_layer=1, n_embd=64, n_head=4), batch_size=32,
                     limit=2000, val_limit=64, dropout=0.0)
    s = fit(task, _quiet(tmp_path, max_steps=30, eval_every=15, lr=3e-3, warmup=3, log_every=2))
    loss_falls(tmp_path, margin=0.5)
    vals = [r["val_loss"] for r in records(tmp_path) if "val_loss" in r]
    assert vals[-1] < vals[0] and vals[-1] < math.log(task.tokenizer.vocab_size) - 0.5, vals  # below a uniform guess


@needs_bbc
def test_loss_falls_on_bbc_news(tmp_path):
    from polymodal.train.tasks.seq2seq import Seq2SeqTask
    from polymodal.train.trainer import fit

    task = Seq2SeqTask(BBC, "summarize", "bart-tiny", vocab_size=1000, model_overrides=TINY_MODEL, dropout=0.0,
                       max_src_len=128, max_tgt_len=48, batch_size=8, limit=96, val_limit=8)
    assert task.n_train == 96 and task.summary()["train_pairs"] == 96
    s = fit(task, _quiet(tmp_path, max_steps=30, eval_every=15, lr=3e-3, warmup=3, log_every=2))
    loss_falls(tmp_path, margin=0.5)
    assert s["best_step"] == 30


# -- batches -------------------------------------------------------------------------------------

def _toy(tmp_path, n=64) -> Path:
    words = "the a dog cat runs sits on mat red blue big small man woman sees".split()
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(0, len(words), (int(k),), generator=g).tolist())
            for k in torch.randint(1, 12, (n,), generator=g)]
    d = tmp_path / "toy"
    d.mkdir()
    for split, part in (("train", rows), ("val", rows[:8])):
        (d / f"{split}.en").write_text("\n".join(part) + "\n", encoding="utf-8")
        (d / f"{split}.de").write_text("\n".join(r.upper() for r in part) + "\n", encoding="utf-8")
    return d


def test_batches_are_a_pure_function_of_the_index_and_buckets_pad_less(tmp_path):
    d = _toy(tmp_path)
    a = make_task(str(d), vocab_size=40, limit=0, val_limit=0, bucket=4)
    spe = a.steps_per_epoch()
    assert spe == 8
    seq = [a.indices(i) for i in range(3 * spe)]
    b = make_task(str(d), vocab_size=40, limit=0, val_limit=0, bucket=4)
    for i in [17, 3, 23, 0, 9, 8, 16, 5]:  # any order, a fresh task: the same batch
        assert b.indices(i) == seq[i]
        assert torch.equal(b.batch(i, 0, 1)["input_ids"], a.batch(i, 0, 1)["input_ids"])
    for e in range(3):  # each epoch sees every example once
        assert sorted(x for s in seq[e * spe:(e + 1) * spe] for x in s) == list(range(64))
    assert seq[:spe] != seq[spe:2 * spe]  # and epochs are shuffled differently

    plain = make_task(str(d), vocab_size=40, limit=0, val_limit=0, bucket=0)

    def padding(task):
        cells = [task.batch(i, 0, 1)["attention_mask"] for i in range(spe)]
        return sum(int((1 - m).sum()) for m in cells) / sum(m.numel() for m in cells)

    assert padding(a) < 0.7 * padding(plain)
    half = a.batch(5, 1, 2)  # rank 1's half of the global batch, padded to the global length
    assert half["input_ids"].shape == (4, a.batch(5, 0, 1)["input_ids"].shape[1])


def test_minutes_zero_is_no_limit_and_resume_keeps_the_runs_tokenizer(tmp_path):
    """The drift this port fixes: --minutes 0 used to stop after one step."""
    from polymodal.commands.seq2seq import train_seq2seq

    d = _toy(tmp_path)
    kw = dict(vocab_size=40, n_layer=1, n_embd=32, n_head=4, batch_size=8, lr=3e-3, warmup=1, threads=1,
              dropout=0.0, out=str(tmp_path / "run"))
    res = train_seq2seq(str(d), minutes=0, max_steps=4, eval_every=2, **kw)
    assert res["step"] == 4 and res["stop_reason"] == "max_steps"
    # a resume trains on with the checkpoint's tokenizer and model, whatever --vocab-size now says
    res = train_seq2seq(str(d), minutes=0, max_steps=6, eval_every=2, resume=True, **{**kw, "vocab_size": 55})
    assert res["step"] == 6
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["vocab_size"] == 40


# -- bad inputs: one line naming the file (and line) ---------------------------------------------

def _pair_files(tmp_path, train_en: bytes, train_de: bytes, val: bytes = b"a b\n") -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    for name, data in (("train.en", train_en), ("train.de", train_de), ("val.en", val), ("val.de", val)):
        (d / name).write_bytes(data)
    return d


def test_misaligned_files_name_both(tmp_path):
    d = _pair_files(tmp_path, b"a b\nc d\ne f\n", b"A B\nC D\n")
    r = run_cli(["train-seq2seq", "--data", str(d), "--out", str(tmp_path / "o"), "--vocab-size", "20"])
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("polymodal train-seq2seq: error:")
    assert f"{d / 'train.en'} has 3 lines" in line and f"{d / 'train.de'} has 2" in line
    assert "Traceback" not in r.stderr


def test_non_utf8_names_file_and_line(tmp_path):
    from polymodal.commands.seq2seq import train_seq2seq, translate

    d = _pair_files(tmp_path, b"a b\nc d\ne f\n", b"A B\nC \xff D\nE F\n")
    with pytest.raises(ValueError, match=r"train\.de:2: not valid UTF-8"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=20)

    (tmp_path / "in.en").write_bytes(b"ok\n\xfe\n")
    with pytest.raises(ValueError, match=r"in\.en:2: not valid UTF-8"):
        translate("unused", str(tmp_path / "in.en"), str(tmp_path / "out.de"))


@pytest.mark.parametrize("empty", ["train", "val"])
def test_empty_split_is_an_error(tmp_path, empty):
    from polymodal.commands.seq2seq import train_seq2seq

    d = _pair_files(tmp_path, b"" if empty == "train" else b"a b\n", b"" if empty == "train" else b"A B\n",
                    val=b"" if empty == "val" else b"a b\n")
    with pytest.raises(ValueError, match=rf"{empty}\.en: the {empty} split is empty"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=20)


@pytest.mark.parametrize("line,msg", [('{"article": "x"}', "needs string fields 'article' and 'summary'"),
                                      ('{"article": "x", "summary": ', "not valid JSON"),
                                      ('["x", "y"]', "expected a JSON object")])
def test_malformed_summarisation_lines_name_file_and_line(tmp_path, line, msg):
    from polymodal.commands.seq2seq import train_seq2seq

    d = tmp_path / "bbc"
    d.mkdir()
    good = json.dumps({"article": "a b c", "summary": "a"})
    (d / "train.jsonl").write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    (d / "val.jsonl").write_text(good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"train\.jsonl:3: {msg}"):
        train_seq2seq(str(d), task="summarize", out=str(tmp_path / "o"), vocab_size=20)
    (d / "val.jsonl").write_text("\n\n", encoding="utf-8")  # blank lines only: an empty split
    (d / "train.jsonl").write_text(good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"val\*\.jsonl: the val split is empty"):
        train_seq2seq(str(d), task="summarize", out=str(tmp_path / "o"), vocab_size=20)


def test_bad_flags_are_one_line_errors(tmp_path):
    from polymodal.commands.seq2seq import train_seq2seq

    d = _toy(tmp_path)
    with pytest.raises(ValueError, match="--minutes must be >= 0"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=40, minutes=-1)
    with pytest.raises(ValueError, match="--max-src-len must be >= 2"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=40, max_src_len=1)
    with pytest.raises(ValueError, match="not divisible by --n-head"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=40, n_embd=30, n_head=4)
    with pytest.raises(FileNotFoundError, match=r"train\.fr: file not found"):
        train_seq2seq(str(d), out=str(tmp_path / "o"), vocab_size=40, tgt_lang="fr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_bf16_autocast(tmp_path):
    from polymodal.interop import load
    from polymodal.train.trainer import TrainArgs, fit

    task = make_task(str(_toy(tmp_path)), vocab_size=40, limit=0, val_limit=0, preset="bart-tiny")
    s = fit(task, TrainArgs(out=str(tmp_path / "run"), device="cuda", dtype="auto", max_steps=4, eval_every=2, lr=3e-3,
                            progress=False, tensorboard=False, plot=False))
    assert s["step"] == 4 and s["last"]["loss"] == s["last"]["loss"]  # finite, not NaN
    model, tok = load(tmp_path / "run")
    assert tok is not None and model.config.vocab_size == task.model_config.vocab_size
