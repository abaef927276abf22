"""The generative-VLM Task on the one engine (issue 12's must-show checks): kill -9 + --resume ==
one run (through the CLI: cached tower features with LoRA, and a trainable tower with random
crops), 2 gloo ranks == 1 process, the loss falls on real Flickr8k captions, and bad input is a
one-line error naming the file and the line."""
import json
import re
from pathlib import Path

import pytest
import torch

from train_harness import kill9_resume_matches, loss_falls, run_cli, two_ranks_match_one
from vlm_assets import char_decoder, make_assets

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("vlm"))


RUN = ["--max-steps", "6", "--eval-every", "2", "--batch-size", "3", "--lr", "1e-2", "--warmup", "2", "--val-samples",
       "2", "--log-every", "1", "--threads", "1", "--dtype", "fp32", "--no-progress"]


def test_kill9_then_resume_equals_one_run(assets, tmp_path):
    """A frozen tower's cached features (the view drawn per image), LoRA with its own lr, AdamW
    state and the batches all come back after a real kill -9: weights bit-exact, metrics equal."""
    kill9_resume_matches(["train-vlm", "--data", str(assets / "flickr"), "--decoder", str(assets / "gpt"),
                          "--vision", str(assets / "vit"), "--lora", "2", "--lora-lr", "3e-3", "--views", "3", *RUN],
                         tmp_path, kill_at=5)


def vlm_task(root: str, variant: str = "pixels"):
    """``pixels``: a fresh trainable tower fed random crops and flips, LoRA on the frozen decoder;
    ``cached``: the frozen ViT checkpoint's features, 3 views."""
    from polymodal.train.tasks.vlm import VLMTask

    kw = (dict(vision=str(Path(root) / "vit"), views=3) if variant == "cached" else
          dict(vision="vit-nano-cifar", train_vision=True, crop_scale=0.6))
    return VLMTask(str(Path(root) / "flickr"), decoder=str(Path(root) / "gpt"), lora=2, batch_size=4, val_samples=2,
                   progress=False, **kw)


def test_augmented_batches_are_a_pure_function_of_the_index(assets):
    """What exact resume rests on: a second task (a resumed process) draws the same crops / flips /
    views for a step, other steps draw others, and a rank's slice is the same as in one process."""
    for variant, key in (("pixels", "pixel_values"), ("cached", "image_features")):
        a, b = vlm_task(str(assets), variant), vlm_task(str(assets), variant)
        for i in (0, 3):
            assert torch.equal(a.batch(i, 0, 1)[key], b.batch(i, 0, 1)[key])
        one, two = a.batch(5, 0, 1)[key], torch.cat([a.batch(5, r, 2)[key] for r in (0, 1)])
        assert torch.equal(one, two)
    # one image under four different steps: its crops differ (a constant would pass the checks above)
    t = vlm_task(str(assets), "pixels")
    crops = {tuple(t.batch(i, 0, 1)["pixel_values"][0].flatten()[:64].tolist()) for i in range(4)}
    assert len(crops) > 1


@pytest.mark.slow
def test_two_ranks_match_one_process(assets, tmp_path):
    """The trainable-tower variant: random crops drawn per item, LoRA and projector and tower
    gradients averaged over ranks, the loss normalised by the global target-token count."""
    task = vlm_task(str(assets))
    lengths = [int((task.batch(0, r, 2)["labels"] != -100).sum()) for r in (0, 1)]
    assert lengths[0] != lengths[1]  # captions of different lengths: the global token normalisation is tested
    two_ranks_match_one(vlm_task, {"root": str(assets)}, tmp_path, max_steps=3, eval_every=3, lr=1e-3, log_every=1)


