"""train-vit, linear-probe and ``eval --task retrieval|image-classification`` (polymodal.eval.vision.eval_vision);
the engine checks (kill -9 resume, 2 ranks == 1, learning, bad inputs) are in test_vit_engine.py and test_clip_engine.py."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = SHARED / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "train.tsv").is_file(), reason="needs ../shared/data/cifar10")
CLASSES = ("airplane", "cat", "ship", "truck")


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """Our CIFAR-10 layout (train.tsv / val.tsv) over 40 + 8 real images of 4 classes."""
    root = tmp_path_factory.mktemp("cifar")
    rows = [ln.split("\t") for ln in (CIFAR / "train.tsv").read_text().splitlines() if ln.strip()]
    train, val = [], []
    for c in CLASSES:
        files = [r for r, lab in rows if lab == c]
        train += [f"{CIFAR / r}\t{c}" for r in files[:10]]
        val += [f"{CIFAR / r}\t{c}" for r in files[10:12]]
    (root / "train.tsv").write_text("\n".join(train) + "\n")
    (root / "val.tsv").write_text("\n".join(val) + "\n")
    return root


@pytest.fixture(scope="module")
def vit_run(tiny_cifar, tmp_path_factory):
    from polymodal.commands.vit import train_vit

    out = tmp_path_factory.mktemp("vit")
    # no augmentation or smoothing: memorising 40 images must drive the training loss down
    # (4 steps an epoch: 24 epochs, evaluated every 8)
    r = train_vit(data=str(tiny_cifar), out=str(out), preset="vit-nano-cifar", epochs=24, batch_size=10, lr=3e-3,
                  warmup=4, label_smoothing=0.0, crop_pad=0, randaugment=0, mix_prob=0.0, eval_every=32,
                  progress=False, threads=1, dtype="fp32")
    return out, r


@needs_cifar
def test_train_vit_learns_and_saves_best(vit_run, tiny_cifar, capsys):
    from polymodal.eval.vision import eval_vision

    out, r = vit_run
    hist = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [h for h in hist if "val_accuracy" in h]
    assert [h["step"] for h in evals] == [32, 64, 96] and r["steps"] == 96 and r["epochs"] == 24
    # from ~ln 4 (chance over 4 classes) towards memorising the 40 images
    train = [h["loss"] for h in hist if "loss" in h]
    assert train[-1] < train[0] and train[-1] < 0.7 * math.log(4), hist
    assert (out / "curve.png").stat().st_size > 1000
    assert r["best_val_accuracy"] == max(h["val_accuracy"] for h in evals)
    # the exported model is the best evaluation's: eval reproduces its val accuracy and loss
    js = out / "eval.json"
    res = eval_vision("image-classification", str(out), str(tiny_cifar), "val", 64, str(js))  # a run folder resolves
    m = json.loads(js.read_text())
    assert res["metrics"]["accuracy"] == m["accuracy"]
    best = next(h for h in evals if h["step"] == r["best_step"])
    assert m["accuracy"] == pytest.approx(best["val_accuracy"]) and m["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert "accuracy" in capsys.readouterr().out


@needs_cifar
def test_cached_pixels_match_image_processor(vit_run, tiny_cifar):
    """The uint8 cache + tensor normalisation equals the PIL ImageProcessor on the files, and the
    eval logits equal the model's on the processor's tensors (flip TTA: mean with the mirror)."""
    from polymodal.data.image_sets import decode_images, labelled_splits, normalize
    from polymodal.eval.vision import classify, load_classifier

    out, _ = vit_run
    net, proc, classes = load_classifier(out / "model")
    assert classes == sorted(CLASSES)
    paths, labels = labelled_splits(tiny_cifar)["val"]
    images = decode_images(paths, labels, classes, proc, progress=False)
    ref = proc(paths)
    torch.testing.assert_close(normalize(images.pixels, proc), ref)
    with torch.no_grad():
        want = 0.5 * (net(ref) + net(ref.flip(-1)))
    torch.testing.assert_close(classify(net, images, proc, flip_tta=True), want)


def test_class_folder_split_is_stratified_and_disjoint(tmp_path):
    from PIL import Image

    from polymodal.data.image_sets import labelled_splits

    for c, n in (("a", 10), ("b", 20)):
        (tmp_path / c).mkdir()
        for k in range(n):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / c / f"{k}.png")
    s = labelled_splits(tmp_path, val_fraction=0.2, seed=1)
    assert sorted(s["val"][1]) == ["a"] * 2 + ["b"] * 4
    assert not set(s["train"][0]) & set(s["val"][0]) and len(s["train"][0]) + len(s["val"][0]) == 30
    assert s == labelled_splits(tmp_path, val_fraction=0.2, seed=1)
    with pytest.raises(ValueError, match="class 'c'"):
        from polymodal.data.image_sets import decode_images
        from polymodal.data.images import ImageProcessor

        decode_images([tmp_path / "a" / "0.png"], ["c"], ["a", "b"], ImageProcessor(image_size=8), progress=False)


def test_augmentations_keep_shape_range_and_mix_targets():
    from polymodal.data.augment import mix_batch, rand_augment, random_crop_flip, soft_targets

    rng = np.random.default_rng(0)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = random_crop_flip(x, 4, rng)
    assert y.shape == x.shape
    # pad 0, no flip: identity; a crop of a reflect-padded image is a translated copy
    assert torch.equal(random_crop_flip(x, 0, rng, flip=False), x)
    z = rand_augment(x, 2, 9.0, np.random.default_rng(0))
    assert z.shape == x.shape and z.min() >= 0 and z.max() <= 1
    t = soft_targets(torch.tensor([0, 0, 0, 1, 1, 1]), 3, 0.1)  # each image's partner (reversed batch) differs
    torch.testing.assert_close(t.sum(-1), torch.ones(6))
    assert t[0, 0] == pytest.approx(0.9 + 0.1 / 3)
    kinds = set()
    for seed in range(12):
        xm, tm = mix_batch(x, t, np.random.default_rng(seed), mix_prob=1.0)
        torch.testing.assert_close(tm.sum(-1), torch.ones(6))
        lam = ((tm[:, 0] - t.flip(0)[:, 0]) / (t[:, 0] - t.flip(0)[:, 0]))[0].item()
        if torch.allclose(xm, lam * x + (1 - lam) * x.flip(0)):
            kinds.add("mixup")
        else:  # CutMix: the target weight of image i is the share of its pixels still its own
            own = (xm == x).all(dim=1).float().mean(dim=(1, 2))
            assert torch.equal((xm == x) | (xm == x.flip(0)), torch.ones_like(xm, dtype=torch.bool))
            torch.testing.assert_close(own, torch.full((6,), lam), atol=1e-6, rtol=0)
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_augmenting_any_split_of_a_batch_gives_its_rows():
    """A plan applied to rows 0-3 and to rows 4-7 (with their Mixup / CutMix partners) equals the
    whole batch's rows: what makes 2 ranks see the batch of 1 process."""
    from polymodal.data.augment import AugmentConfig, augment_rows, draw_plan

    px = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cfg = AugmentConfig(crop_pad=2, randaugment=2, ra_magnitude=6, mix_prob=1.0)
    for seed in range(6):
        plan = draw_plan(cfg, 8, (16, 16), np.random.default_rng([seed, 7]))
        assert plan.mix in ("mixup", "cutmix")
        whole = augment_rows(px, labels, range(8), cfg, plan, 3)
        for rows in (range(4), range(4, 8)):
            part = augment_rows(px, labels, rows, cfg, plan, 3)
            for a, b in zip(whole, part):
                assert torch.equal(a[rows.start:rows.stop], b)


