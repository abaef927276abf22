"""EfficientNet-Lite: parity with timm on random weights, folded BatchNorm == unfolded, feature-map
strides, the .pth weight map (both ways), the efficientnet-lite* aliases, ImageNet predictions of
the real weights on Flickr8k dogs and upsampled CIFAR-10, and ``polymodal classify``."""
from __future__ import annotations

import collections
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from polymodal.models.efficientnet import EfficientNet, EfficientNetConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


# ------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def timm_eff():
    """timm's ``timm.models.efficientnet`` (the reference), or skip.

    timm's package ``__init__`` imports torchvision, which a CPU-only torch cannot use from PyPI (its
    wheels link the CUDA torch; installing one would replace torch). The EfficientNet model code needs
    only timm.layers, timm.models and the constants of timm.data, so without a working torchvision
    those packages are entered without running their ``__init__`` (the modules that build the model
    are imported and run unchanged), and torchvision's ``FrozenBatchNorm2d`` (used only to freeze a
    model, never here) is a stand-in that refuses to be built. Everything added to ``sys.modules``
    is removed again after this file's tests, so no other test sees the stand-ins."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (make setup-test: pip install --no-deps timm)")
    try:
        import timm.models.efficientnet as eff
        yield eff
        return
    except (ImportError, RuntimeError) as e:  # no torchvision, or one whose compiled ops miss this torch
        if "torchvision" not in str(e) and "nms" not in str(e):
            raise
    for k in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[k]
    root = Path(importlib.util.find_spec("timm").origin).parent

    def bare(name: str, path: Path | None) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        m.__path__ = m.__spec__.submodule_search_locations = [str(path)] if path is not None else []
        sys.modules[name] = m
        return m

    bare("timm", root).__version__ = importlib.metadata.version("timm")
    data = bare("timm.data", root / "data")
    bare("timm.models", root / "models")
    bare("torchvision", None), bare("torchvision.ops", None)
    misc = types.ModuleType("torchvision.ops.misc")

    class FrozenBatchNorm2d(torch.nn.Module):
        def __init__(self, *a, **k):
            raise NotImplementedError("torchvision stand-in")

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    sys.modules["torchvision.ops.misc"] = misc
    try:
        constants = importlib.import_module("timm.data.constants")
        data.__dict__.update({k: v for k, v in vars(constants).items() if k.isupper()})
        yield importlib.import_module("timm.models.efficientnet")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
            del sys.modules[k]


def to_timm(model: EfficientNet) -> dict[str, torch.Tensor]:
    """Our state dict in timm's names: blocks are grouped by stage there (``blocks.S.I``), a block
    without expansion is a DepthwiseSeparableConv (conv_dw/bn1, conv_pw/bn2) and an inverted residual
    has conv_pw/bn1 (expand), conv_dw/bn2, conv_pwl/bn3 (project)."""
    stage, pos, seen = {}, {}, collections.Counter()
    for i, (s, *_) in enumerate(model.config.block_specs()):
        stage[i], pos[i] = s, seen[s]
        seen[s] += 1
    ds = {"dw": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")}
    ir = {"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn2"), "project": ("conv_pwl", "bn3")}
    out = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0] in ("stem", "head"):
            conv, bn = ("conv_stem", "bn1") if p[0] == "stem" else ("conv_head", "bn2")
            out[f"{conv if p[1] == 'conv' else bn}.{p[-1]}"] = v
        elif p[0] == "classifier":
            out[k] = v
        else:
            i = int(p[1])
            names = (ds if model.blocks[i].expand is None else ir)[p[2]]
            out[f"blocks.{stage[i]}.{pos[i]}.{names[p[3] == 'bn']}.{p[-1]}"] = v
    return out


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def random_model(preset: str = "efficientnet-lite0", seed: int = 0, **kw) -> EfficientNet:
    torch.manual_seed(seed)
    return randomize_bn(EfficientNet(EfficientNetConfig.from_preset(preset, **kw)), seed).eval()


def timm_stages(ref, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's stage outputs at strides 8, 16, 32 (stages 2, 4 and 6)."""
    x, out = ref.bn1(ref.conv_stem(x)), []
    for i, stage in enumerate(ref.blocks):
        x = stage(x)
        if i in (2, 4, 6):
            out.append(x)
    return out


