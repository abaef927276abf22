"""Image classification commands: ``train-vit``, ``linear-probe`` and ``eval --task image-classification``.

``train-vit`` trains a Vision Transformer (Dosovitskiy et al., 2021) from scratch on a small
labelled image set (our CIFAR-10 folder with ``train.tsv``/``val.tsv``, or any folder of class
sub-folders). ViTs lack the locality prior of a conv net and need either a lot of data or a
lot of regularisation (Touvron et al., 2021, "Training data-efficient image transformers",
DeiT, sec. 6 and table 8); with 1,000 images the recipe leans on the second:

* every image is decoded once into one uint8 tensor (N, 3, S, S) and augmented on the fly
  with batched tensor ops (no PIL per step): random crop from a reflect-padded image and a
  horizontal flip (the standard CIFAR augmentation, He et al., 2016, sec. 4.2), plus a small
  RandAugment (Cubuk et al., 2020: ``n`` random ops per image at one global magnitude);
* Mixup (Zhang et al., 2018: x = lam x_a + (1 - lam) x_b, lam ~ Beta(a, a)) or CutMix (Yun
  et al., 2019: a box of relative area 1 - lam pasted from x_b), one of the two per batch as
  in DeiT, and label smoothing (Szegedy et al., 2016, sec. 7): the targets are the mixed,
  smoothed class distributions and the loss is their cross-entropy with the softmax;
* AdamW (Loshchilov & Hutter, 2019) with linear warm-up then a cosine decay to 0 over the
  step budget or the time budget, whichever runs out first;
* the val set is scored every ``eval_every`` epochs (optionally averaging the logits of the
  image and its mirror image, "flip TTA"), and the best checkpoint so far is written
  atomically to ``<out>/model`` (``registry.save_model``). With our 100-image val split that selection is
  made on the numbers it reports; ``metrics.json`` therefore also gives the last epoch's.

``linear-probe`` measures a frozen image tower the way CLIP does (Radford et al., 2021,
sec. 3.2 / appendix A.3): its pooled features (before the projection into the joint space
for a CLIP checkpoint; before the classification head for a ViT) feed an L2-regularised
multinomial logistic regression (scikit-learn, L-BFGS), whose inverse regularisation
strength C is chosen on a held-out part of the training split and then refit on all of it.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import ImageProcessor


# ---------------------------------------------------------------------------------------
# data: labelled image folders, decoded once into a uint8 tensor
# ---------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Decoded images (N, 3, S, S) uint8, class indices (N,), the class names and source files."""

    pixels: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)


def labelled_splits(data: str | Path, val_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, tuple[list[Path], list[str]]]:
    """{"train": (paths, labels), "val": (paths, labels)} of a labelled image dataset.

    Understood layouts, tried in this order:
    * a folder with ``train.tsv`` and ``val.tsv`` (``relative/path<TAB>class``; our CIFAR-10);
    * a folder with ``train/`` and ``val/`` sub-folders, each holding one folder per class;
    * one folder of class sub-folders: ``val_fraction`` of each class (a seeded, per-class
      shuffle, so every class is represented) becomes the val split.
    """
    from .data.captions import load_labeled_images

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if (root / "train.tsv").is_file():
        if not (root / "val.tsv").is_file():
            raise FileNotFoundError(f"{root}: has train.tsv but no val.tsv")
        return {s: load_labeled_images(root, s) for s in ("train", "val")}
    if (root / "train").is_dir() and (root / "val").is_dir():
        out = {}
        for s in ("train", "val"):
            paths, labels = load_labeled_images(root / s)
            if labels is None:
                raise ValueError(f"{root / s}: expected one sub-folder per class")
            out[s] = (paths, labels)
        return out
    paths, labels = load_labeled_images(root)
    if labels is None:
        raise ValueError(f"{root}: expected train.tsv/val.tsv, train/ and val/, or one sub-folder per class")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_class: dict[str, list[Path]] = {}
    for p, lab in zip(paths, labels):
        by_class.setdefault(lab, []).append(p)
    rng = random.Random(seed)
    split: dict[str, tuple[list[Path], list[str]]] = {"train": ([], []), "val": ([], [])}
    for lab in sorted(by_class):
        files = sorted(by_class[lab])
        rng.shuffle(files)
        n_val = max(1, round(val_fraction * len(files))) if len(files) > 1 else 0
        for i, p in enumerate(files):
            s = "val" if i < n_val else "train"
            split[s][0].append(p)
            split[s][1].append(lab)
    return split


