"""Image-caption and labelled-image datasets for contrastive training and evaluation.

Formats
-------
* Flickr8k (Hodosh et al., 2013): a folder with ``captions.txt`` in the original
  ``Flickr8k.token.txt`` layout, one ``<image>.jpg#<k><TAB><caption>`` per line
  (k = 0..4), the JPEGs under ``images/`` and split lists ``train.txt`` / ``val.txt``
  (one file name a line).
* COCO captions (Chen et al., 2015, "Microsoft COCO Captions"): a JSON file
  ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}``;
  the image files sit next to the JSON, in ``images/``, or in ``image_root``.
* Labelled images (zero-shot): a ``relative_path<TAB>class`` TSV (our CIFAR-10 copy)
  or a folder of class sub-folders.

``CaptionDataset`` preloads each image once, resized so its short side is a bit
larger than the model's input (decoding a 500-pixel JPEG every step would cost more
than the model on CPU), then draws batches of (augmented image, one random caption
of it) from an explicit ``torch.Generator`` so a run is reproducible.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .textio import read_utf8
from .images import ImageLoadError, ImageProcessor, load_image, shortest_edge_size, RESAMPLE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclasses.dataclass
class ImageCaptions:
    image: Path
    captions: list[str]


def _read_lines(path: Path) -> list[str]:
    return read_utf8(path).splitlines()  # errors name the file (and the line of a bad byte)


def load_flickr8k(root: str | Path, split: str = "train", captions_file: str = "captions.txt",
                  image_dir: str = "images") -> list[ImageCaptions]:
    """Flickr8k-format folder -> one ``ImageCaptions`` per image of ``split`` (train | val | all,
    or the name of any split-list file in ``root``), in the split file's order."""
    root = Path(root)
    by_image: dict[str, list[str]] = {}
    cap_path = root / captions_file
    for n, line in enumerate(_read_lines(cap_path), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_, _k = key.partition("#")
        if not sep or not hash_ or not caption.strip():
            raise ValueError(f"{cap_path}:{n}: expected '<image>#<k><TAB><caption>', got {line[:80]!r}")
        by_image.setdefault(name.strip(), []).append(caption.strip())
    if not by_image:
        raise ValueError(f"{cap_path}: no captions (expected '<image>#<k><TAB><caption>' lines)")
    if split == "all":
        names = list(by_image)
    else:
        split_path = root / (split if split.endswith(".txt") else f"{split}.txt")
        if not split_path.is_file():
            raise FileNotFoundError(f"{split_path}: no such split list (choose train, val or all)")
        names = [s.strip() for s in _read_lines(split_path) if s.strip()]
        if not names:
            raise ValueError(f"{split_path}: empty split list (no image names)")
    missing = [s for s in names if s not in by_image]
    if missing:
        raise ValueError(f"{cap_path}: no captions for {len(missing)} image(s) of split {split!r}, "
                         f"e.g. {missing[0]!r}")
    return [ImageCaptions(root / image_dir / s, by_image[s]) for s in names]


def load_coco_captions(path: str | Path, image_root: str | Path | None = None) -> list[ImageCaptions]:
    """COCO-captions JSON -> one ``ImageCaptions`` per image that has at least one caption."""
    path = Path(path)
    try:
        d = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise ValueError(f"{path}: a COCO-captions file needs 'images' and 'annotations' lists")
    if image_root is None:
        image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_root = Path(image_root)
    files: dict = {}
    for i, im in enumerate(d["images"]):
        if "id" not in im or "file_name" not in im:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
    caps: dict = {}
    for i, a in enumerate(d["annotations"]):
        if "image_id" not in a or "caption" not in a:
            raise ValueError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        if a["image_id"] not in files:
            raise ValueError(f"{path}: annotations[{i}] refers to unknown image_id {a['image_id']!r}")
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    return [ImageCaptions(image_root / files[i], caps[i]) for i in files if i in caps]


def load_captions(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[ImageCaptions]:
    """A Flickr8k-format folder or a COCO-captions ``.json`` file (told apart by the path)."""
    path = Path(path)
    if path.is_dir():
        if (path / "captions.txt").is_file():
            return load_flickr8k(path, split)
        raise FileNotFoundError(f"{path}: a Flickr8k-format folder needs captions.txt")
    if path.suffix.lower() == ".json":
        return load_coco_captions(path, image_root)
    raise FileNotFoundError(f"{path}: expected a Flickr8k-format folder or a COCO-captions .json file")


def load_labeled_images(path: str | Path, split: str = "val") -> tuple[list[Path], list[str] | None]:
    """(image paths, class names or None) from a ``path<TAB>class`` TSV, a dataset folder holding
    ``<split>.tsv`` (our CIFAR-10), a folder of class sub-folders, or a flat folder (no labels)."""
    path = Path(path)
    if path.is_dir() and (path / f"{split}.tsv").is_file():
        path = path / f"{split}.tsv"
    if path.is_file():
        images, labels = [], []
        for n, line in enumerate(_read_lines(path), 1):
            if not line.strip():
                continue
            rel, sep, label = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected '<image path><TAB><class>', got {line[:80]!r}")
            images.append(path.parent / rel.strip())
            labels.append(label.strip())
        if not images:
            raise ValueError(f"{path}: no '<image path><TAB><class>' lines")
        return images, labels
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image folder or TSV file")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        images, labels = [], []
        for d in subdirs:
            files = [f for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            if not files:  # a class without examples is a mistake in the data, not a class to ignore
                raise ValueError(f"{d}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files)")
            images += files
            labels += [d.name] * len(files)
        return images, labels
    images = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{path}: no images found")
    return images, None


class CaptionDataset:
    """Preloaded (image, captions) pairs with reproducible augmented batches.

    Args:
        records: from ``load_flickr8k`` / ``load_coco_captions``.
        processor: the model's ``ImageProcessor`` (size, mean/std).
        skip_bad: drop images that fail to load, with one warning giving their count (default: raise
            ``ImageLoadError`` naming the file).
        cache_size: short side the images are kept at (default: 1.15 x the input size).
        progress: a progress bar while decoding (thousands of JPEGs take a while: a set-up phase of its own).
        desc: the bar's label.
    """

    def __init__(self, records: Sequence[ImageCaptions], processor: ImageProcessor, skip_bad: bool = False,
                 cache_size: int | None = None, progress: bool = False, desc: str = "decode images"):
        from tqdm.auto import tqdm

        self.processor = processor
        size = cache_size or int(round(processor.image_size * 1.15))
        self.records: list[ImageCaptions] = []
        self.images: list[Image.Image] = []
        bad: list[str] = []
        for r in tqdm(records, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True):
            try:
                im = load_image(r.image)
            except ImageLoadError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            if min(im.size) > size:  # shrink once; crops and the eval resize then work on this copy
                im = im.resize(shortest_edge_size(*im.size, size), RESAMPLE["bicubic"])
            self.records.append(r)
            self.images.append(im)
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(records)} (first: {bad[0]})", stacklevel=2)
        if not self.records:
            raise ValueError(f"no usable images in the caption dataset ({len(records)} listed"
                             + (f", none readable; first: {bad[0]})" if bad else ")"))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[list[str]]:
        return [r.captions for r in self.records]

    def all_texts(self) -> tuple[list[str], list[int]]:
        """Every caption and the index of its image (the retrieval ground truth)."""
        texts, owner = [], []
        for i, r in enumerate(self.records):
            texts += r.captions
            owner += [i] * len(r.captions)
        return texts, owner

    def pixels(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Evaluation preprocessing (resize + center crop) of the given images."""
        idx = range(len(self)) if indices is None else indices
        return self.processor([self.images[i] for i in idx])

    def batch(self, indices: Sequence[int], generator: torch.Generator, augment: bool = True):
        """(pixels (B, 3, S, S), one random caption per image)."""
        ims = [self.images[i] for i in indices]
        px = self.processor.train(ims, generator) if augment else self.processor(ims)
        texts = []
        for i in indices:
            caps = self.records[i].captions
            texts.append(caps[int(torch.randint(len(caps), (1,), generator=generator))])
        return px, texts
