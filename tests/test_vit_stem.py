"""The convolutional ViT stem (Xiao et al., 2021): token grid, position interpolation,
checkpoints (ViT and CLIP tower), config validation, and learning on real CIFAR images."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polymodal.io import CheckpointError
from polymodal.models.clip import CLIP, CLIPConfig
from polymodal.models.registry import load_model, save_model
from polymodal.models.vit import ConvStem, ViT, ViTConfig

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
SMALL = dict(image_size=32, patch_size=4, n_embd=32, n_layer=1, n_head=4, intermediate_size=64)


def _warm_batchnorm(model: ViT, seed: int = 0) -> ViT:
    """A few train-mode passes so the BatchNorm running statistics are not their init values."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, model.config.image_size, model.config.image_size, generator=g) * 2 + 0.5)
    return model.eval()


def test_defaults_keep_the_patch_stem_layout():
    """Existing configs, checkpoints and HF weight maps see the same tensors as before."""
    m = ViT(ViTConfig(**SMALL))
    keys = set(m.state_dict())
    assert "patch_embed.weight" in keys and not any(k.startswith("stem.") for k in keys)
    assert ViTConfig(**SMALL).stem_layers == []
    conv = ViT(ViTConfig(**SMALL, stem="conv"))
    assert not hasattr(conv, "patch_embed") and any(k.startswith("stem.convs.") for k in conv.state_dict())
    # Xiao et al.'s default: log2(P) stride-2 convs doubling up to n_embd
    assert conv.config.stem_layers == [(16, 2), (32, 2)]
    assert ViTConfig(**SMALL, stem="conv", stem_channels=(8, 16, 24)).stem_layers == [(8, 1), (16, 2), (24, 2)]


@pytest.mark.parametrize("class_token", [True, False])
def test_conv_stem_ends_at_the_patch_grid_in_row_major_order(class_token):
    """Same (B, n_cls + N, D) as the patch stem, on a non-square image too; changing one P x P
    cell of pixels changes that cell's token and, through the overlapping 3x3 convs, only its
    grid neighbours (tokens are in row-major order, and the stem is local)."""
    kw = dict(SMALL, class_token=class_token, pool="cls" if class_token else "mean")
    torch.manual_seed(0)
    patch = ViT(ViTConfig(**kw)).eval()
    conv = _warm_batchnorm(ViT(ViTConfig(**kw, stem="conv", stem_channels=(8, 16, 32))))
    x = torch.randn(2, 3, 32, 64)
    n_cls = int(class_token)
    for m in (patch, conv):
        with torch.no_grad():
            assert m.patchify(x).shape == (2, 8 * 16, 32)
            assert m.hidden_states(x).shape == (2, n_cls + 8 * 16, 32)
            r, c = 5, 11
            y = x.clone()
            y[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
            delta = (m.patchify(y) - m.patchify(x)).abs().sum((0, 2)).reshape(8, 16)
        reach = 0 if m is patch else 1
        assert delta[r, c] > 0
        outside = delta.clone()
        outside[r - reach:r + reach + 1, c - reach:c + reach + 1] = 0
        assert torch.count_nonzero(outside) == 0
    assert patch.embed(x[..., :32]).shape == conv.embed(x[..., :32]).shape


def test_conv_stem_position_interpolation_at_another_resolution():
    """At 48x48 the 8x8 table is resized bicubically to 12x12 (class token row kept)."""
    torch.manual_seed(1)
    m = _warm_batchnorm(ViT(ViTConfig(**SMALL, stem="conv")))
    with torch.no_grad():
        m.pos_embed.normal_()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        z = m.embed(x)
        tokens = m.patchify(x)
    assert z.shape == (2, 1 + 144, 32)
    grid = m.pos_embed[1:].detach().reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(144, 32)
    torch.testing.assert_close(z[:, 1:], tokens + want, atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, 0], (m.cls_token + m.pos_embed[0]).detach().expand(2, -1), atol=1e-6, rtol=0)
    assert m.interpolate_pos_encoding(8, 8) is m.pos_embed
    with pytest.raises(ValueError, match="patch size"):
        m(torch.zeros(1, 3, 30, 32))


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_conv_stem_checkpoint_roundtrip(tmp_path, norm):
    """save_model / load_model keep the stem weights and the BatchNorm running statistics."""
    torch.manual_seed(2)
    cfg = ViTConfig.from_preset("vit-tiny-cifar-conv", n_layer=1, stem_norm=norm, stem_act="gelu")
    m = _warm_batchnorm(ViT(cfg))
    back = load_model(save_model(m, tmp_path / "vit"))
    assert back.config == cfg and back.config.stem_channels == (32, 64, 128)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)
        if norm == "batchnorm":  # the trained statistics, not a fresh BatchNorm's, are in use
            fresh = ViT(cfg).eval()
            fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "running" not in k}, strict=False)
            assert not torch.allclose(fresh(x), m(x))


