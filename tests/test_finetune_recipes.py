"""Issue 21's recipe features for ``polymodal finetune``, each behind a flag and off by default:

* honest val splits (``data.splits``): SST-2 whole sentences and CoNLL held-out documents are
  disjoint from the training rows, deterministic, and the phrase rule keeps exactly the rows found
  inside a training sentence;
* layer-wise lr decay gives each layer the documented lr (in the Trainer's optimizer, after a step);
* length bucketing: batches are a pure function of the step, cover each epoch once, pad less;
* label smoothing, sentence weights and the CRF loss equal their formulas; the CRF passes a
  gradient check and decodes as brute force over every tag sequence does;
* the cased-word feature starts as the uncased model and changes its output once trained;
* EMA follows its formula, swaps back exactly, is what evaluation and the export read;
* kill -9 + resume and 2 ranks == 1 still hold with --ema, --layer-decay, --bucket, --crf, --cased
  and --sentence-weight.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_finetune import DATA, _need, slices, tiny_model  # noqa: F401  (fixtures)
from train_harness import kill9_resume_matches, run_cli, two_ranks_match_one

pytestmark = pytest.mark.timeout(300)


def make_task(task: str, model: str, data: str, **kw):
    """The 2-ranks factory (module level: pickled by reference into the workers)."""
    from polymodal.train.tasks.classify import text_task

    return text_task(task, model=model, data=data, **kw)


def _args(out, **kw):
    from polymodal.train.trainer import TrainArgs

    return TrainArgs(out=str(out), **{"progress": False, "tensorboard": False, "plot": False, "dtype": "fp32",
                                      "threads": 1, "log_every": 1, **kw})


# --------------------------------------------------------------------------------------- val splits
def _ex(text, label=1, line=0):
    from polymodal.data.tasks import TextExample

    return TextExample(text, None, label, line)


def test_sentence_split_rule_on_a_hand_made_treebank():
    from polymodal.data.splits import sentence_split, whole_sentences

    rows = ["a good film .", "a good film", "good film", "good", "film", "a bad film .", "bad film", "bad",
            "the plot is thin", "the plot", "thin", "good"]
    assert whole_sentences(rows) == [True, False, False, False, False, True, False, False, True, False, False, False]
    ex = [_ex(t, line=i + 2) for i, t in enumerate(rows)]
    for seed in range(8):  # whichever sentence is held out, the rule is the same
        train, val = sentence_split(ex, n=1, seed=seed)
        (held,) = [v.text_a for v in val]
        kept = {t for t in rows if t != held}
        inside_train = {s for t in ("a good film .", "a bad film .", "the plot is thin") if t != held
                        for s in rows if f" {s} " in f" {t} "}
        assert {e.text_a for e in train} == inside_train <= kept
        # "film" is in both film sentences: it stays whichever of them is held out
        assert "film" in {e.text_a for e in train}
        # both copies of a duplicated row go together
        assert sum(e.text_a == "good" for e in train) in (0, 2)
    with pytest.raises(ValueError, match="only 3 whole sentences"):
        sentence_split(ex, n=3)


def test_sst2_sentence_val_is_whole_sentences_disjoint_and_deterministic():
    _need("sst2")
    from polymodal.data import tasks as T
    from polymodal.data.splits import whole_sentences

    spec = T.get_task("sst2")
    full = T.load_split(spec, "train")
    train, val = T.load_train_val(spec, None, "sentences")
    assert len(val) == 872 and 55_000 < len(train) < len(full)
    texts = [e.text_a for e in val]
    assert len(set(texts)) == 872 and not set(texts) & {e.text_a for e in train}
    # every val row is a whole sentence (not inside another train row), about dev's 19.5 words long
    whole = dict(zip([e.text_a for e in full], whole_sentences([e.text_a for e in full])))
    assert all(whole[t] for t in texts)
    assert 17 < sum(len(t.split()) for t in texts) / 872 < 21
    assert 0.45 < sum(e.label for e in val) / 872 < 0.55
    # no training row appears only inside val sentences: each is inside some training sentence
    train_sents = [" " + e.text_a + " " for e in train if whole[e.text_a]]
    for e in train[::997]:
        assert any(f" {e.text_a} " in s for s in train_sents), e.text_a
    # deterministic, whatever the training seed; eval --split sentences scores the same rows
    again = T.load_train_val(spec, None, "sentences")
    assert [e.line for e in again[1]] == [e.line for e in val] and [e.line for e in again[0]] == [e.line for e in train]
    assert [e.line for e in T.load_split(spec, "sentences")] == [e.line for e in val]


def test_conll_heldout_docs_are_the_last_documents_and_disjoint():
    _need("conll2003")
    from polymodal.data import tasks as T

    spec = T.get_task("conll2003")
    full = T.load_split(spec, "train")
    train, val = T.load_train_val(spec, None, "heldout-docs")
    docs = sorted({e.doc for e in full})
    assert len(docs) == 899  # the README's count of -DOCSTART- documents
    assert {e.doc for e in val} == set(docs[-100:]) and not {e.doc for e in val} & {e.doc for e in train}
    assert len(train) + len(val) == len(full) == 13_375
    assert max(e.line for e in train) < min(e.line for e in val)  # the end of the file
    assert [e.line for e in T.load_train_val(spec, None, "heldout-docs", 100)[1]] == [e.line for e in val]
    assert len(T.load_train_val(spec, None, "heldout-docs", 10)[1]) < len(val)


def test_val_split_bad_flags(tmp_path, slices, tiny_model):
    from polymodal.commands.finetune import finetune

    with pytest.raises(ValueError, match="--val-split heldout-docs is for --task conll2003, not sst2"):
        finetune("sst2", model=str(tiny_model), data=str(slices["sst2"]), out=str(tmp_path), val_split="heldout-docs",
                 progress=False)
    with pytest.raises(ValueError, match="--val-size 900: the training file has only"):
        finetune("conll2003", model=str(tiny_model), data=str(DATA / "conll2003"), out=str(tmp_path),
                 val_split="heldout-docs", val_size=900, progress=False)
    r = run_cli(["finetune", "--task", "conll2003", "--model", str(tiny_model), "--data", str(slices["conll2003"]),
                 "--val-split", "heldout-docs", "--out", str(tmp_path / "r")])
    assert r.returncode == 2 and "--val-size 100: the training file has only 13 documents" in r.stderr, r.stderr[-800:]
    for kw, msg in [({"sentence_weight": 2.0, "task": "conll2003"}, "--sentence-weight is for sst2"),
                    ({"cased": True}, "--cased is for NER"), ({"layer_decay": 1.5}, r"--layer-decay must be in \(0, 1\]"),
                    ({"ema": 1.0}, r"--ema must be in \[0, 1\)"), ({"bucket": -1}, "--bucket must be >= 0"),
                    ({"crf": True, "label_smoothing": 0.1, "task": "conll2003"}, "do not combine")]:
        task = kw.pop("task", "sst2")
        with pytest.raises(ValueError, match=msg):
            finetune(task, model=str(tiny_model), data=str(slices[task]), out=str(tmp_path), progress=False, **kw)


# ----------------------------------------------------------------------------------- layer decay
def test_layer_decay_gives_each_layer_the_documented_lr(slices, tiny_model, tmp_path):
    from polymodal.train.optim import param_groups
    from polymodal.train.trainer import Trainer

    d, lr = 0.5, 1e-3
    task = make_task("conll2003", str(tiny_model), str(slices["conll2003"]), batch_size=4, max_length=32,
                     max_train=8, max_val=4, layer_decay=d, weight_decay=0.01, cased=True, crf=True)
    t = Trainer(task, _args(tmp_path, max_steps=1, lr=lr, warmup=0, schedule="constant", weight_decay=0.01))
    t.fit()
    L = 2  # tiny-bert's blocks
    expected = {"backbone.embeddings.word.weight": d ** (L + 1), "backbone.embeddings.norm.weight": d ** (L + 1),
                "backbone.blocks.0.attn.qkv.weight": d ** L, "backbone.blocks.0.mlp.fc.bias": d ** L,
                "backbone.blocks.1.attn.proj.weight": d, "backbone.blocks.1.norm2.weight": d,
                "classifier.weight": 1.0, "classifier.bias": 1.0, "shape_embed.weight": 1.0, "crf.transitions": 1.0}
    lr_of, wd_of = {}, {}
    for g in t.optimizer.param_groups:
        for n in g["names"]:
            lr_of[n], wd_of[n] = g["lr"], g["weight_decay"]
    for n, scale in expected.items():
        assert n in lr_of, sorted(lr_of)
        assert lr_of[n] == pytest.approx(lr * scale, rel=1e-12), n
    # every trainable parameter once, and decay / no decay exactly as the one rule says
    one_rule = {n: g["weight_decay"] for g in param_groups(t.raw_model, 0.01) for n in g["names"]}
    assert wd_of == one_rule
    assert wd_of["crf.transitions"] == 0.0 and wd_of["backbone.blocks.1.attn.proj.weight"] == 0.01
    t.close()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["trainer"]["lr"] == lr


def test_layer_decay_one_keeps_the_one_rule(slices, tiny_model):
    task = make_task("sst2", str(tiny_model), str(slices["sst2"]), max_train=8, max_val=4)
    assert task.param_groups(task.build_model()) is None


# ------------------------------------------------------------------------------------- bucketing
def test_bucketed_batches_are_a_pure_function_of_the_step_and_pad_less(slices, tiny_model):
    kw = dict(batch_size=8, max_length=64, max_val=4)
    plain = make_task("sst2", str(tiny_model), str(slices["sst2"]), **kw)
    a = make_task("sst2", str(tiny_model), str(slices["sst2"]), bucket=6, **kw)
    b = make_task("sst2", str(tiny_model), str(slices["sst2"]), bucket=6, **kw)
    spe = a.steps_per_epoch()
    assert spe == plain.steps_per_epoch() == 24
    steps = list(range(2 * spe))
    order = [a.sampler.indices(s) for s in steps]
    assert [b.sampler.indices(s) for s in reversed(steps)] == order[::-1]  # random access, any order
    for e in range(2):  # each epoch is the epoch sampler's examples, once each
        flat = sorted(i for s in order[e * spe:(e + 1) * spe] for i in s)
        assert flat == sorted(i for s in range(e * spe, (e + 1) * spe) for i in plain.sampler.indices(s))
    assert order[:spe] != order[spe:2 * spe]

    def padding(task):
        return sum(int((1 - task.batch(s, 0, 1)["attention_mask"]).sum()) for s in range(spe))

    assert padding(a) < 0.5 * padding(plain)


# -------------------------------------------------------------------------------------- losses
def test_label_smoothing_and_sentence_weights_follow_their_formulas(slices, tiny_model):
    task = make_task("sst2", str(tiny_model), str(slices["sst2"]), batch_size=8, max_train=64, max_val=4,
                     sentence_weight=3.0, label_smoothing=0.1)
    assert task.summary()["sentence_rows"] == sum(w == 3.0 for w in task.row_weights) > 0
    net = task.build_model().eval()
    batch = task.batch(0, 0, 1)
    got = task.loss(net, batch)["loss"]
    logits = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
    y = batch["labels"]
    q = torch.full_like(logits, 0.1 / 2).scatter_(1, y[:, None], 1 - 0.1 + 0.1 / 2)
    per_row = -(q * logits.log_softmax(-1)).sum(-1)
    w = batch["weights"]
    assert got.detach().item() == pytest.approx(float((w * per_row).sum() / w.sum()), rel=1e-6)
    # a rank's half divided by half the global weight: the ranks' mean is the global mean
    halves = [task.loss(net, task.batch(0, r, 2))["loss"].detach() for r in (0, 1)]
    assert float(sum(halves) / 2) == pytest.approx(got.item(), rel=1e-6)

    ner = make_task("conll2003", str(tiny_model), str(slices["conll2003"]), batch_size=4, max_train=8, max_val=4,
                    label_smoothing=0.2)
    net = ner.build_model().eval()
    batch = ner.batch(0, 0, 1)
    logits = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
    ref = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=0.2)
    assert ner.loss(net, batch)["loss"].item() == pytest.approx(ref.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------- CRF
def _brute(crf, em, n):
    """log Z and the best path of one sequence of n steps, over every K^n tag sequence."""
    k = em.shape[-1]
    scores = {}
    for tags in itertools.product(range(k), repeat=n):
        t = torch.tensor(tags)
        scores[tags] = crf.score(em[None, :n], t[None], torch.ones(1, n, dtype=torch.bool))[0]
    return torch.logsumexp(torch.stack(list(scores.values())), 0), list(max(scores, key=lambda s: scores[s]))


def test_crf_matches_brute_force_and_passes_gradcheck():
    from polymodal.nn.crf import CRF

    torch.manual_seed(0)
    crf = CRF(3).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    em = torch.randn(3, 4, 3, dtype=torch.double)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    log_z = crf.log_partition(em, mask)
    paths = crf.decode(em, mask)
    for r, n in enumerate([4, 2, 1]):
        z, best = _brute(crf, em[r], n)
        assert log_z[r].item() == pytest.approx(z.item(), abs=1e-10)
        assert paths[r] == best
    # padding changes nothing: the row of 2 steps alone gives the same loss
    tags = torch.randint(0, 3, (3, 4))
    nll = crf.nll(em, tags, mask)
    assert nll[1].item() == pytest.approx(crf.nll(em[1:2, :2], tags[1:2, :2], mask[1:2, :2])[0].item(), abs=1e-12)
    assert (nll > 0).all()

    params = [em.clone().requires_grad_(), crf.transitions.detach().clone().requires_grad_(),
              crf.start.detach().clone().requires_grad_(), crf.end.detach().clone().requires_grad_()]

    def g(e, a, s, t):  # functional form: the CRF's parameters as inputs
        crf2 = CRF(3).double()
        del crf2.transitions, crf2.start, crf2.end
        crf2.transitions, crf2.start, crf2.end = a, s, t
        return crf2.nll(e, tags, mask).sum()

    assert torch.autograd.gradcheck(g, params, eps=1e-6, atol=1e-6)


def test_crf_decodes_a_hand_made_example():
    from polymodal.nn.crf import CRF

    # tags O=0, B=1, I=2. Emissions alone say O I O I; the transitions forbid O -> I, so the best
    # path opens each entity with B where the emission of B is nearly as good.
    crf = CRF(3)
    with torch.no_grad():
        crf.transitions.copy_(torch.tensor([[0.0, 0.0, -100.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    em = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 1.5], [2.0, 0.0, 0.0], [0.0, 1.2, 1.4], [0.0, 0.0, 0.0]]])
    assert em[0, :4].argmax(-1).tolist() == [0, 2, 0, 2]
    assert crf.decode(em, torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)) == [[0, 1, 0, 1]]
    # and an entity that continues: O B I I
    em2 = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 1.5], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]])
    assert crf.decode(em2, torch.ones(1, 4, dtype=torch.bool)) == [[0, 1, 2, 2]]


def test_crf_head_loss_and_tags_on_words(slices, tiny_model):
    from polymodal.models.heads import word_steps

    ner = make_task("conll2003", str(tiny_model), str(slices["conll2003"]), batch_size=4, max_train=8, max_val=4,
                    crf=True)
    net = ner.build_model().eval()
    batch = ner.batch(0, 0, 1)
    logits = net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
    first = batch["labels"] != -100
    em, tags, mask, pos = word_steps(logits, first, batch["labels"])
    for r in range(4):  # the words' emissions, in order
        n = int(first[r].sum())
        assert torch.equal(em[r, :n], logits[r][first[r]]) and torch.equal(tags[r, :n], batch["labels"][r][first[r]])
    ref = net.crf.nll(em, tags, mask).sum() / first.sum()
    assert ner.loss(net, batch)["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    pred = net.predict_tags(logits, first)
    for r, path in enumerate(net.crf.decode(em, mask)):
        assert pred[r][first[r]].tolist() == path


# ---------------------------------------------------------------------------------- cased words
def test_word_shapes():
    from polymodal.data.tasks import WORD_SHAPES, word_shape

    cases = {"the": "lower", "Paris": "Capitalised", "I": "Capitalised", "EU": "UPPER", "McDonald": "miXed",
             "1996": "digit", "3-0": "digit", ",": "punct", "--": "punct", "O'Neil": "miXed", "U.S.": "UPPER"}
    assert {w: WORD_SHAPES[word_shape(w)] for w in cases} == cases


def test_cased_model_starts_as_the_uncased_one_and_round_trips(slices, tiny_model, tmp_path):
    from polymodal.commands.finetune import eval_cmd
    from polymodal.models.registry import load_model, save_model

    kw = dict(batch_size=4, max_train=8)
    torch.manual_seed(0)
    plain = make_task("conll2003", str(tiny_model), str(slices["conll2003"]), **kw).build_model().eval()
    cased_task = make_task("conll2003", str(tiny_model), str(slices["conll2003"]), cased=True, eval_batch_size=64,
                           **kw)
    torch.manual_seed(0)
    cased = cased_task.build_model().eval()
    missing = cased.load_state_dict(plain.state_dict(), strict=False).missing_keys  # the same head draw
    assert missing == ["shape_embed.weight"]
    batch = cased_task.batch(0, 0, 1)
    assert batch["shape_ids"].shape == batch["input_ids"].shape and int(batch["shape_ids"].max()) > 1
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    base = plain(*args).logits
    assert torch.equal(cased(*args, shape_ids=batch["shape_ids"]).logits, base)  # E_shape starts at 0
    with torch.no_grad():
        cased.shape_embed.weight.normal_()
    moved = cased(*args, shape_ids=batch["shape_ids"]).logits
    assert not torch.allclose(moved, base)
    with pytest.raises(ValueError, match="pass shape_ids"):
        cased(*args)
    folder = save_model(cased, tmp_path / "m", tokenizer=cased_task.tokenizer)
    again = load_model(folder).eval()
    assert again.config.word_shapes == 7 and torch.equal(again(*args, shape_ids=batch["shape_ids"]).logits, moved)
    r = eval_cmd("conll2003", str(folder), data=str(slices["conll2003"]), out=str(tmp_path / "p.jsonl"))
    assert r["metrics"] == pytest.approx(cased_task.predictions(cased)[0])


# ------------------------------------------------------------------------------------------- EMA
def test_ema_formula_swap_and_export(slices, tiny_model, tmp_path):
    from polymodal.models.registry import load_model
    from polymodal.train import ema as E

    task = make_task("sst2", str(tiny_model), str(slices["sst2"]), batch_size=8, max_train=32, max_val=8, ema=0.9)
    net = task.build_model()
    avg = E.find(net)
    name = "classifier.weight" if "classifier.weight" in avg.names else avg.names[-1]
    p = dict(net.named_parameters())[name]
    ref = p.detach().clone()
    for t in range(3):
        with torch.no_grad():
            p.add_(1.0)
        task.after_step(net)
        beta = min(0.9, (1 + t) / (10 + t))
        ref = beta * ref + (1 - beta) * p.detach()
    assert torch.allclose(getattr(avg, name.replace(".", "__")), ref) and float(avg.updates) == 3
    trained = {n: q.detach().clone() for n, q in net.named_parameters()}
    with E.averaged(net):
        assert torch.equal(p, getattr(avg, name.replace(".", "__")))
    assert all(torch.equal(q, trained[n]) for n, q in net.named_parameters())  # swapped back exactly
    with E.averaged(net):
        want = task.predictions(net)[0]
    assert task.evaluate(net) == want
    folder = task.export(net, tmp_path / "m")
    m = load_model(folder)
    sd = m.state_dict()
    assert not any(k.startswith("ema.") for k in sd) and torch.equal(sd[name], getattr(avg, name.replace(".", "__")))
    assert "ema.updates" in net.state_dict()  # the checkpoint keeps the average


# ------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("task,extra", [
    ("sst2", ["--ema", "0.9", "--layer-decay", "0.8", "--bucket", "3", "--sentence-weight", "2",
              "--label-smoothing", "0.1"]),
    ("conll2003", ["--ema", "0.9", "--layer-decay", "0.8", "--bucket", "3", "--cased", "--crf"]),
])
def test_kill9_resume_with_the_recipe_flags(slices, tiny_model, tmp_path, task, extra):
    args = ["finetune", "--task", task, "--model", str(tiny_model), "--data", str(slices[task]),
            "--max-train", "64", "--max-val", "16", "--max-steps", "6", "--eval-every", "2", "--batch-size", "8",
            "--max-length", "32", "--lr", "1e-3", "--threads", "1", "--dtype", "fp32", "--no-progress", *extra]
    kill9_resume_matches(args, tmp_path, kill_at=5)
    from safetensors.torch import load_file

    ck = tmp_path / "killed" / "checkpoints"
    sd = load_file(str(ck / (ck / "latest").read_text().strip() / "model.safetensors"))
    assert float(sd["ema.updates"]) == 6  # the average is in the checkpoint and continued after the kill
    exported = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert not any(k.startswith("ema.") for k in exported)


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [
    ("sst2", dict(ema=0.9, layer_decay=0.8, bucket=2, sentence_weight=2.0, label_smoothing=0.1)),
    ("conll2003", dict(ema=0.9, layer_decay=0.8, bucket=2, cased=True, crf=True)),
])
def test_two_ranks_match_one_with_the_recipe_flags(slices, tiny_model, tmp_path, task, extra):
    kw = dict(task=task, model=str(tiny_model), data=str(slices[task]), batch_size=8, max_length=48, max_train=48,
              max_val=8, **extra)
    two_ranks_match_one(make_task, kw, tmp_path, max_steps=3, eval_every=3, lr=3e-3)


@pytest.mark.slow
def test_recipe_configs_parse_and_name_existing_flags():
    """Every configs/finetune-*.yaml is a one-command recipe: its keys are finetune's flags."""
    import inspect

    import yaml

    from polymodal.commands.finetune import finetune

    flags = {p.replace("_", "-") for p in inspect.signature(finetune).parameters}
    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("finetune-*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        text = path.read_text()
        assert text.startswith("# "), path  # a one-line comment of what it is
        cfg = yaml.safe_load(text)
        assert set(cfg) <= flags, (path, set(cfg) - flags)
        assert cfg["task"] in ("sst2", "conll2003") and not math.isnan(float(cfg.get("minutes", 0)))
