"""Image preprocessing against Hugging Face's PIL image processors, and load errors.

Tolerance: 1e-5 absolute on normalised pixels. Both sides resize with PIL (same
filter, same output size, same crop offsets), so the only differences are float
rounding in rescale/normalise (measured ~5e-7). Budget: < 15 s.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.images import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageLoadError, ImageProcessor,
                                   load_image)
from polymodal.models.clip import CLIPConfig
from polymodal.models.vit import ViTConfig

TOL = 1e-5


def _hf_processor(kind: str):
    """The PIL-backed processor (transformers >= 5 without torchvision), else the classic one."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    try:
        if kind == "clip":
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as P
        else:
            from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil as P
    except ImportError:
        P = transformers.CLIPImageProcessor if kind == "clip" else transformers.ViTImageProcessor
    return P()


def _images():
    rng = np.random.default_rng(0)
    sizes = ((50, 70), (301, 200), (224, 224))
    out = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]
    rgba = (rng.random((64, 90, 4)) * 255).astype("uint8")
    out.append(Image.fromarray(rgba, "RGBA"))  # transparency composited onto white on both sides
    out.append(Image.fromarray((rng.random((80, 60)) * 255).astype("uint8"), "L"))  # grey -> RGB
    return out


def test_clip_preprocessing_matches_hf():
    ref = _hf_processor("clip")
    ours = ImageProcessor.from_config(CLIPConfig.from_preset("clip-vit-base-patch32"))
    assert (ours.resample, ours.resize_mode, ours.center_crop, ours.image_size) == ("bicubic", "shortest", True, 224)
    for im in _images():
        r = ref(im, return_tensors="pt")["pixel_values"]
        o = ours(im)
        assert o.shape == r.shape == (1, 3, 224, 224)
        assert (o - r).abs().max().item() < TOL, im.size


def test_vit_preprocessing_matches_hf():
    ref = _hf_processor("vit")
    ours = ImageProcessor.from_config(ViTConfig.from_preset("vit-base-patch16-224"))
    assert (ours.resample, ours.resize_mode, ours.mean) == ("bilinear", "square", IMAGENET_STANDARD_MEAN)
    ims = _images()[:3]  # ViTImageProcessor does not convert RGBA/L to RGB (do_convert_rgb unset)
    r = ref(ims, return_tensors="pt")["pixel_values"]
    o = ours(ims)
    assert o.shape == r.shape == (len(ims), 3, 224, 224)
    assert (o - r).abs().max().item() < TOL


def test_from_hf_preprocessor_config(tmp_path):
    ref = _hf_processor("clip")
    ref.save_pretrained(tmp_path)
    ours = ImageProcessor.from_hf(tmp_path)
    im = _images()[1]
    assert (ours(im) - ref(im, return_tensors="pt")["pixel_values"]).abs().max().item() < TOL


def test_reference_formula_by_hand():
    """Independent of transformers: square bilinear resize, then (x/255 - mean) / std."""
    im = _images()[0]
    p = ImageProcessor(image_size=16, resize_mode="square", resample="bilinear", center_crop=False,
                       mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD)
    arr = np.asarray(im.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    expect = torch.from_numpy(((arr - 0.5) / 0.5).transpose(2, 0, 1)).float()
    assert (p(im)[0] - expect).abs().max().item() < TOL


def test_augmentation_is_deterministic_per_generator():
    p = ImageProcessor(image_size=32)
    ims = _images()[:3]
    a = p.train(ims, torch.Generator().manual_seed(1))
    b = p.train(ims, torch.Generator().manual_seed(1))
    c = p.train(ims, torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_full_crop_augmentation_is_resize_or_its_mirror():
    """scale=(1,1), ratio=(1,1) on a square image: the crop is the whole image, so each
    sample is the plain resize or its horizontal flip, and both occur."""
    im = _images()[2]
    p = ImageProcessor(image_size=32, resize_mode="square", center_crop=False, crop_scale=(1.0, 1.0),
                       crop_ratio=(1.0, 1.0))
    plain = p(im)[0]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        x = p.train(im, g)[0]
        if torch.allclose(x, plain, atol=TOL):
            seen.add("plain")
        elif torch.allclose(x, plain.flip(-1), atol=TOL):
            seen.add("flip")
        else:
            pytest.fail("augmented full crop is neither the resize nor its mirror")
    assert seen == {"plain", "flip"}


def _png_bytes(mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype("uint8")).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes("RGBA"))
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (40, 40)


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "text", "missing"])
def test_bad_image_files_name_the_file(tmp_path, kind):
    good = _png_bytes()
    path = tmp_path / f"bad_{kind}.png"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "corrupt":  # valid signature and header, garbage image data
        path.write_bytes(good[:40] + bytes(range(256)) * 8)
    elif kind == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match=path.name) as e:
        load_image(path)
    assert isinstance(e.value, ValueError)
    # the same error surfaces through the processor when given paths
    with pytest.raises(ImageLoadError, match=path.name):
        ImageProcessor(image_size=16)([path])