def decode_images(paths: Sequence[Path], labels: Sequence[str], classes: Sequence[str], processor: ImageProcessor,
                  skip_bad: bool = False, desc: str = "decode", progress: bool = True) -> ImageSet:
    """Loads every file once (resize / crop of the model's eval preprocessing, no normalisation)
    into one uint8 tensor: the whole of a small dataset fits in memory, and augmenting a tensor
    batch is much cheaper than re-decoding JPEGs every step."""
    from tqdm import tqdm

    from .data.images import ImageLoadError, load_image

    index = {c: i for i, c in enumerate(classes)}
    arrays, ys, kept = [], [], []
    for p, lab in tqdm(list(zip(paths, labels)), desc=desc, disable=not progress, leave=False):
        if lab not in index:
            raise ValueError(f"{p}: class {lab!r} does not occur in the training split {list(classes)}")
        try:
            im = processor.resize_and_crop(load_image(p))
        except ImageLoadError as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        arrays.append(np.asarray(im, dtype=np.uint8))
        ys.append(index[lab])
        kept.append(Path(p))
    if not arrays:
        raise ValueError(f"no usable images for {desc}")
    px = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(px, torch.tensor(ys, dtype=torch.long), list(classes), kept)


def normalize(pixels: torch.Tensor, processor: ImageProcessor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, 3, S, S) -> the model's normalised input."""
    x = pixels.float() * processor.rescale_factor if pixels.dtype == torch.uint8 else pixels
    mean = torch.tensor(processor.mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.std).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------
