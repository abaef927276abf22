"""Batched image augmentation for training classifiers from little data (ViTs from scratch).

A ViT lacks the locality prior of a conv net and needs either a lot of data or a lot of
regularisation (Touvron et al., 2021, "Training data-efficient image transformers", DeiT,
sec. 6 and table 8). The recipe here works on uint8 / [0, 1] float tensors, a whole batch at once:

* random crop of the image reflect-padded by ``pad`` pixels (a translation by up to +-pad) and a
  horizontal flip with probability 1/2: the standard CIFAR augmentation (He et al., 2016, sec. 4.2);
* RandAugment-lite (Cubuk et al., 2020): ``n`` ops per image drawn uniformly with replacement at one
  global magnitude, with a random sign;
* Mixup (Zhang et al., 2018, eq. 1: x = lam x_a + (1 - lam) x_b, lam ~ Beta(a, a)) or CutMix (Yun
  et al., 2019, eq. 1: a box of relative area 1 - lam pasted from x_b), one of the two per batch as
  in DeiT, with the batch reversed as the partner; the targets are mixed with the same lam (for
  CutMix lam is the box's exact share after clipping to the image);
* label smoothing (Szegedy et al., 2016, sec. 7): targets (1 - eps) one-hot + eps / K.

**Reproducible and split-free.** Every random number of a global batch is drawn up front into a
:class:`BatchPlan` from one ``numpy.random.Generator`` (seeded by the caller, e.g. from the
micro-batch index, so a resumed run draws the same plan), and applying the plan to any subset of
the batch's rows gives those rows exactly: a rank of a data-parallel run augments only its own
slice (plus the partner rows Mixup / CutMix needs) and still sees the batch one process would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe (``train-vit``'s flags)."""

    crop_pad: int = 4  # 0 = no random crop
    flip: bool = True
    randaugment: int = 1  # ops per image (0 = off)
    ra_magnitude: float = 5.0  # on RandAugment's 0-10 scale
    mix_prob: float = 0.2  # probability that a batch is mixed (Mixup or CutMix, 50/50)
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.crop_pad < 0 or self.randaugment < 0:
            raise ValueError("--crop-pad and --randaugment must be >= 0")
        if not 0 <= self.mix_prob <= 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("--mix-prob must be in [0, 1] and --label-smoothing in [0, 1)")


# ---------------------------------------------------------------------------------------
# RandAugment ops: op(image (3, H, W) in [0, 1], signed strength s in [-1, 1]) -> image. The maxima
# follow RandAugment's table at magnitude 10 (Cubuk et al., 2020, appendix; timm's _LEVEL ranges).
# Translation is left to the random crop; equalize / sharpness are omitted.
# ---------------------------------------------------------------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (what PIL's convert("L") uses), (C=3, H, W) -> (1, H, W)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype).unsqueeze(0)
    grid = F.affine_grid(t, [1, *x.shape], align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def _rotate(x, s):
    a = math.radians(30 * s)
    return _affine(x, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])


def _posterize(x, s):
    q = 2 ** int(round(4 * abs(s)))  # keep 8 - 4|s| of the 8 bits
    return torch.floor(x * 255 / q) * q / 255


def _contrast(x, s):
    m = _gray(x).mean()
    return ((x - m) * (1 + 0.9 * s) + m).clamp(0, 1)


def _color(x, s):
    g = _gray(x)
    return ((x - g) * (1 + 0.9 * s) + g).clamp(0, 1)


def _autocontrast(x, s):
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


RAND_OPS = {
    "identity": lambda x, s: x,
    "autocontrast": _autocontrast,
    "rotate": _rotate,
    "shear_x": lambda x, s: _affine(x, [[1.0, 0.3 * s, 0.0], [0.0, 1.0, 0.0]]),
    "shear_y": lambda x, s: _affine(x, [[1.0, 0.0, 0.0], [0.3 * s, 1.0, 0.0]]),
    "brightness": lambda x, s: (x * (1 + 0.9 * s)).clamp(0, 1),
    "contrast": _contrast,
    "color": _color,
    "solarize": lambda x, s: torch.where(x >= 1 - abs(s), 1 - x, x),  # magnitude 10 inverts everything
    "posterize": _posterize,
}
_OP_NAMES = tuple(RAND_OPS)


# ---------------------------------------------------------------------------------------
# the plan: every random number of one global batch
# ---------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    offsets: np.ndarray  # (B, 2) crop offsets (rows, cols) into the padded image
    flips: np.ndarray  # (B,) bool
    ops: np.ndarray  # (B, n) RandAugment op indices
    signs: np.ndarray  # (B, n) +-1
    mix: str | None = None  # None | "mixup" | "cutmix"
    lam: float = 1.0  # the share of each image's own pixels / target
    box: tuple[int, int, int, int] | None = None  # CutMix (y0, y1, x0, x1)