# --------------------------------------------------------------------------------- linear probe
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from polymodal.models.clip import CLIP, CLIPConfig
    from polymodal.models.registry import save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip") / "ck"
    save_model(CLIP(CLIPConfig.from_preset("clip-nano")), out)
    return out


@needs_cifar
def test_linear_probe_equals_sklearn_on_the_same_features(tiny_clip, tiny_cifar):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from polymodal.data.images import ImageProcessor
    from polymodal.models.registry import load_model
    from polymodal.commands.vit import linear_probe
    from polymodal.data.image_sets import labelled_splits

    r = linear_probe(str(tiny_clip), str(tiny_cifar), c_values=[0.01, 1.0, 100.0], threads=1)
    assert r["tower"] == "clip-image-tower" and r["feature_dim"] == 64 and r["n_train"] == 40
    assert r["C"] == max(r["sweep"], key=lambda s: (s["holdout_accuracy"], -s["C"]))["C"]
    # reference: the image tower's pooled features of the PIL-preprocessed files, sklearn's own pipeline
    clip = load_model(tiny_clip)
    proc = ImageProcessor.from_config(clip.config)
    split = labelled_splits(tiny_cifar)
    feats, ys = {}, {}
    for s in ("train", "val"):
        paths, labels = split[s]
        with torch.no_grad():
            feats[s] = clip.vision.encode(proc(paths)).double().numpy()
        ys[s] = np.array([sorted(CLASSES).index(lab) for lab in labels])
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=r["C"], max_iter=2000, random_state=0))
    ref.fit(feats["train"], ys["train"])
    assert r["accuracy"] == pytest.approx(float((ref.predict(feats["val"]) == ys["val"]).mean()))


