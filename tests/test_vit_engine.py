"""train-vit on the one engine: kill -9 + --resume == one run (CLI), 2 gloo ranks == 1 process
(ImageClassifyTask, Mixup partners on the other rank), the loss falls on real CIFAR-10, bad inputs
give one-line errors naming the file."""
import math
import warnings
from pathlib import Path

import pytest
from train_harness import kill9_resume_matches, loss_falls, run_cli, two_ranks_match_one

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = SHARED / "cifar10"
pytestmark = pytest.mark.skipif(not (CIFAR / "train.tsv").is_file(), reason="needs ../shared/data/cifar10")
CLASSES = ("airplane", "cat", "ship", "truck")


def _subset(root: Path, per_class_train: int, per_class_val: int, classes=CLASSES) -> Path:
    """Our CIFAR-10 layout (train.tsv / val.tsv) over real images of a few classes."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [ln.split("\t") for ln in (CIFAR / "train.tsv").read_text().splitlines() if ln.strip()]
    train, val = [], []
    for c in classes:
        files = [r for r, lab in rows if lab == c]
        train += [f"{CIFAR / r}\t{c}" for r in files[:per_class_train]]
        val += [f"{CIFAR / r}\t{c}" for r in files[per_class_train:per_class_train + per_class_val]]
    (root / "train.tsv").write_text("\n".join(train) + "\n")
    (root / "val.tsv").write_text("\n".join(val) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    return _subset(tmp_path_factory.mktemp("cifar"), 10, 2)


# image size 32, width 32, one block; default augmentation with Mixup / CutMix on half the batches
TINY = ["--preset", "vit-nano-cifar", "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--intermediate-size", "64",
        "--batch-size", "8", "--warmup", "2", "--mix-prob", "0.5", "--threads", "1", "--dtype", "fp32", "--no-progress"]


def test_kill9_resume_equals_one_run(tiny_cifar, tmp_path):
    kill9_resume_matches(["train-vit", "--data", str(tiny_cifar), *TINY, "--max-steps", "6", "--eval-every", "2"],
                         tmp_path, kill_at=5)


def make_task(data: str, mix_prob: float = 1.0):
    """A tiny patch-stem ViT (no BatchNorm, no dropout), every batch mixed: each rank's rows have
    their Mixup / CutMix partners on the other rank."""
    from polymodal.data.augment import AugmentConfig
    from polymodal.train.tasks.image_classify import ImageClassifyTask

    return ImageClassifyTask(data, "vit-nano-cifar", dict(n_embd=32, n_layer=1, n_head=2, intermediate_size=64,
                                                          dropout=0.0), batch_size=8,
                             augment=AugmentConfig(mix_prob=mix_prob, randaugment=2), progress=False)


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_cifar, tmp_path):
    two_ranks_match_one(make_task, {"data": str(tiny_cifar)}, tmp_path, max_steps=3, eval_every=3, log_every=1,
                        warmup=1)


def test_loss_falls_on_real_cifar10(tmp_path):
    """160 real CIFAR-10 images of 10 classes: 60 steps (12 epochs) take the train loss well below ln 10."""
    from polymodal.data.augment import AugmentConfig
    from polymodal.train.tasks.image_classify import ImageClassifyTask
    from polymodal.train.trainer import TrainArgs, fit

    classes = sorted({ln.split("\t")[1] for ln in (CIFAR / "train.tsv").read_text().splitlines() if ln.strip()})
    data = _subset(tmp_path / "c10", 16, 2, classes)
    task = ImageClassifyTask(data, "vit-nano-cifar", {"dropout": 0.0}, batch_size=32, progress=False,
                             augment=AugmentConfig(crop_pad=0, randaugment=0, mix_prob=0.0, label_smoothing=0.0))
    s = fit(task, TrainArgs(out=str(tmp_path / "run"), max_steps=60, eval_every=60, lr=3e-3, warmup=3, log_every=1,
                            threads=1, dtype="fp32", progress=False, tensorboard=False))
    first, last = loss_falls(tmp_path / "run", first_n=3, last_n=3, margin=0.3)
    assert first > 0.8 * math.log(10) and s["step"] == 60 and 0 <= s["best"] <= 1


# ------------------------------------------------------------------------------------------ bad input
def _class_folders(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.new("RGB", (32, 32), (30 * k % 255, 90 if c == "a" else 200, 40)).save(root / c / f"{k}.png")
    return root


def _train(data, **kw):
    from polymodal.commands.vit import train_vit

    args = dict(preset="vit-nano-cifar", n_embd=32, n_layer=1, n_head=2, batch_size=4, max_steps=1, eval_every=1,
                progress=False, threads=1, dtype="fp32", out=str(Path(data).parent / "run"), overwrite=True)
    return train_vit(data=str(data), **{**args, **kw})


def test_empty_class_folder_is_a_one_line_cli_error(tmp_path):
    data = _class_folders(tmp_path / "imgs", {"a": 3, "b": 0})
    r = run_cli(["train-vit", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"polymodal train-vit: error: {data / 'b'}: empty class folder " \
                                                 "(no .bmp/.gif/.jpeg/.jpg/.png/.tif/.tiff/.webp files)"


def test_unreadable_image_is_skipped_with_a_count(tmp_path):
    from polymodal.data.images import ImageLoadError

    data = _class_folders(tmp_path / "imgs", {"a": 6, "b": 6})
    (data / "a" / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = _train(data, val_fraction=0.3)
    assert r["steps"] == 1 and r["n_train"] + r["n_val"] == 12
    msgs = [str(x.message) for x in w if "unreadable" in str(x.message)]
    assert len(msgs) == 1 and "skipped 1 unreadable image(s)" in msgs[0] and "broken.png" in msgs[0]
    with pytest.raises(ImageLoadError, match="broken.png"):
        _train(data, val_fraction=0.3, skip_bad_images=False)


@pytest.mark.parametrize("setup, exc, match", [
    ("no_images", FileNotFoundError, r"imgs: no images found"),
    ("one_class", ValueError, r"at least 2 classes"),
    ("header_only_tsv", ValueError, r"train.tsv: no '<image path><TAB><class>' lines"),
    ("bad_tsv_line", ValueError, r"train.tsv:2: expected '<image path><TAB><class>'"),
    ("non_utf8_tsv", ValueError, r"train.tsv:2"),
    ("no_val_tsv", FileNotFoundError, r"val.tsv: not found"),
    ("all_unreadable", ValueError, r"decode train: no usable images \(2 listed, first error: .*x.png"),
    ("negative_minutes", ValueError, r"--minutes must be >= 0"),
])
def test_bad_inputs_name_the_file(tmp_path, setup, exc, match):
    d = tmp_path / "imgs"
    d.mkdir()
    kw = {}
    if setup == "no_images":
        (d / "notes.txt").write_text("no pictures here")
    elif setup == "one_class":
        _class_folders(d, {"a": 4})
    elif setup in ("header_only_tsv", "bad_tsv_line", "non_utf8_tsv", "no_val_tsv", "all_unreadable"):
        _class_folders(d, {"a": 2, "b": 2})
        train = {"header_only_tsv": "", "bad_tsv_line": "a/0.png\ta\nb/0.png b\n",
                 "non_utf8_tsv": "a/0.png\ta\nb/0.png\tb\xe9\n".encode("latin-1"),
                 "all_unreadable": "a/x.png\ta\nb/x.png\tb\n"}.get(setup, "a/0.png\ta\nb/0.png\tb\n")
        (d / "train.tsv").write_bytes(train if isinstance(train, bytes) else train.encode())
        if setup != "no_val_tsv":
            (d / "val.tsv").write_text("a/1.png\ta\nb/1.png\tb\n")
        for c in "ab":
            (d / c / "x.png").write_bytes(b"broken") if setup == "all_unreadable" else None
    elif setup == "negative_minutes":
        _class_folders(d, {"a": 3, "b": 3})
        kw = {"minutes": -1.0, "val_fraction": 0.4}
    with pytest.raises(exc, match=match):
        _train(d, **kw)


def test_one_weight_decay_rule_lists_positions_class_token_and_temperature():
    """ViT and CLIP say what not to decay (``no_weight_decay()``, timm's convention); the Trainer's one
    AdamW rule reads it, so no command excludes parameters by name any more."""
    from polymodal.models.clip import CLIP, CLIPConfig
    from polymodal.models.vit import ViT, ViTConfig
    from polymodal.train.optim import no_weight_decay_names, param_groups

    vit = ViT(ViTConfig.from_preset("vit-nano-cifar"))
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    decay, no_decay = param_groups(vit, 0.05)
    assert {"pos_embed", "cls_token"} <= set(no_decay["names"])
    assert any(n.startswith("blocks.0.") and n.endswith(".weight") for n in decay["names"])  # the matrices decay
    assert not any(n in decay["names"] for n in ("pos_embed", "cls_token"))
    clip = CLIP(CLIPConfig.from_preset("clip-nano", logit_bias_init=-10.0))
    listed = no_weight_decay_names(clip)
    assert {"logit_scale", "logit_bias", "vision.pos_embed", "vision.cls_token", "text.pos_embed.weight",
            "text.tok_embed.weight"} <= listed
    decay, no_decay = param_groups(clip, 0.1)
    assert listed <= set(no_decay["names"]) and "visual_projection.weight" in decay["names"]