def test_conv_stem_as_clip_image_tower(tmp_path):
    torch.manual_seed(3)
    vision = {**CLIPConfig.presets["clip-nano"]["vision"], "stem": "conv", "stem_channels": (16, 32, 64)}
    cfg = CLIPConfig.from_preset("clip-nano", vision=vision)
    model = CLIP(cfg)
    assert cfg.vision.stem_layers == [(16, 2), (32, 2), (64, 2)]
    _warm_batchnorm(model.vision)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode_image(x)
        assert feats.shape == (2, cfg.projection_dim)
        # the class-token shortcut of ViT.encode agrees with the full pass through the stem
        torch.testing.assert_close(model.vision.encode(x), model.vision.pool(model.vision.hidden_states(x)),
                                   atol=1e-5, rtol=0)
    back = load_model(save_model(model, tmp_path / "clip"))
    assert back.config.vision.stem == "conv"
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(x), feats, atol=0, rtol=0)


def test_conv_stem_is_refused_by_the_hf_export(tmp_path):
    from polymodal.interop.hf import export_hf

    with pytest.raises((CheckpointError, ValueError), match="patch stem"):
        export_hf(ViT(ViTConfig(**SMALL, stem="conv")), tmp_path / "hf")


@pytest.mark.parametrize("kw, match", [
    (dict(stem="convs"), "stem must be"),
    (dict(stem_channels=(8, 16)), "stem='patch'"),
    (dict(stem="conv", stem_channels=(8, 16), stem_strides=(2, 1)), "product"),
    (dict(stem="conv", stem_channels=(8, 16), stem_strides=(2,)), "one stride per"),
    (dict(stem="conv", stem_channels=(8,)), "at least 2"),
    (dict(stem="conv", stem_norm="layer"), "stem_norm"),
    (dict(stem="conv", stem_act="tanh"), "stem_act"),
    (dict(stem="conv", image_size=36, patch_size=6), "power-of-2"),
])
def test_stem_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**{**SMALL, **kw})


@pytest.mark.skipif(not (CIFAR / "train.tsv").is_file(), reason="needs ../shared/data/cifar10")
def test_conv_preset_loss_falls_on_64_cifar_images():
    from polymodal.data.images import ImageProcessor
    from polymodal.data.image_sets import decode_images, labelled_splits, normalize

    paths, labels = labelled_splits(CIFAR)["train"]
    classes = sorted(set(labels))
    picked = list(range(0, len(labels), len(labels) // 64))[:64]  # evenly over the file: every class
    cfg = ViTConfig.from_preset("vit-tiny-cifar-conv", num_labels=len(classes))
    proc = ImageProcessor.from_config(cfg)
    data = decode_images([paths[i] for i in picked], [labels[i] for i in picked], classes, proc, progress=False)
    x, y = normalize(data.pixels, proc), data.labels
    torch.manual_seed(0)
    model = ViT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # starts near chance, ln 10
    assert losses[-1] < 0.75 * losses[0], losses
    model.eval()  # BatchNorm's running statistics (8 updates old) already serve inference
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.85 * losses[0]