def _pth_or_skip(alias: str) -> Path:
    from polymodal.interop.efficientnet import package_pth

    try:
        return package_pth(alias)
    except FileNotFoundError as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_parity_with_timm_efficientnet_lite0(timm_eff, fold):
    """Random weights: our Lite0 (symmetric k // 2 padding, BN eps 1e-5: timm's efficientnet_lite0)
    gives timm's logits to 1e-4 and its stride-8/16/32 feature maps to 1e-4 of their largest value (up to
    ~60 with random weights; the unfolded path is bit-exact, folding rounds differently), folded (the
    eval fast path) and not."""
    ours = random_model(padding="symmetric", bn_eps=1e-5).fold_bn(fold)
    ref = timm_eff.efficientnet_lite0().eval()
    ref.load_state_dict(to_timm(ours))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
        for a, b in zip(ours.features(x), timm_stages(ref, x)):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("preset,size", [("efficientnet-lite0", (225, 193)), ("efficientnet-lite1", (240, 240)),
                                         ("efficientnet-lite2", (260, 260))])
def test_parity_with_timm_tf_lite_same_padding(timm_eff, preset, size):
    """Our defaults (TF SAME padding, eps 1e-3, the layout of the TF-trained weights) equal timm's
    tf_efficientnet_lite0/1/2 on random weights, odd sizes included (asymmetric SAME padding), and
    Lite1/2's compound scaling gives the same block counts and widths."""
    ours = random_model(preset)
    ref = getattr(timm_eff, "tf_" + preset.replace("-", "_"))().eval()
    ref.load_state_dict(to_timm(ours))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ folding and layout