def draw_plan(cfg: AugmentConfig, batch: int, size: tuple[int, int], rng: np.random.Generator) -> BatchPlan:
    """All random draws of a ``batch``-image batch of ``size`` = (H, W), in a fixed order."""
    pad, n = cfg.crop_pad, cfg.randaugment if cfg.ra_magnitude > 0 else 0
    offsets = rng.integers(0, 2 * pad + 1, size=(batch, 2)) if pad > 0 else np.full((batch, 2), 0)
    flips = rng.random(batch) < 0.5 if cfg.flip else np.zeros(batch, dtype=bool)
    ops = rng.integers(0, len(_OP_NAMES), size=(batch, n))
    signs = np.where(rng.random((batch, n)) < 0.5, 1.0, -1.0)
    plan = BatchPlan(offsets, flips, ops, signs)
    if cfg.mix_prob <= 0 or rng.random() >= cfg.mix_prob or batch < 2:
        return plan
    h, w = size
    if rng.random() < 0.5 and cfg.cutmix_alpha > 0:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        plan.mix, plan.box, plan.lam = "cutmix", (y0, y1, x0, x1), 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        plan.mix = "mixup"
        plan.lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if cfg.mixup_alpha > 0 else 1.0
    return plan


def crop_flip(x: torch.Tensor, offsets: np.ndarray, flips: np.ndarray, pad: int) -> torch.Tensor:
    """(B, C, H, W): the H x W window at ``offsets`` of the reflect-padded image, then the flips."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        off = torch.as_tensor(offsets, dtype=torch.long)
        rows = off[:, 0, None] + torch.arange(h)  # (B, H)
        cols = off[:, 1, None] + torch.arange(w)  # (B, W)
        bi = torch.arange(b)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    m = torch.as_tensor(np.asarray(flips, dtype=bool))
    if m.any():
        x = torch.where(m.view(b, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


def apply_rand_augment(x: torch.Tensor, ops: np.ndarray, signs: np.ndarray, magnitude: float) -> torch.Tensor:
    """Each image i of (B, 3, H, W) through ``RAND_OPS[ops[i, k]]`` at strength signs[i, k] * magnitude / 10."""
    if ops.size == 0 or magnitude <= 0:
        return x
    s = min(magnitude, 10.0) / 10.0
    out = x.clone()
    for i in range(x.shape[0]):
        img = out[i]
        for k, sign in zip(ops[i], signs[i]):
            img = RAND_OPS[_OP_NAMES[int(k)]](img, float(sign) * s)
        out[i] = img
    return out


def mix_rows(x: torch.Tensor, partner: torch.Tensor, t: torch.Tensor, t_partner: torch.Tensor,
             plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup / CutMix of rows with their partners' (already augmented) images and targets."""
    if plan.mix is None:
        return x, t
    if plan.mix == "cutmix":
        y0, y1, x0, x1 = plan.box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    else:
        x = plan.lam * x + (1 - plan.lam) * partner
    return x, plan.lam * t + (1 - plan.lam) * t_partner


def soft_targets(labels: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """(1 - eps) one-hot + eps / K (Szegedy et al., 2016, sec. 7)."""
    t = torch.full((labels.shape[0], n_classes), smoothing / n_classes)
    t[torch.arange(labels.shape[0]), labels] += 1 - smoothing
    return t


def augment_rows(pixels: torch.Tensor, labels: torch.Tensor, rows: Sequence[int], cfg: AugmentConfig,
                 plan: BatchPlan, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of the augmented global batch: ``pixels`` (B, 3, H, W) uint8 and ``labels`` (B,)
    are the whole batch; returns ([0, 1] float images, soft targets) of just those rows. Row i's
    Mixup / CutMix partner is row B - 1 - i (the reversed batch), augmented with its own draws."""
    b = pixels.shape[0]
    rows = list(rows)
    need = rows + ([b - 1 - i for i in rows] if plan.mix else [])
    x = pixels[need].float() * (1 / 255)  # the ImageProcessor's rescale
    x = crop_flip(x, plan.offsets[need], plan.flips[need], cfg.crop_pad)
    x = apply_rand_augment(x, plan.ops[need], plan.signs[need], cfg.ra_magnitude)
    t = soft_targets(labels[need], n_classes, cfg.label_smoothing)
    n = len(rows)
    return mix_rows(x[:n], x[n:], t[:n], t[n:], plan) if plan.mix else (x, t)


# -- one-call forms (a whole batch, a fresh draw) ---------------------------------------------------
def random_crop_flip(x: torch.Tensor, pad: int, rng: np.random.Generator, flip: bool = True) -> torch.Tensor:
    plan = draw_plan(AugmentConfig(crop_pad=pad, flip=flip, randaugment=0, mix_prob=0.0), x.shape[0],
                     x.shape[-2:], rng)
    return crop_flip(x, plan.offsets, plan.flips, pad)


def rand_augment(x: torch.Tensor, n_ops: int, magnitude: float, rng: np.random.Generator) -> torch.Tensor:
    plan = draw_plan(AugmentConfig(crop_pad=0, flip=False, randaugment=n_ops, ra_magnitude=magnitude, mix_prob=0.0),
                     x.shape[0], x.shape[-2:], rng)
    return apply_rand_augment(x, plan.ops, plan.signs, magnitude)


def mix_batch(x: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, mix_prob: float,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = AugmentConfig(crop_pad=0, flip=False, randaugment=0, mix_prob=mix_prob, mixup_alpha=mixup_alpha,
                        cutmix_alpha=cutmix_alpha)
    plan = draw_plan(cfg, x.shape[0], x.shape[-2:], rng)
    return mix_rows(x, x.flip(0), targets, targets.flip(0), plan)
