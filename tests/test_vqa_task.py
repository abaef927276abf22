"""The VQA Task on the one engine (issue 12's must-show checks): kill -9 + --resume == one run
(through the CLI), 2 gloo ranks == 1 process, the loss falls on real easy-VQA, and bad input
is a one-line error naming the file and the line or entry."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from train_harness import kill9_resume_matches, loss_falls, run_cli, two_ranks_match_one

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EASY = SHARED / "easy_vqa"
TINY = ["--image-size", "32", "--patch-size", "8", "--stem-width", "16", "--width", "32", "--layers", "1",
        "--heads", "2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def easy_slice(root: Path, n_train: int, n_val: int) -> Path:
    """The first questions of real easy-VQA (and their images) in a folder of the same format."""
    if not (EASY / "train_questions.json").is_file():
        pytest.skip("needs ../shared/data/easy_vqa")
    (root / "images").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = json.loads((EASY / f"{split}_questions.json").read_text())[:n]
        (root / f"{split}_questions.json").write_text(json.dumps(rows))
        for _, _, img in rows:
            shutil.copy(EASY / "images" / f"{img}.png", root / "images" / f"{img}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return easy_slice(tmp_path_factory.mktemp("easy"), 48, 12)


def test_kill9_then_resume_equals_one_run(tiny, tmp_path):
    """Flips, dropout and the image order all come back: weights bit-exact, metrics equal (ViLBERT
    here, VisualBERT in the two-rank test)."""
    kill9_resume_matches(["train-vqa", "--arch", "vilbert", "--data", str(tiny), "--max-steps", "6", "--eval-every", "2",
                          "--batch-size", "16", "--flip", "--dropout", "0.1", "--lr", "3e-3", "--warmup", "2",
                          "--log-every", "1", "--threads", "1", "--dtype", "fp32", "--no-progress", *TINY],
                         tmp_path, kill_at=5)


def vqa_task(data: str, arch: str):
    from polymodal.train.tasks.vqa import VQATask

    return VQATask(data, arch, batch_size=32, image_size=32, patch_size=8, stem_width=16, width=32, layers=1, heads=2,
                   dropout=0.0, flip=True, progress=False)


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny, tmp_path, arch="visualbert"):
    task = vqa_task(str(tiny), arch)
    assert task.images_per_step % 2 == 0  # whole images split over the ranks
    sizes = {len(task.batch(i, 0, 2)["input_ids"]) for i in range(4)} | {len(task.batch(i, 1, 2)["input_ids"])
                                                                         for i in range(4)}
    assert len(sizes) > 1  # uneven question counts per rank: the global normalisation is what's tested
    # lr 1e-3: Adam's first steps move every weight by about lr, whatever its gradient's size, so the
    # rounding of a near-zero gradient (the ranks sum in another order) shows as ~lr x rounding
    two_ranks_match_one(vqa_task, {"data": str(tiny), "arch": arch}, tmp_path, max_steps=3, eval_every=3,
                        lr=1e-3, log_every=1)


def test_loss_falls_on_real_easy_vqa(tmp_path):
    from polymodal.commands.vqa import train_vqa

    data = easy_slice(tmp_path / "easy", 600, 100)
    res = train_vqa(data=str(data), out=str(tmp_path / "run"), max_steps=40, eval_every=40, batch_size=64, lr=3e-3,
                    warmup=5, log_every=2, flip=True, progress=False, dtype="fp32", image_size=32, patch_size=8,
                    stem_width=16, width=32, layers=1, heads=2)
    first, last = loss_falls(tmp_path / "run", first_n=3, last_n=3, margin=0.3)
    assert res["step"] == 40 and res["n_answers"] > 5


# -- bad input: one line naming the file and the line / entry ----------------------------------
def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    root = easy_slice(tmp_path / "e", 8, 4)
    (root / name).write_bytes(content)
    return root


def test_non_utf8_questions_file_is_a_one_line_cli_error(tmp_path):
    root = _bad(tmp_path, "train_questions.json", b'[["what shape is it?", "circle", 0],\n ["caf\xe9?", "yes", 0]]')
    r = run_cli(["train-vqa", "--data", str(root), "--out", str(tmp_path / "run"), "--max-steps", "1", *TINY])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"polymodal train-vqa: error: {root / 'train_questions.json'}:2: "
                                                 "not valid UTF-8 (byte 43: invalid continuation byte)")


@pytest.mark.parametrize("name,content,message", [
    ("train_questions.json", b'[["what shape is it?", "circle", 0],\n ["is it red?", "yes"', r"train_questions\.json:2: not valid JSON"),
    ("train_questions.json", b'[["what shape is it?", "circle"]]', r"train_questions\.json: entry 0: expected \[question"),
    ("train_questions.json", b'[["what shape is it?", "circle", 0], ["", "no", 0]]', r"train_questions\.json: entry 1: empty question"),
    ("val_questions.json", b"[]", r"val_questions\.json: empty split, no questions"),
])
def test_bad_questions_files_name_file_and_entry(tmp_path, name, content, message):
    from polymodal.commands.vqa import train_vqa

    root = _bad(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        train_vqa(data=str(root), out=str(tmp_path / "run"), max_steps=1, progress=False)


def test_bad_daquar_csv_and_flags(tmp_path):
    from polymodal.data.vqa import load_vqa

    d = tmp_path / "dq"
    d.mkdir()
    (d / "train_qa.csv").write_text("question,answer,image_id\n")
    with pytest.raises(ValueError, match=r"train_qa\.csv:1: header only"):
        load_vqa(d)
    (d / "train_qa.csv").write_bytes(b"question,answer,image_id\nwhat is it,chair,image1\nwhat\xff,table,image1\n")
    with pytest.raises(ValueError, match=r"train_qa\.csv:3: not valid UTF-8"):
        load_vqa(d)
    root = easy_slice(tmp_path / "e", 8, 4)
    r = run_cli(["train-vqa", "--data", str(root), "--out", str(tmp_path / "run"), "--minutes", "-1", *TINY])
    assert r.returncode == 2 and "--minutes must be >= 0" in r.stderr