# batched augmentation on [0, 1] float tensors
# ---------------------------------------------------------------------------------------
def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random S x S crop of the image reflect-padded by ``pad`` pixels (a translation by up
    to +-pad), then a horizontal flip with probability 1/2. x: (B, C, S, S)."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
        rows = off[:, 0, None] + torch.arange(h)  # (B, H)
        cols = off[:, 1, None] + torch.arange(w)  # (B, W)
        bi = torch.arange(b)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m.view(b, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (what PIL's convert("L") uses), (C=3, H, W) -> (1, H, W)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(theta, dtype=x.dtype).unsqueeze(0)
    grid = F.affine_grid(t, [1, *x.shape], align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


# op(image (3, H, W) in [0, 1], signed strength s in [-1, 1]) -> image. The maxima follow
# RandAugment's table at magnitude 10 (Cubuk et al., 2020, appendix; timm's _LEVEL ranges).
def _op_rotate(x, s):
    a = math.radians(30 * s)
    return _affine(x, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])


def _op_shear_x(x, s):
    return _affine(x, [[1.0, 0.3 * s, 0.0], [0.0, 1.0, 0.0]])


def _op_shear_y(x, s):
    return _affine(x, [[1.0, 0.0, 0.0], [0.3 * s, 1.0, 0.0]])


def _op_brightness(x, s):
    return (x * (1 + 0.9 * s)).clamp(0, 1)


def _op_contrast(x, s):
    m = _gray(x).mean()
    return ((x - m) * (1 + 0.9 * s) + m).clamp(0, 1)


def _op_color(x, s):
    g = _gray(x)
    return ((x - g) * (1 + 0.9 * s) + g).clamp(0, 1)


def _op_solarize(x, s):
    thr = 1 - abs(s)  # magnitude 10 inverts everything above 0
    return torch.where(x >= thr, 1 - x, x)


def _op_posterize(x, s):
    bits = 8 - int(round(4 * abs(s)))
    q = 2 ** (8 - bits)
    return torch.floor(x * 255 / q) * q / 255


def _op_autocontrast(x, s):
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _op_identity(x, s):
    return x


RAND_OPS = {"identity": _op_identity, "autocontrast": _op_autocontrast, "rotate": _op_rotate,
            "shear_x": _op_shear_x, "shear_y": _op_shear_y, "brightness": _op_brightness,
            "contrast": _op_contrast, "color": _op_color, "solarize": _op_solarize, "posterize": _op_posterize}


def rand_augment(x: torch.Tensor, n_ops: int, magnitude: float, rng: np.random.Generator) -> torch.Tensor:
    """RandAugment-lite on a [0, 1] batch (B, 3, H, W): per image, ``n_ops`` ops drawn
    uniformly (with replacement) from ``RAND_OPS`` at strength magnitude / 10 with a random
    sign. Translation is left to ``random_crop_flip``; equalize / sharpness are omitted."""
    if n_ops <= 0 or magnitude <= 0:
        return x
    names = list(RAND_OPS)
    out = x.clone()
    s = min(magnitude, 10.0) / 10.0
    for i in range(x.shape[0]):
        img = out[i]
        for k in rng.integers(0, len(names), size=n_ops):
            img = RAND_OPS[names[k]](img, s if rng.random() < 0.5 else -s)
        out[i] = img
    return out


def mix_batch(x: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, mix_prob: float,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``mix_prob``: Mixup or CutMix (coin flip, as in DeiT) with the batch
    reversed as partner. targets: (B, K) class distributions, mixed with the same lam (for
    CutMix lam is the box's exact area share after clipping to the image)."""
    if mix_prob <= 0 or rng.random() >= mix_prob or x.shape[0] < 2:
        return x, targets
    perm = torch.arange(x.shape[0] - 1, -1, -1)
    if rng.random() < 0.5 and cutmix_alpha > 0:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha)) if mixup_alpha > 0 else 1.0
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]


def soft_targets(labels: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """(1 - eps) one-hot + eps / K (Szegedy et al., 2016, sec. 7)."""
    t = torch.full((labels.shape[0], n_classes), smoothing / n_classes)
    t[torch.arange(labels.shape[0]), labels] += 1 - smoothing
    return t


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def classify(model, images: ImageSet, processor: ImageProcessor, batch_size: int = 256,
             flip_tta: bool = False) -> torch.Tensor:
    """Logits (N, K) of a classifier ViT on decoded images; ``flip_tta`` averages them with the
    logits of the mirrored images."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = normalize(images.pixels[s:s + batch_size], processor)
        logits = model(x).float()
        if flip_tta:
            logits = 0.5 * (logits + model(x.flip(-1)).float())
        out.append(logits)
    model.train(was)
    return torch.cat(out)


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def _plot(history: list[dict], path: Path) -> None:
    """Train loss and val accuracy against the epoch (Agg backend, atomic replace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ep = [r["epoch"] for r in history]
    ax.plot(ep, [r["train_loss"] for r in history], label="train loss (augmented)", lw=1)
    ax.plot(ep, [r["val_loss"] for r in history], label="val loss", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(ep, [100 * r["val_accuracy"] for r in history], "o-", color="tab:green", ms=3, lw=1.2,
             label="val accuracy")
    ax2.set_ylabel("val accuracy (%)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# train-vit
# ---------------------------------------------------------------------------------------
def train_vit(data: str = "../shared/data/cifar10", out: str = "runs/vit", preset: str = "vit-tiny-cifar-conv",
              n_embd: int | None = None, n_layer: int | None = None, n_head: int | None = None,
              intermediate_size: int | None = None, patch_size: int | None = None,
              pool: Literal["cls", "mean"] | None = None, dropout: float | None = None,
              epochs: int = 300, minutes: float = 0.0, batch_size: int = 64, lr: float = 1e-3,
              weight_decay: float = 0.05, warmup_epochs: float = 5.0, label_smoothing: float = 0.1,
              crop_pad: int = 4, randaugment: int = 1, ra_magnitude: float = 5.0, mix_prob: float = 0.2,
              mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, flip_tta: bool = True,
              eval_every: int = 5, val_fraction: float = 0.1, skip_bad_images: bool = False, seed: int = 0,
              threads: int = 0, progress: bool = True) -> dict:
    """Train a ViT classifier from scratch on a labelled image folder (CIFAR-10 format or class sub-folders).

    Args:
        data: a folder with train.tsv/val.tsv (../shared/data/cifar10), with train/ and val/ class folders, or of class sub-folders.
        out: run folder: model/ (the best checkpoint so far), metrics.jsonl (one line per evaluation), metrics.json, curve.png.
        preset: ViT preset (vit-tiny-cifar, vit-nano-cifar, ...); the flags below override its fields.
        n_embd: width.
        n_layer: number of transformer blocks.
        n_head: attention heads.
        intermediate_size: MLP hidden size.
        patch_size: patch side in pixels.
        pool: cls (class token) or mean (average of the patch tokens).
        dropout: dropout rate.
        epochs: passes over the training set (the cosine schedule's length when --minutes does not end it first).
        minutes: time budget (0 = none); the learning rate reaches 0 when it is spent.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay on weight matrices (not on norms, biases, position embeddings, class token).
        warmup_epochs: linear warm-up length.
        label_smoothing: probability mass spread over all classes.
        crop_pad: random-crop padding in pixels (0 = no crop).
        randaugment: RandAugment ops per image (0 = off).
        ra_magnitude: RandAugment magnitude on the 0-10 scale.
        mix_prob: probability that a batch is mixed (Mixup or CutMix, 50/50).
        mixup_alpha: Beta(a, a) of Mixup.
        cutmix_alpha: Beta(a, a) of CutMix.
        flip_tta: score val images as the mean logits of the image and its mirror.
        eval_every: epochs between val evaluations (and best-checkpoint saves).
        val_fraction: share of each class held out when the folder has no val split.
        skip_bad_images: warn and skip unreadable images instead of stopping.
        seed: initialisation, batch order and augmentation seed.
        threads: torch CPU threads (0 = torch's default).
    """
    from tqdm import tqdm

    from .models.registry import save_model
    from .models.vit import ViT, ViTConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    splits = labelled_splits(data, val_fraction, seed)
    classes = sorted(set(splits["train"][1]))
    if len(classes) < 2:
        raise ValueError(f"{data}: classification needs at least 2 classes in the training split, found {classes}")
    overrides = {k: v for k, v in dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                       intermediate_size=intermediate_size, patch_size=patch_size, pool=pool,
                                       dropout=dropout).items() if v is not None}
    if overrides.get("pool") == "mean":
        overrides.setdefault("class_token", False)
    config = ViTConfig.from_preset(preset, **overrides, num_labels=len(classes),
                                   id2label={str(i): c for i, c in enumerate(classes)})
    proc = ImageProcessor.from_config(config)
    train_set = decode_images(*splits["train"], classes, proc, skip_bad_images, "decode train", progress)
    val_set = decode_images(*splits["val"], classes, proc, skip_bad_images, "decode val", progress)
    model = ViT(config)
    batch_size = min(batch_size, len(train_set))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name not in ("pos_embed",) else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = len(train_set) // batch_size  # drop the last partial batch: Mixup needs full batches
    total = max(1, epochs * steps_per_epoch)
    warm = int(round(warmup_epochs * steps_per_epoch))
    start = time.perf_counter()

    def progress_frac(step: int) -> float:
        frac = (step - warm) / max(1, total - warm)
        if minutes:  # whichever runs out first, steps or time, ends the cosine at 0
            frac = max(frac, (time.perf_counter() - start) / (60 * minutes))
        return min(1.0, frac)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return 0.5 * lr * (1 + math.cos(math.pi * progress_frac(step)))

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    log_path.write_text("")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    best: dict = {"val_accuracy": -1.0, "val_loss": math.inf}
    model.train()
    step, epoch, seen, run_loss, run_n = 0, 0, 0, 0.0, 0
    bar = tqdm(total=total, disable=not progress, desc="train-vit", dynamic_ncols=True)
    stop = False
    while not stop:
        perm = torch.randperm(len(train_set), generator=gen)
        for s in range(0, steps_per_epoch * batch_size, batch_size):
            idx = perm[s:s + batch_size]
            x = train_set.pixels[idx].float() * proc.rescale_factor
            x = random_crop_flip(x, crop_pad, gen)
            x = rand_augment(x, randaugment, ra_magnitude, rng)
            t = soft_targets(train_set.labels[idx], len(classes), label_smoothing)
            x, t = mix_batch(x, t, rng, mix_prob, mixup_alpha, cutmix_alpha)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = torch.sum(-t * F.log_softmax(model(normalize(x, proc)).float(), dim=-1), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += len(idx)
            run_loss += loss.item()
            run_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
            if step >= total or (minutes and time.perf_counter() - start > 60 * minutes):
                stop = True
                break
        epoch += 1
        if stop or epoch % max(1, eval_every) == 0:
            m = _scores(classify(model, val_set, proc, flip_tta=flip_tta), val_set.labels)
            rec = {"epoch": epoch, "step": step, "train_loss": run_loss / max(run_n, 1),
                   "val_loss": m["loss"], "val_accuracy": m["accuracy"], "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - start, 1)}
            run_loss, run_n = 0.0, 0
            history.append(rec)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            improved = (m["accuracy"], -m["loss"]) > (best["val_accuracy"], -best["val_loss"])
            if improved:
                best = dict(rec)
                save_model(model, out_dir / "model")  # atomic: a crash never leaves half a checkpoint
            _plot(history, out_dir / "curve.png")
            msg = (f"epoch {epoch} step {step}: train loss {rec['train_loss']:.3f} val loss {m['loss']:.3f} "
                   f"val acc {100 * m['accuracy']:.1f}%" + (" *" if improved else ""))
            if progress:
                tqdm.write(msg)
            else:
                print(msg, flush=True)
    bar.close()
    seconds = time.perf_counter() - start
    summary = {"classes": classes, "n_train": len(train_set), "n_val": len(val_set), "epochs": epoch, "steps": step,
               "seconds": round(seconds, 1), "images_per_second": round(seen / max(seconds, 1e-9), 1),
               "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
               "final_val_accuracy": history[-1]["val_accuracy"], "flip_tta": flip_tta,
               "chance": 1 / len(classes), "params": model.num_params(), "config": config.to_dict(), "out": str(out_dir),
               "model": str(out_dir / "model")}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    print(f"train-vit: best val accuracy {100 * best['val_accuracy']:.1f}% (epoch {best['epoch']}), "
          f"last {100 * summary['final_val_accuracy']:.1f}%, {epoch} epochs in {seconds:.0f}s; wrote {out_dir}")
    return summary


# ---------------------------------------------------------------------------------------
# eval --task image-classification
# ---------------------------------------------------------------------------------------
def load_classifier(path: str | Path):
    """(ViT with a head, its processor, its class names) from a checkpoint folder."""
    from .models.registry import load_model

    model = load_model(path)
    if model.config.family != "vit" or getattr(model, "head", None) is None:
        raise ValueError(f"{path}: not a ViT classifier checkpoint (run 'polymodal train-vit')")
    id2label = model.config.id2label or {}
    classes = [id2label.get(str(i), str(i)) for i in range(model.config.num_labels)]
    return model, ImageProcessor.from_config(model.config), classes


def eval_image_classification(model: str, data: str = "../shared/data/cifar10", split: str = "val",
                              batch_size: int = 256, flip_tta: bool = True, out: str | None = None) -> dict:
    """Accuracy of a train-vit checkpoint on a split of a labelled image folder; writes metrics + predictions JSON.

    Args:
        model: a ViT classifier checkpoint folder.
        data: the dataset folder (as for train-vit).
        split: train or val.
        batch_size: images per forward pass.
        flip_tta: average the logits of each image and its mirror (as train-vit scores val).
        out: JSON file to write (default <model>/image_classification_<split>.json).
    """
    net, proc, classes = load_classifier(model)
    paths, labels = labelled_splits(data)[split]
    images = decode_images(paths, labels, classes, proc, progress=False, desc=split)
    logits = classify(net, images, proc, batch_size, flip_tta)
    m = _scores(logits, images.labels)
    pred = logits.argmax(-1).tolist()
    result = {"task": "image-classification", "split": split, "n_images": len(images), **m,
              "chance": 1 / len(classes), "flip_tta": flip_tta,
              "predictions": [{"image": str(p), "pred": classes[k], "label": classes[int(y)]}
                              for p, k, y in zip(images.paths, pred, images.labels)]}
    path = Path(out) if out else Path(model) / f"image_classification_{split}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"{split} accuracy {100 * m['accuracy']:.1f}% on {len(images)} images "
          f"({len(classes)} classes, chance {100 / len(classes):.1f}%); wrote {path}")
    return result


def eval_vision(task: str, model: str, data_dir: str | None = None, split: str = "val", batch_size: int = 64,
                out: str | None = None) -> dict:
    """``polymodal eval`` for the vision tasks: ``retrieval`` (a dual-encoder checkpoint on a
    Flickr8k folder / COCO-captions JSON, the same metrics and JSON as ``eval-retrieval``) and
    ``image-classification`` (a train-vit checkpoint)."""
    if task == "retrieval":
        from .vision_commands import eval_retrieval

        path = Path(out) if out else Path(model) / f"retrieval_{split}.json"
        m = eval_retrieval(model, data_dir or "../shared/data/flickr8k", split, json_out=str(path))
        return {"task": task, "split": split, "metrics": m, "json": str(path)}
    if task == "image-classification":
        r = eval_image_classification(model, data_dir or "../shared/data/cifar10", split, max(batch_size, 1), out=out)
        return {"task": task, "split": split, "metrics": {k: r[k] for k in ("accuracy", "loss", "chance")},
                "json": str(Path(out) if out else Path(model) / f"image_classification_{split}.json")}
    raise ValueError(f"unknown vision task {task!r}; choose retrieval or image-classification")


VISION_TASKS = ("retrieval", "image-classification")


# ---------------------------------------------------------------------------------------
# linear-probe
# ---------------------------------------------------------------------------------------
def load_image_tower(path: str | Path):
    """(tower with ``encode(pixels) -> (B, D)``, processor, kind) of a CLIP/ALIGN checkpoint (its
    image tower, before the projection) or a ViT checkpoint (pooled features, before the head)."""
    from .models.registry import load_model

    model = load_model(path)
    if hasattr(model, "encode_image") and hasattr(model, "vision"):
        return model.vision, ImageProcessor.from_config(model.config), "clip-image-tower"
    if model.config.family == "vit":
        return model, ImageProcessor.from_config(model.config), "vit"
    raise ValueError(f"{path}: neither a dual-encoder nor a ViT checkpoint (family {model.config.family!r})")


@torch.no_grad()
def tower_features(tower, images: ImageSet, processor: ImageProcessor, batch_size: int = 256) -> np.ndarray:
    """Frozen pooled features (N, D) float64 of decoded images."""
    tower.eval()
    out = [tower.encode(normalize(images.pixels[s:s + batch_size], processor)).double()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = 2000, seed: int = 0):
    """Standardised features -> L2 multinomial logistic regression (L-BFGS) with inverse strength C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # a C far too large may stop at max_iter: still a valid point of the sweep
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", category=ConvergenceWarning)
        clf.fit(features, labels)
    return clf


def linear_probe(model: str, data: str = "../shared/data/cifar10", c_values: list[float] | None = None,
                 holdout: float = 0.2, max_iter: int = 2000, batch_size: int = 256, val_fraction: float = 0.1,
                 seed: int = 0, threads: int = 0, json_out: str | None = None) -> dict:
    """Linear probe: frozen image-tower features -> logistic regression, C chosen on a held-out part of train.

    Args:
        model: a CLIP/ALIGN checkpoint (its image tower) or a ViT checkpoint (pooled features).
        data: a labelled image folder (as for train-vit).
        c_values: the inverse regularisation strengths to sweep (default 1e-3 ... 1e3, 13 values).
        holdout: share of each training class used to choose C (then refit on all of train).
        max_iter: L-BFGS iterations.
        batch_size: images per forward pass.
        val_fraction: share of each class held out when the folder has no val split.
        seed: split seed.
        threads: torch CPU threads (0 = torch's default).
        json_out: also write the result here.
    """
    if threads:
        torch.set_num_threads(threads)
    tower, proc, kind = load_image_tower(model)
    splits = labelled_splits(data, val_fraction, seed)
    classes = sorted(set(splits["train"][1]))
    train = decode_images(*splits["train"], classes, proc, progress=False, desc="train")
    val = decode_images(*splits["val"], classes, proc, progress=False, desc="val")
    t0 = time.perf_counter()
    x_tr, x_val = tower_features(tower, train, proc, batch_size), tower_features(tower, val, proc, batch_size)
    y_tr, y_val = train.labels.numpy(), val.labels.numpy()
    feat_s = time.perf_counter() - t0

    # stratified hold-out of the training split for the C sweep
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y_tr), dtype=bool)
    for k in np.unique(y_tr):
        idx = np.flatnonzero(y_tr == k)
        rng.shuffle(idx)
        held[idx[:int(round(holdout * len(idx)))]] = True
    if held.all() or not held.any():
        raise ValueError(f"holdout={holdout} leaves no examples on one side of the C sweep")
    cs = [float(c) for c in (c_values or np.logspace(-3, 3, 13))]
    sweep = []
    for c in cs:
        clf = fit_probe(x_tr[~held], y_tr[~held], c, max_iter, seed)
        sweep.append({"C": c, "holdout_accuracy": float((clf.predict(x_tr[held]) == y_tr[held]).mean())})
    # best hold-out accuracy; ties go to the smaller C (the stronger regularisation)
    best_c = max(sweep, key=lambda r: (r["holdout_accuracy"], -r["C"]))["C"]
    clf = fit_probe(x_tr, y_tr, best_c, max_iter, seed)
    pred = clf.predict(x_val)
    acc = float((pred == y_val).mean())
    result = {"model": str(model), "tower": kind, "feature_dim": int(x_tr.shape[1]), "n_train": len(y_tr),
              "n_val": len(y_val), "C": best_c, "accuracy": acc, "chance": 1 / len(classes), "sweep": sweep,
              "feature_seconds": round(feat_s, 2), "classes": classes}
    print(f"linear probe ({kind}, {x_tr.shape[1]}-d features): val accuracy {100 * acc:.1f}% on {len(y_val)} images "
          f"(C={best_c:g} chosen on {int(held.sum())} held-out train images; chance {100 / len(classes):.1f}%)")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
