"""VQA data loaders (easy-VQA, DAQUAR, VQAv2 JSON) and the train-vqa / vqa / eval-vqa commands
(``polymodal.commands.vqa``); the engine's must-show checks of the VQA Task are in test_vqa_task.py."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymodal.data.vqa import answer_space, load_vqa
from polymodal.eval.vqa import exact_match, normalize_answer, vqa_accuracy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EASY, DAQUAR = SHARED / "easy_vqa", SHARED / "daquar"
needs_easy = pytest.mark.skipif(not (EASY / "train_questions.json").is_file(), reason="needs ../shared/data/easy_vqa")
needs_daquar = pytest.mark.skipif(not (DAQUAR / "train_qa.csv").is_file(), reason="needs ../shared/data/daquar")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CI box: extra threads only spin
    yield
    torch.set_num_threads(n)


# -- loaders ------------------------------------------------------------------------------
@needs_easy
def test_easy_vqa_loader_matches_the_json():
    raw = json.loads((EASY / "val_questions.json").read_text())
    ex = load_vqa(EASY, "val")
    assert len(ex) == len(raw)
    for i in (0, len(raw) // 2, len(raw) - 1):
        q, a, img = raw[i]
        assert (ex[i].question, ex[i].answers, ex[i].image) == (q, [a], EASY / "images" / f"{img}.png")
    allowed = {normalize_answer(s) for s in (EASY / "answers.txt").read_text().split("\n") if s.strip()}
    assert set(answer_space(ex)) <= allowed
    assert len({e.qid for e in ex}) == len(ex)


@needs_daquar
def test_daquar_loader_matches_the_csv():
    with open(DAQUAR / "train_qa.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ex = load_vqa(DAQUAR, "train")
    assert [(e.question, e.answers[0]) for e in ex] == [(r["question"], r["answer"]) for r in rows]
    assert all(e.image == DAQUAR / "images" / f"{r['image_id']}.jpg" for e, r in zip(ex, rows))
    multi = next(e for e in ex if "," in e.answers[0])  # list answers stay one string
    assert len(multi.answers) == 1 and exact_match(multi.answers[0].replace(",", ""), multi.answers[0]) == 1.0


def _vqav2(root: Path, subtype="val2014", answers=None):
    root.mkdir(parents=True, exist_ok=True)
    for iid in (42, 7):
        Image.new("RGB", (8, 8), (iid, 0, 0)).save(root / f"COCO_{subtype}_{iid:012d}.jpg")
    answers = answers or {1: ["2"] * 3 + ["two"] * 2 + ["3"] * 5, 2: ["yes"] * 10}
    qs = {"data_subtype": subtype, "questions": [
        {"question_id": 1, "image_id": 42, "question": "How many cats?"},
        {"question_id": 2, "image_id": 7, "question": "Is it red?"}]}
    ann = {"annotations": [{"question_id": k, "image_id": 0, "answers": [{"answer": a, "answer_id": j + 1}
                                                                         for j, a in enumerate(v)]}
                           for k, v in answers.items()]}
    qpath = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    qpath.write_text(json.dumps(qs))
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(ann))
    return qpath


def test_vqav2_pair_loads_with_all_human_answers(tmp_path):
    qpath = _vqav2(tmp_path / "v2")
    ex = load_vqa(qpath)
    assert [e.qid for e in ex] == ["1", "2"]
    assert ex[0].image == tmp_path / "v2" / "COCO_val2014_000000000042.jpg" and ex[0].question == "How many cats?"
    assert ex[0].answers == ["2"] * 3 + ["two"] * 2 + ["3"] * 5 and ex[1].answers == ["yes"] * 10
    # "two" normalises to "2": 5 humans agree, so the soft accuracy is 1; "3" has 5 too
    assert vqa_accuracy("2", ex[0].answers) == 1.0 and answer_space(ex) == ["yes", "2", "3"]
    assert [e.qid for e in load_vqa(tmp_path / "v2", split="val")] == ["1", "2"]  # folder + split finds the pair


def _easy(root: Path, rows, images=(0,)):
    (root / "images").mkdir(parents=True)
    for i in images:
        Image.new("RGB", (8, 8)).save(root / "images" / f"{i}.png")
    (root / "train_questions.json").write_text(json.dumps(rows))
    return root


@pytest.mark.parametrize("rows,error,pattern", [
    ([["what?", "no", 0], ["  ", "yes", 0]], ValueError, r"train_questions\.json: entry 1: empty question"),
    ([["what?", "no", 0], ["is it?", "yes", 5]], FileNotFoundError, r"train_questions\.json: entry 1: image .*5\.png not found"),
    ([["what?", "no"]], ValueError, r"train_questions\.json: entry 0: expected \[question, answer, image_id\]"),
])
def test_easy_vqa_bad_rows_name_file_and_entry(tmp_path, rows, error, pattern):
    with pytest.raises(error, match=pattern):
        load_vqa(_easy(tmp_path / "e", rows))


def test_daquar_and_vqav2_bad_entries_name_file_and_line(tmp_path):
    d = tmp_path / "dq"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "images" / "image1.jpg")
    (d / "train_qa.csv").write_text('question,answer,image_id\nwhat is it,chair,image1\n"",table,image1\n')
    with pytest.raises(ValueError, match=r"train_qa\.csv:3: empty question"):
        load_vqa(d)
    (d / "train_qa.csv").write_text("question,answer,image_id\nwhat is it,chair,image9\n")
    with pytest.raises(FileNotFoundError, match=r"train_qa\.csv:2: image .*image9\.jpg not found"):
        load_vqa(d)

    qpath = _vqav2(tmp_path / "v2")
    q = json.loads(qpath.read_text())
    del q["questions"][1]["question"]
    qpath.write_text(json.dumps(q))
    with pytest.raises(ValueError, match=r"questions\.json: questions\[1\]: missing field 'question'"):
        load_vqa(qpath)
    apath = qpath.with_name("v2_mscoco_val2014_annotations.json")
    a = json.loads(apath.read_text())
    del a["annotations"][0]["answers"]
    apath.write_text(json.dumps(a))
    with pytest.raises(ValueError, match=r"annotations\.json: annotations\[0\]: missing field 'answers'"):
        load_vqa(qpath)


# -- commands -----------------------------------------------------------------------------
N_TRAIN, N_VAL = 32, 16


@pytest.fixture(scope="module")
def tiny_easy(tmp_path_factory):
    """An easy-VQA folder of 32 real training and 16 real val questions (and their images)."""
    if not (EASY / "train_questions.json").is_file():
        pytest.skip("needs ../shared/data/easy_vqa")
    root = tmp_path_factory.mktemp("easy")
    (root / "images").mkdir()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        rows = json.loads((EASY / f"{split}_questions.json").read_text())[:n]
        (root / f"{split}_questions.json").write_text(json.dumps(rows))
        for _, _, img in rows:
            shutil.copy(EASY / "images" / f"{img}.png", root / "images" / f"{img}.png")
    return root


@pytest.fixture(scope="module", params=["visualbert", "vilbert"])
def trained(request, tiny_easy, tmp_path_factory):
    from polymodal.commands.vqa import train_vqa

    out = tmp_path_factory.mktemp("run") / request.param
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_vqa(data=str(tiny_easy), out=str(out), arch=request.param, max_steps=30, batch_size=N_TRAIN,
                            lr=1e-2, warmup=3, image_size=32, patch_size=8, stem_width=32, width=32, layers=1,
                            heads=2, eval_every=15, log_every=1, progress=False, seed=0, dtype="fp32")
    finally:
        torch.set_num_threads(n)
    return out, summary


def test_train_vqa_lowers_loss_and_writes_a_run_folder(trained):
    out, summary = trained
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert recs[0]["step"] == 1 and summary["step"] == 30 and summary["images_per_step"] == summary["n_images"]
    assert losses[-1] < 0.6 * losses[0], losses  # full-batch steps on 32 questions: memorising
    assert [r["step"] for r in recs if "val_accuracy" in r] == [15, 30]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    assert (out / "curve.png").stat().st_size > 1000 and (out / "checkpoints" / "latest").is_file()
    preds = [json.loads(ln) for ln in (out / "val_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == N_VAL
    best = sum(exact_match(p["prediction"], p["answers"][0]) for p in preds) / N_VAL
    assert best == pytest.approx(summary["best"])  # the kept predictions are the best checkpoint's
    assert summary["metric"] == "accuracy" and 0 <= summary["baseline_accuracy"] <= 1


def test_eval_vqa_equals_a_direct_computation(trained, tiny_easy, tmp_path):
    from polymodal.commands.vqa import eval_vqa
    from polymodal.data.vqa import load_vqa as load

    out, summary = trained
    r = eval_vqa(model=str(out), data=str(tiny_easy), split="val", predictions=str(tmp_path / "p.jsonl"),
                 progress=False)
    val = load(tiny_easy, "val")
    direct = sum(exact_match(p, e.answers[0]) for p, e in zip(r["predictions"], val)) / len(val)
    assert r["accuracy"] == pytest.approx(direct) == pytest.approx(summary["best"])
    assert r["metric"] == "exact match" and r["n"] == N_VAL
    train_answers = [e.answers[0] for e in load(tiny_easy, "train")]
    top = min(set(train_answers), key=lambda a: (-train_answers.count(a), a))  # commonest, ties alphabetical
    assert r["baseline_answer"] == top
    assert r["baseline_accuracy"] == pytest.approx(sum(e.answers[0] == top for e in val) / len(val))
    scored = [json.loads(ln)["score"] for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sum(scored) / len(scored) == pytest.approx(r["accuracy"])


def test_vqa_cli_answers_with_topk_probabilities(trained, tiny_easy, capsys):
    from polymodal.cli import main
    from polymodal.commands.vqa import vqa

    out, _ = trained
    row = json.loads((tiny_easy / "val_questions.json").read_text())[0]
    image = tiny_easy / "images" / f"{row[2]}.png"
    r = vqa(model=str(out / "model"), image=str(image), question=row[0], top_k=3)
    probs = [p for _, p in r["top"]]
    assert len(r["top"]) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-4
    pred = json.loads((out / "val_predictions.jsonl").read_text().splitlines()[0])
    assert r["answer"] == pred["prediction"]  # the same checkpoint and question as eval during training
    assert main(["vqa", "--model", str(out), "--image", str(image), "--question", row[0], "--top-k", "2"]) == 0
    assert r["answer"] in capsys.readouterr().out


def test_vlm_checkpoints_answer_through_answer_question(tmp_path, monkeypatch):
    """The generative path: vqa / eval-vqa hand a family-"vlm" checkpoint to
    polymodal.generate.vlm.answer_question / answer_questions (stubbed here; the VLM's own tests
    cover them, including batched == one at a time)."""
    import polymodal.generate.vlm as gen_vlm
    from polymodal.commands.vqa import eval_vqa, vqa
    from polymodal.models.registry import save_model
    from polymodal.models.vlm import VLM, VLMConfig
    from polymodal.tokenizers import train_char_tokenizer

    save_model(VLM(VLMConfig()), tmp_path / "vlm", train_char_tokenizer("abc xyz"))
    qpath = _vqav2(tmp_path / "v2")
    calls = []

    def answer_question(model, tokenizer, image_path, question, max_new_tokens=16):
        calls.append((type(model).__name__, Path(image_path).name, question, max_new_tokens))
        return "two" if "cats" in question else "no"

    monkeypatch.setattr(gen_vlm, "answer_question", answer_question)
    monkeypatch.setattr(gen_vlm, "answer_questions", lambda model, tok, images, questions, max_new_tokens=16,
                        progress=False: [answer_question(model, tok, i, q, max_new_tokens)
                                         for i, q in zip(images, questions)])
    assert vqa(model=str(tmp_path / "vlm"), image=str(tmp_path / "v2" / "COCO_val2014_000000000007.jpg"),
               question="Is it red?")["answer"] == "no"
    r = eval_vqa(model=str(tmp_path / "vlm"), data=str(qpath), progress=False)
    assert calls[1:] == [("VLM", "COCO_val2014_000000000042.jpg", "How many cats?", 16),
                         ("VLM", "COCO_val2014_000000000007.jpg", "Is it red?", 16)]
    ex = load_vqa(qpath)
    assert r["metric"] == "soft VQA accuracy"
    assert r["accuracy"] == pytest.approx((vqa_accuracy("two", ex[0].answers) + vqa_accuracy("no", ex[1].answers)) / 2)
