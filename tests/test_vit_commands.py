"""train-vit, linear-probe, ``eval --task retrieval|image-classification`` and train-clip on 2 gloo ranks."""
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
    from polymodal.vit_commands import train_vit

    out = tmp_path_factory.mktemp("vit")
    # no augmentation or smoothing: memorising 40 images must drive the training loss down
    r = train_vit(data=str(tiny_cifar), out=str(out), preset="vit-nano-cifar", epochs=24, batch_size=10, lr=3e-3,
                  warmup_epochs=1, label_smoothing=0.0, crop_pad=0, randaugment=0, mix_prob=0.0, eval_every=8,
                  progress=False, threads=1)
    return out, r


@needs_cifar
def test_train_vit_learns_and_saves_best(vit_run, tiny_cifar, capsys):
    from polymodal.cli import main

    out, r = vit_run
    hist = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [8, 16, 24] and r["steps"] == 96
    # from ~ln 4 (chance over 4 classes) towards memorising the 40 images
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] and hist[-1]["train_loss"] < 0.7 * math.log(4), hist
    assert (out / "curve.png").stat().st_size > 1000
    assert r["best_val_accuracy"] == max(h["val_accuracy"] for h in hist)
    # the saved checkpoint is the best evaluation's: eval reproduces its val accuracy and loss
    js = out / "eval.json"
    assert main(["eval", "--task", "image-classification", "--model", str(out / "model"), "--data-dir",
                 str(tiny_cifar), "--out", str(js)]) == 0
    m = json.loads(js.read_text())
    best = next(h for h in hist if h["epoch"] == r["best_epoch"])
    assert m["accuracy"] == pytest.approx(best["val_accuracy"]) and m["loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert "accuracy" in capsys.readouterr().out


@needs_cifar
def test_cached_pixels_match_image_processor(vit_run, tiny_cifar):
    """The uint8 cache + tensor normalisation equals the PIL ImageProcessor on the files, and the
    eval logits equal the model's on the processor's tensors (flip TTA: mean with the mirror)."""
    from polymodal.vit_commands import classify, decode_images, labelled_splits, load_classifier, normalize

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

    from polymodal.vit_commands import labelled_splits

    for c, n in (("a", 10), ("b", 20)):
        (tmp_path / c).mkdir()
        for k in range(n):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / c / f"{k}.png")
    s = labelled_splits(tmp_path, val_fraction=0.2, seed=1)
    assert sorted(s["val"][1]) == ["a"] * 2 + ["b"] * 4
    assert not set(s["train"][0]) & set(s["val"][0]) and len(s["train"][0]) + len(s["val"][0]) == 30
    assert s == labelled_splits(tmp_path, val_fraction=0.2, seed=1)
    with pytest.raises(ValueError, match="class 'c'"):
        from polymodal.data.images import ImageProcessor
        from polymodal.vit_commands import decode_images

        decode_images([tmp_path / "a" / "0.png"], ["c"], ["a", "b"], ImageProcessor(image_size=8), progress=False)


def test_augmentations_keep_shape_range_and_mix_targets():
    from polymodal.vit_commands import mix_batch, rand_augment, random_crop_flip, soft_targets

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    y = random_crop_flip(x, 4, g)
    assert y.shape == x.shape
    # pad 0, no flip: identity; a crop of a reflect-padded image is a translated copy
    assert torch.equal(random_crop_flip(x, 0, g, flip=False), x)
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
    from polymodal.vit_commands import labelled_splits, linear_probe

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
    assert main(["linear-probe", "--model", str(out / "model"), "--data", str(tiny_cifar), "--c-values", "0.1", "10",
                 "--json-out", str(js)]) == 0
    p = json.loads(js.read_text())
    assert p["tower"] == "vit" and p["feature_dim"] == r["config"]["n_embd"] and p["n_val"] == 8
    assert [s["C"] for s in p["sweep"]] == [0.1, 10.0] and 0 <= p["accuracy"] <= 1


# --------------------------------------------------------------------------- retrieval + DDP CLIP
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