def test_loss_falls_on_real_flickr8k(tmp_path):
    """16 real Flickr8k images x 5 captions, a frozen random tower (features cached once), a nano
    decoder with a char tokenizer over the captions: the caption loss falls."""
    from polymodal.commands.vlm import train_vlm
    from polymodal.data.captions import load_flickr8k

    if not (FLICKR / "captions.txt").is_file():
        pytest.skip("needs ../shared/data/flickr8k")
    root = tmp_path / "flickr"
    root.mkdir()
    train, val = load_flickr8k(FLICKR, "train")[:16], load_flickr8k(FLICKR, "val")[:4]
    lines = [f"{r.image.name}#{k}\t{c}" for r in train + val for k, c in enumerate(r.captions)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("".join(r.image.name + "\n" for r in train))
    (root / "val.txt").write_text("".join(r.image.name + "\n" for r in val))
    (root / "images").symlink_to(FLICKR / "images")
    chars = "".join(sorted({ch for r in train + val for c in r.captions for ch in c} | set("<>\n")))
    char_decoder(tmp_path / "gpt", chars, block_size=160)
    res = train_vlm(data=str(root), out=str(tmp_path / "run"), vision="vit-nano-cifar", train_vision=False,
                    decoder=str(tmp_path / "gpt"), train_decoder=True, views=2, batch_size=16, lr=3e-3, warmup=5,
                    max_steps=30, eval_every=30, val_samples=8, log_every=2, progress=False, dtype="fp32")
    first, last = loss_falls(tmp_path / "run", first_n=3, last_n=3, margin=0.3)
    assert res["frozen_tower"] and res["train_samples"] == 80 and res["last"]["loss"] < first


# -- bad input: one line naming the file and the line ------------------------------------------
def _flickr(tmp_path: Path, assets: Path) -> Path:
    import shutil

    root = tmp_path / "fl"
    shutil.copytree(assets / "flickr", root)
    return root


def test_non_utf8_captions_file_is_a_one_line_cli_error(assets, tmp_path):
    root = _flickr(tmp_path, assets)
    (root / "captions.txt").write_bytes(b"red.png#0\ta red square .\ngreen.png#0\ta gr\xfcn disc .\n")
    r = run_cli(["train-vlm", "--data", str(root), "--out", str(tmp_path / "run"), "--vision", str(assets / "vit"),
                 "--decoder", str(assets / "gpt"), "--max-steps", "1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"polymodal train-vlm: error: {root / 'captions.txt'}:2: "
                                                 "not valid UTF-8 (byte 41: invalid start byte)")


@pytest.mark.parametrize("name,content,message", [
    ("captions.txt", "red.png#0\ta red square .\ngreen.png a green disc\n", r"captions\.txt:2: expected '<image>#<k>"),
    ("train.txt", "\n", r"train\.txt: empty split list"),
    ("val.txt", "", r"val\.txt: empty split list"),
    ("train.txt", "red.png\npurple.png\n", r"captions\.txt: no captions for 1 image\(s\) of split 'train'"),
])
def test_bad_caption_files_name_file_and_line(assets, tmp_path, name, content, message):
    from polymodal.commands.vlm import train_vlm

    root = _flickr(tmp_path, assets)
    (root / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        train_vlm(data=str(root), out=str(tmp_path / "run"), vision=str(assets / "vit"), decoder=str(assets / "gpt"),
                  max_steps=1, progress=False)


def test_bad_questions_and_references_name_file_and_line(assets, tmp_path):
    from polymodal.commands.vlm import caption, train_vlm

    import shutil

    vqa = tmp_path / "vqa"
    shutil.copytree(assets / "easy_vqa", vqa)
    (vqa / "train_questions.json").write_bytes(b'[["what colour is it?", "red", 0],\n ["is it r\xe9d?", "no", 0]]')
    with pytest.raises(ValueError, match=r"train_questions\.json:2: not valid UTF-8"):
        train_vlm(data=str(vqa), out=str(tmp_path / "run"), stage=2, vision="vit-nano-cifar",
                  decoder=str(assets / "gpt"), max_steps=1, progress=False)
    refs = tmp_path / "refs.txt"
    refs.write_text("red.png\ta red square\nblue.png no tab here\n")
    with pytest.raises(ValueError, match=re.escape(f"{refs}:2: expected '<image>[#k]<TAB><caption>'")):
        caption(model=str(assets / "vit"), image=[str(assets / "flickr" / "images" / "red.png")], references=str(refs))
