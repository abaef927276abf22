"""Image loading and preprocessing tied to the model's config (no torchvision).

A vision transformer sees a fixed-size, normalised tensor (Dosovitskiy et al.,
2021, sec. 3.1: "we reshape the image x in R^{H x W x C} into a sequence of
flattened 2D patches"). The pixels it was trained on went through

    resize -> center crop -> x / 255 -> (x - mean_c) / std_c            (per channel c)

and a model only works on inputs prepared the same way, so the parameters of
that pipeline (size, interpolation, mean/std) live in the model's config
(open_clip ``pretrained.py`` lesson) and ``ImageProcessor.from_config`` reads
them from there, never from a script.

Two resize conventions exist and both are supported:

* ``resize_mode="shortest"`` (CLIP, torchvision ``Resize(int)``): scale so the
  short side equals ``resize_size`` keeping the aspect ratio, then center-crop
  ``image_size`` x ``image_size``;
* ``resize_mode="square"`` (HF ViT): scale straight to ``image_size`` x
  ``image_size`` (aspect ratio not kept), no crop.

Training augmentation is the Inception-style random resized crop (Szegedy et
al., 2015; scale (0.08, 1), ratio (3/4, 4/3)) plus a horizontal flip, drawn
from an explicit ``torch.Generator`` so a resumed run sees the same crops.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# The normalisation constants the two reference model families were trained with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # google/vit-* preprocessor_config.json
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# PIL's integer codes, as Hugging Face preprocessor_config.json stores them ("resample": 3).
_PIL_CODES = {int(v): k for k, v in RESAMPLE.items()}


class ImageLoadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, or not an image)."""