@needs_cifar
def test_linear_probe_cli_on_a_vit_checkpoint(vit_run, tiny_cifar, tmp_path):
    from polymodal.cli import main

    out, r = vit_run
    js = tmp_path / "probe.json"
    assert main(["linear-probe", "--model", str(out), "--data", str(tiny_cifar), "--c-values", "0.1", "10",
                 "--json-out", str(js)]) == 0
    p = json.loads(js.read_text())
    assert p["tower"] == "vit" and p["feature_dim"] == r["config"]["n_embd"] and p["n_val"] == 8
    assert [s["C"] for s in p["sweep"]] == [0.1, 10.0] and 0 <= p["accuracy"] <= 1


# -------------------------------------------------------------------------------- retrieval
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 30, 160), "orange": (250, 140, 0)}


@pytest.fixture(scope="module")
def synthetic_flickr(tmp_path_factory):
    """A Flickr8k-format folder of 12 generated 24x24 images (a coloured square on a coloured ground)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("flickr")
    (root / "images").mkdir()
    names, lines = [], []
    cols = list(COLOURS)
    for i in range(12):
        fg, bg = cols[i % 8], cols[(3 * i + 1) % 8]
        im = Image.new("RGB", (24, 24), COLOURS[bg])
        ImageDraw.Draw(im).rectangle([4 + i % 5, 4, 14 + i % 5, 16], fill=COLOURS[fg])
        name = f"img{i}.png"
        im.save(root / "images" / name)
        names.append(name)
        for k, cap in enumerate((f"a {fg} square on {bg}", f"{fg} box", f"the {bg} background",
                                 f"a {fg} shape", f"{fg} and {bg}")):
            lines.append(f"{name}#{k}\t{cap}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "val.txt").write_text("\n".join(names[8:]) + "\n")
    return root


# a small unlocked text tower
CLIP_KW = dict(image_tower="convnet", text_tower="encoder", image_size=16, width=16, depth=2, text_width=16,
               text_depth=1, projection_dim=16, batch_size=8, lr=3e-3, warmup=1, max_steps=3, progress=False,
               seed=0, threads=1, dtype="fp32")


def test_eval_task_retrieval_equals_eval_retrieval(synthetic_flickr, tmp_path, capsys):
    from polymodal.cli import main
    from polymodal.commands.clip import train_clip
    from polymodal.eval.vision import eval_vision

    ck = tmp_path / "clip"
    r = train_clip(data=str(synthetic_flickr), out=str(ck), **CLIP_KW)
    assert r["steps"] == 3 and r["eval_on"] == "val"
    capsys.readouterr()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval-retrieval", "--model", str(ck), "--data", str(synthetic_flickr), "--json-out", str(a)]) == 0
    out_a = capsys.readouterr().out
    eval_vision("retrieval", str(ck), str(synthetic_flickr), "val", 64, str(b))  # 'polymodal eval --task retrieval'
    out_b = capsys.readouterr().out
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ma == mb and ma["n_images"] == 4 and ma["n_texts"] == 20
    assert {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_mean_rank",
            "i2t_mean_rank", "mean_recall"} <= set(mb)
    assert out_a == out_b and "text->image" in out_b
    # the default JSON location: beside the run's best model, whose training evaluation it repeats
    eval_vision("retrieval", str(ck), str(synthetic_flickr))
    assert json.loads((ck / "model" / "retrieval_val.json").read_text()) == ma
    assert ma["mean_recall"] == pytest.approx(r["best_mean_recall"], abs=1e-6)