# a small unlocked text tower, so the text side's gradients go through DDP too
CLIP_KW = dict(image_tower="convnet", text_tower="encoder", image_size=16, width=16, depth=2, text_width=16,
               text_depth=1, projection_dim=16, batch_size=8, lr=3e-3, warmup=1, max_steps=3, progress=False,
               seed=0, threads=1)


def test_eval_task_retrieval_equals_eval_retrieval(synthetic_flickr, tmp_path, capsys):
    from polymodal.cli import main
    from polymodal.vision_commands import train_clip

    ck = tmp_path / "clip"
    train_clip(data=str(synthetic_flickr), out=str(ck), **CLIP_KW)
    capsys.readouterr()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval-retrieval", "--model", str(ck), "--data", str(synthetic_flickr), "--json-out", str(a)]) == 0
    out_a = capsys.readouterr().out
    assert main(["eval", "--task", "retrieval", "--model", str(ck), "--data-dir", str(synthetic_flickr),
                 "--split", "val", "--out", str(b)]) == 0
    out_b = capsys.readouterr().out
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ma == mb and ma["n_images"] == 4 and ma["n_texts"] == 20
    assert {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_mean_rank",
            "i2t_mean_rank"} <= set(mb)
    assert out_a == out_b and "text->image" in out_b
    # the default JSON location
    assert main(["eval", "--task", "retrieval", "--model", str(ck), "--data-dir", str(synthetic_flickr)]) == 0
    assert json.loads((ck / "retrieval_val.json").read_text()) == ma


def _clip_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    import polymodal.vision_commands as V

    trained = []
    init = V._PairEncoder.__init__

    def spy(self, model):  # keep a handle on this rank's model to compare its final weights
        init(self, model)
        trained.append(model)

    V._PairEncoder.__init__ = spy
    r = V.train_clip(data=data, out=str(Path(out) / "ck"), **CLIP_KW)
    params = {n: p.detach().clone().contiguous() for n, p in trained[0].named_parameters()}
    save_file(params, str(Path(out) / f"params-rank{rank}.safetensors"))
    (Path(out) / f"result-rank{rank}.json").write_text(json.dumps({"loss": r["loss"], "first": r["first_loss"]}))


@pytest.mark.slow
def test_train_clip_two_gloo_ranks_match_one_process(synthetic_flickr, tmp_path):
    """2 ranks x 4 pairs with gathered negatives + DDP = 1 process x 8 pairs: same losses, same weights."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from test_distributed import _free_port

    import polymodal.vision_commands as V

    ref_models = []
    init = V._PairEncoder.__init__
    V._PairEncoder.__init__ = lambda self, model: (init(self, model), ref_models.append(model))[0]
    try:
        V.train_clip(data=str(synthetic_flickr), out=str(tmp_path / "single"), **CLIP_KW)
    finally:
        V._PairEncoder.__init__ = init
    ref_log = json.loads((tmp_path / "single" / "train_log.json").read_text())

    # fork: the workers inherit the imported modules (a spawned interpreter would re-import torch & co.)
    mp.start_processes(_clip_worker, args=(2, _free_port(), str(synthetic_flickr), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    log = json.loads((tmp_path / "ck" / "train_log.json").read_text())
    assert log["world_size"] == 2 and len(log["losses"]) == 3
    assert log["losses"] == pytest.approx(ref_log["losses"], abs=1e-4)
    p0 = load_file(str(tmp_path / "params-rank0.safetensors"))
    p1 = load_file(str(tmp_path / "params-rank1.safetensors"))
    ref = dict(ref_models[0].named_parameters())
    assert p0.keys() == p1.keys() == ref.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k  # DDP kept the ranks identical
        torch.testing.assert_close(p0[k], ref[k].detach(), atol=2e-4, rtol=0)
    # training moved the weights (not two untouched initialisations); rank 0 saved them
    assert log["losses"][0] != log["losses"][-1]
    from polymodal.vision_commands import load_clip

    saved, _, _ = load_clip(tmp_path / "ck")
    for k, v in saved.named_parameters():
        assert torch.equal(v.detach(), p0[k]), k