def load_image(path: str | Path) -> Image.Image:
    """Opens ``path`` fully and returns an RGB PIL image.

    Transparency is composited onto white (what Hugging Face's ``convert_to_rgb``
    does), so RGBA and palette-with-alpha images give the same pixels as there.
    Raises ``ImageLoadError`` naming the file for anything PIL cannot decode."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later inside a batch
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such image file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file PIL can identify "
                             "(unsupported format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated / corrupt data
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def load_images(images: Sequence, skip_bad: bool = False) -> tuple[list, list[int]]:
    """Decode a list of paths (PIL images and tensors pass through), returning the images and the
    indices they came from. A file that does not decode raises :class:`ImageLoadError` naming it,
    or, with ``skip_bad``, is left out with a warning (the indices say which ones survived)."""
    import warnings

    out, keep = [], []
    for i, im in enumerate(images):
        try:
            out.append(load_image(im) if isinstance(im, (str, Path)) else im)
            keep.append(i)
        except ImageLoadError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
    return out, keep


def to_rgb(im: Image.Image) -> Image.Image:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the short side = ``size``; the long side is truncated
    like torchvision / Hugging Face ``get_resize_output_image_size`` (int(), not round())."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


@dataclasses.dataclass
class ImageProcessor:
    """PIL image(s) -> normalised float tensor (B, 3, image_size, image_size)."""

    image_size: int = 224
    resize_size: int | None = None  # short side before the crop; None = image_size
    resize_mode: str = "shortest"  # shortest | square
    resample: str = "bicubic"
    center_crop: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    # training augmentation (random resized crop + flip)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "square"):
            raise ValueError(f"resize_mode must be 'shortest' or 'square', got {self.resize_mode!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; choose from {sorted(RESAMPLE)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any) -> "ImageProcessor":
        """From a model config: a ViTConfig, a CLIPConfig (its vision tower) or anything
        with ``image_size`` and optional ``image_mean``/``image_std``/``resample``/``resize_mode``."""
        vc = getattr(config, "vision", None) or config
        if isinstance(vc, dict):
            vc = _Attrs(vc)
        kw = dict(image_size=int(vc.image_size))
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std"), ("resample", "resample"),
                             ("resize_mode", "resize_mode"), ("resize_size", "resize_size"),
                             ("center_crop", "center_crop")):
            v = getattr(vc, theirs, None)
            if v is not None:
                kw[ours] = tuple(v) if isinstance(v, (list, tuple)) else v
        return cls(**kw)

    @classmethod
    def from_hf(cls, path: str | Path) -> "ImageProcessor":
        """From a Hugging Face ``preprocessor_config.json`` (file or folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read preprocessor config ({e})") from None
        size = d.get("size", 224)
        crop = d.get("crop_size")
        if isinstance(size, dict) and "shortest_edge" in size:
            mode, resize = "shortest", int(size["shortest_edge"])
        elif isinstance(size, dict):
            mode, resize = "square", int(size["height"])
        else:
            mode, resize = ("shortest" if crop else "square"), int(size)
        do_crop = bool(d.get("do_center_crop", crop is not None)) and crop is not None
        if do_crop:
            image_size = int(crop["height"] if isinstance(crop, dict) else crop)
        else:
            image_size = resize
        return cls(
            image_size=image_size, resize_size=resize, resize_mode=mode,
            resample=_PIL_CODES.get(int(d.get("resample", 3)), "bicubic"), center_crop=do_crop,
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
        )

    # -- evaluation path --------------------------------------------------------------
    def resize_and_crop(self, im: Image.Image) -> Image.Image:
        im = to_rgb(im) if im.mode != "RGB" else im
        r = RESAMPLE[self.resample]
        if self.resize_mode == "square":
            s = self.resize_size or self.image_size
            im = im.resize((s, s), r)
        else:
            im = im.resize(shortest_edge_size(*im.size, self.resize_size or self.image_size), r)
        if self.center_crop:
            w, h = im.size
            c = self.image_size
            if w < c or h < c:  # pad like torchvision's CenterCrop would be needed; refuse instead
                raise ValueError(f"image of {w}x{h} after resize is smaller than the {c}x{c} crop")
            top, left = (h - c) // 2, (w - c) // 2  # same offsets as HF center_crop
            im = im.crop((left, top, left + c, top + c))
        return im

    def to_tensor(self, im: Image.Image) -> torch.Tensor:
        """uint8 HWC -> normalised float32 CHW."""
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        x = x * self.rescale_factor
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Image.Image | str | Path | Iterable[Image.Image | str | Path]) -> torch.Tensor:
        """One image or a list (PIL images or file paths) -> (B, 3, S, S) float32."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        out = [self.to_tensor(self.resize_and_crop(_as_image(im))) for im in images]
        return torch.stack(out)

    # -- training augmentation -----------------------------------------------------
    def random_resized_crop_box(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(left, top, w, h) of an Inception-style crop: area fraction ~ U(scale), log aspect
        ratio ~ U(log ratio); 10 tries, then the central crop clamped to the ratio range."""
        area = width * height
        log_r = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            u = torch.rand(4, generator=generator).tolist()
            target = area * (self.crop_scale[0] + u[0] * (self.crop_scale[1] - self.crop_scale[0]))
            ratio = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left = min(int(u[2] * (width - w + 1)), width - w)
                top = min(int(u[3] * (height - h + 1)), height - h)
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            h, w = height, int(round(height * self.crop_ratio[1]))
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def augment(self, im: Image.Image, generator: torch.Generator) -> Image.Image:
        im = to_rgb(im) if im.mode != "RGB" else im
        left, top, w, h = self.random_resized_crop_box(*im.size, generator)
        s = self.image_size
        im = im.resize((s, s), RESAMPLE[self.resample], box=(left, top, left + w, top + h))
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im

    def train(self, images: Image.Image | Sequence[Image.Image | str | Path],
              generator: torch.Generator) -> torch.Tensor:
        """Augmented batch (B, 3, S, S); the same generator state gives the same batch."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        return torch.stack([self.to_tensor(self.augment(_as_image(im), generator)) for im in images])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Attrs:
    def __init__(self, d):
        self.__dict__.update(d)


def _as_image(x) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, (str, Path)):
        return load_image(x)
    raise TypeError(f"expected a PIL image or a file path, got {type(x).__name__}")
