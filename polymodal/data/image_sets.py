"""Labelled image sets for classification: the train/val split of a folder, decoded once into memory.

A small labelled dataset (our 1,000-image CIFAR-10 copy, a folder of class sub-folders) fits in
memory as one uint8 tensor (N, 3, S, S) after the model's eval preprocessing (resize / crop,
``polymodal.data.images.ImageProcessor``), and augmenting a tensor batch (``data/augment.py``) is far
cheaper than re-decoding JPEGs every step. ``normalize`` then applies the model's mean / std, so
``normalize(decode_images(...).pixels)`` equals ``ImageProcessor(...)(paths)`` exactly.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .images import ImageLoadError, ImageProcessor, load_image


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
    from .captions import load_labeled_images

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if (root / "train.tsv").is_file():
        if not (root / "val.tsv").is_file():
            raise FileNotFoundError(f"{root / 'val.tsv'}: not found (the folder has train.tsv)")
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
    return _stratified_split(paths, labels, val_fraction, seed)


def _stratified_split(paths, labels, val_fraction: float, seed: int) -> dict[str, tuple[list[Path], list[str]]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
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
    """Loads every file once (the model's eval resize / crop, no normalisation) into one uint8 tensor,
    under its own progress bar. An unreadable file raises :class:`ImageLoadError` naming it, or with
    ``skip_bad`` is left out and counted in one warning."""
    from tqdm.auto import tqdm

    index = {c: i for i, c in enumerate(classes)}
    arrays, ys, kept, bad = [], [], [], []
    for p, lab in tqdm(list(zip(paths, labels)), desc=desc, unit="img", disable=not progress, leave=False,
                       dynamic_ncols=True):
        if lab not in index:
            raise ValueError(f"{p}: class {lab!r} does not occur in the training split {list(classes)}")
        try:
            im = processor.resize_and_crop(load_image(p))
        except ImageLoadError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
            continue
        arrays.append(np.asarray(im, dtype=np.uint8))
        ys.append(index[lab])
        kept.append(Path(p))
    if bad:
        warnings.warn(f"{desc}: skipped {len(bad)} unreadable image(s) of {len(paths)} (first: {bad[0]})",
                      stacklevel=2)
    if not arrays:
        raise ValueError(f"{desc}: no usable images ({len(paths)} listed" + (f", first error: {bad[0]})" if bad else ")"))
    px = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(px, torch.tensor(ys, dtype=torch.long), list(classes), kept)


def normalize(pixels: torch.Tensor, processor: ImageProcessor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, 3, S, S) -> the model's normalised input."""
    x = pixels.float() * processor.rescale_factor if pixels.dtype == torch.uint8 else pixels
    mean = torch.tensor(processor.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