def test_folded_equals_unfolded_and_tracks_weight_changes():
    m = random_model()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        folded = m(x)
        ref = m.fold_bn(False)(x)
        torch.testing.assert_close(folded, ref, atol=1e-5, rtol=1e-5)
        m.fold_bn(True)
        m.blocks[3].dw.bn.running_var.mul_(2.0)  # in place: the folded cache must notice
        m.stem.conv.weight.mul_(0.5)
        torch.testing.assert_close(m(x), m.fold_bn(False)(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(m(x), ref, atol=1e-3)


def test_folded_path_keeps_gradients_in_eval_mode():
    """A tower fine-tuned with frozen BatchNorm statistics (eval mode) gets the gradients of the
    unfolded path. In float64: in float32 the two paths round differently and a few ReLU6 masks flip."""
    m = random_model().double()
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    grads = []
    for fold in (True, False):
        m.zero_grad()
        m.fold_bn(fold)(x).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-9, rtol=1e-7, msg=n)


def test_feature_maps_at_strides_8_16_32_channels_last():
    m = random_model(num_labels=0)
    for h, w in ((224, 224), (256, 320)):
        feats = m.features(torch.randn(1, 3, h, w))
        assert m.feature_strides == (8, 16, 32) and m.feature_channels == (40, 112, 320)
        for f, s, ch in zip(feats, m.feature_strides, m.feature_channels):
            assert f.shape == (1, ch, h // s, w // s)
            assert f.is_contiguous(memory_format=torch.channels_last)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1280)  # no head: pooled features
    assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


def test_config_preprocessing_and_checkpoint_round_trip(tmp_path):
    from polymodal.data.images import ImageProcessor
    from polymodal.models.registry import load_model, save_model

    m = random_model("efficientnet-lite1")
    proc = ImageProcessor.from_config(m.config)
    assert (proc.image_size, proc.resize_size, proc.resample, proc.resize_mode, proc.center_crop) == \
        (240, 272, "bicubic", "shortest", True)
    assert proc.mean == pytest.approx((127 / 255,) * 3) and proc.std == pytest.approx((128 / 255,) * 3)
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config == m.config  # stages come back from JSON lists as tuples
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_no_weight_decay_lists_depthwise_filters_and_batchnorm():
    from polymodal.train.optim import param_groups

    model = EfficientNet(EfficientNetConfig.from_preset("efficientnet-lite0"))
    names = dict(model.named_parameters())
    listed = model.no_weight_decay()
    assert listed <= set(names) and "blocks.1.dw.conv.weight" in listed and "blocks.1.expand.conv.weight" not in listed
    groups = param_groups(model, 0.05)
    decayed = set(groups[0]["names"])
    assert "blocks.1.expand.conv.weight" in decayed and "classifier.weight" in decayed
    assert not decayed & listed


# ------------------------------------------------------------------------------ weight files
def test_pth_weight_map_runs_both_ways():
    from polymodal.interop.efficientnet import config_from_state_dict, read_pth, weight_map

    sd = read_pth(_pth_or_skip("efficientnet-lite0"))
    assert len(sd) == 296 and sd["_fc.weight"].shape == (1000, 1280)
    cfg = config_from_state_dict(sd)
    wm = weight_map(cfg)
    ours = wm.to_ours(sd)
    assert set(ours) == set(EfficientNet(cfg).state_dict())
    back = wm.to_hf(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_bad_weight_files_name_the_file(tmp_path):
    from polymodal.interop.efficientnet import load_pth
    from polymodal.io import CheckpointError

    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a zip or a pickle")
    with pytest.raises(CheckpointError, match="broken.pth: not a readable PyTorch state dict"):
        load_pth(bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="other.pth: not an EfficientNet-Lite"):
        load_pth(other)


def test_real_weights_equal_timm_tf_lite0_with_the_same_weights(timm_eff):
    """The installed Lite0 weights in our model and in timm's tf_efficientnet_lite0 give one answer."""
    from polymodal.interop.efficientnet import load_pth

    ours = load_pth(_pth_or_skip("efficientnet-lite0"))
    ref = timm_eff.tf_efficientnet_lite0().eval()
    ref.load_state_dict(to_timm(ours))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_alias_converts_once_into_the_cache(tmp_path, monkeypatch):
    import polymodal
    from polymodal.interop import resolve_model_path

    _pth_or_skip("efficientnet-lite0")
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    folder = resolve_model_path("efficientnet-lite0")
    assert folder == tmp_path / "efficientnet" / "efficientnet-lite0" and (folder / "source.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    model = polymodal.load("efficientnet_lite0").model  # synonym; the cached folder is reused
    assert isinstance(model, EfficientNet) and model.config.name == "efficientnet-lite0"
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------- real predictions
def _flickr_dogs() -> list[Path]:
    root = DATA / "flickr8k"
    if not (root / "val.txt").is_file():
        pytest.skip(f"{root} is absent")
    caps = collections.defaultdict(list)
    for line in (root / "captions.txt").read_text(encoding="utf-8").splitlines():
        key, text = line.split("\t", 1)
        caps[key.split("#")[0]].append(text)
    val = (root / "val.txt").read_text().split()
    return [root / "images" / v for v in val if all(re.search(r"\bdogs?\b", c, re.I) for c in caps[v])]


@pytest.mark.slow
@pytest.mark.parametrize("alias", LITES)
def test_flickr8k_dog_photos_get_a_dog_breed_in_the_top5(alias):
    """Every Flickr8k val photo whose five captions all mention a dog (15 photos) has an ImageNet dog
    breed (ids 151-268) among its top-5 classes."""
    from polymodal.inference.classify import classify_images
    from polymodal.interop.efficientnet import load_pth

    model = load_pth(_pth_or_skip(alias))
    dogs = _flickr_dogs()
    assert len(dogs) >= 10
    for r in classify_images(model, dogs, top_k=5):
        assert any(151 <= t["index"] <= 268 for t in r["top_k"]), r


# ImageNet classes that are a sensible label for each CIFAR-10 class (ImageNet has no deer: the
# nearest are the other hoofed animals, sorrel ... llama).
CIFAR_SETS = {
    "airplane": {404, 405, 812, 895, 908},  # airliner, airship, space shuttle, warplane, wing
    "automobile": {407, 436, 468, 479, 511, 573, 575, 581, 609, 627, 656, 661, 675, 717, 734, 751, 817},
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
    "cat": set(range(281, 288)),  # tabby ... Egyptian cat, cougar, lynx
    "deer": set(range(339, 356)),
    "dog": set(range(151, 281)),  # breeds, wolves, foxes
    "frog": set(range(25, 33)),  # salamanders, newts, frogs
    "horse": {339, 340, 603},  # sorrel, zebra, horse cart
    "ship": {403, 472, 484, 510, 554, 576, 625, 628, 693, 694, 724, 780, 814, 833, 871, 913, 914},
    "truck": {555, 569, 656, 675, 717, 734, 864, 866, 867},
}


@pytest.mark.slow
def test_cifar10_upsampled_images_get_sensible_labels():
    """The 100 CIFAR-10 val images (10 per class; 32 x 32, upsampled by the model's own preprocessing
    to 256 and cropped to 224) through the real Lite0. For every class c:

    * the images of c put at least 1.5x more probability on c's ImageNet classes (CIFAR_SETS) than
      the other classes' images do on average (measured: 1.7x for cat ... 23x for airplane), and
    * at least one image of c has one of c's ImageNet classes in its top 5 (measured: 1-6 of 10).

    Tiny upsampled images are far from ImageNet photos, so this checks sensible, not accurate."""
    from polymodal.data.images import ImageProcessor
    from polymodal.interop.efficientnet import load_pth

    model = load_pth(_pth_or_skip("efficientnet-lite0"))
    tsv = DATA / "cifar10" / "val.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} is absent")
    rows = [line.split("\t") for line in tsv.read_text().splitlines() if line.strip()]
    classes = list(CIFAR_SETS)
    x = ImageProcessor.from_config(model.config)([DATA / "cifar10" / f for f, _ in rows])
    with torch.inference_mode():
        probs = torch.cat([model(x[i:i + 25]) for i in range(0, len(x), 25)]).softmax(-1)
    sets = torch.zeros(1000, len(classes))
    for j, c in enumerate(classes):
        sets[sorted(CIFAR_SETS[c]), j] = 1.0
    mass = probs @ sets  # (images, class sets)
    y = torch.tensor([classes.index(c) for _, c in rows])
    top5 = probs.topk(5).indices
    for j, c in enumerate(classes):
        own, others = mass[y == j, j].mean(), mass[y != j, j].mean()
        assert own >= 1.5 * others, f"{c}: {own:.4f} vs {others:.4f} on the other classes' images"
        hits = [bool(set(t.tolist()) & CIFAR_SETS[c]) for t in top5[y == j]]
        assert any(hits), f"{c}: no image has a sensible label in its top 5"


# --------------------------------------------------------------------------------- classify
def test_classify_json_output_shape(tmp_path, capsys):
    from PIL import Image

    from polymodal.cli import main
    from polymodal.models.registry import save_model

    save_model(random_model(), tmp_path / "lite0")
    files = []
    for i, color in enumerate(("red", "blue")):
        files.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (300, 200), color).save(files[-1])
    assert main(["classify", "--model", str(tmp_path / "lite0"), "--image", str(files[0]), "--image",
                 str(files[1]), "--top-k", "3", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    from polymodal.data.imagenet import imagenet_labels

    labels = imagenet_labels()
    for line, f in zip(lines, files):
        r = json.loads(line)
        assert set(r) == {"file", "top_k"} and r["file"] == str(f) and len(r["top_k"]) == 3
        assert all(set(t) == {"index", "label", "score"} and t["label"] == labels[t["index"]] for t in r["top_k"])
        scores = [t["score"] for t in r["top_k"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_classify_bad_image_is_a_one_line_error(tmp_path, capsys):
    from polymodal.cli import main
    from polymodal.models.registry import save_model

    save_model(random_model(), tmp_path / "lite0")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["classify", "--model", str(tmp_path / "lite0"), "--image", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}" in err and err.startswith("polymodal classify: error:")
    assert main(["classify", "--model", str(tmp_path / "lite0"), "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such image file" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path / "lite0"), "--image", str(bad), "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_imagenet_class_names_ship_with_the_package():
    from polymodal.data.imagenet import DOG_BREEDS, imagenet_classes, imagenet_labels

    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[999] == "toilet tissue"
    assert labels[DOG_BREEDS[0]] == "Chihuahua" and labels[DOG_BREEDS[-1]] == "Mexican hairless"
    synsets = [s for s, _ in imagenet_classes()]
    assert synsets == sorted(synsets) and len(set(synsets)) == 1000
