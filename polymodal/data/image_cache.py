"""Image caches for vision-language training: decode every image once, before training.

* :class:`PixelCache` (VQA as classification): every distinct image resized once
  (``ImageProcessor.resize_and_crop``) and kept as uint8 (N, 3, S, S), 4x less memory than
  float; ``pixels`` normalises on the fly and applies the flips it is given.
* :class:`FeatureCache` (the generative VLM): the images of a split decoded once
  (``CaptionDataset``); with a frozen image tower g, also its patch features Z_v = g(X_v) for
  ``views`` views per image (view 0 the evaluation crop, the others random crops / flips), so
  the tower drops out of the training step (LLaVA stage 1 trains only the projector, and
  Z_v never changes). Computing them is a set-up phase with its own progress bar.

Augmentation randomness never comes from a global RNG: every random crop or flip is drawn
from a generator seeded by :func:`item_seed` of (seed, micro-batch index, item), so the
augmented batch of any step can be recomputed from the step alone (exact resume) and does
not depend on how the batch is split over ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

_M = 2 ** 63 - 1


def item_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, index, item, view...), distinct for
    distinct tuples of small non-negative integers (a polynomial with two large primes)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) * 1_000_033 % _M
    return s


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(item_seed(*parts))


class PixelCache:
    """Every distinct image of ``paths``, resized once and kept as uint8; ``index`` maps a path
    to its row."""

    def __init__(self, processor, paths: Sequence[Path], progress: bool = False, desc: str = "images"):
        import numpy as np
        from tqdm.auto import tqdm

        from .images import load_image

        self.processor = processor
        self.index: dict[Path, int] = {}
        arrays = []
        for p in tqdm(list(dict.fromkeys(paths)), desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
            self.index[p] = len(arrays)
            arrays.append(np.asarray(processor.resize_and_crop(load_image(p)), dtype=np.uint8))
        if not arrays:
            raise ValueError("no images to cache")
        self.data = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.mean = torch.tensor(processor.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def pixels(self, rows: Sequence[int], flips: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised (B, 3, S, S) float pixels of ``rows``; ``flips`` (2, B) bool flips row b
        horizontally where ``flips[0, b]`` and vertically where ``flips[1, b]``."""
        x = self.data[list(rows)].float() * self.processor.rescale_factor
        if flips is not None:
            h, v = flips[0], flips[1]
            x[h] = x[h].flip(-1)
            x[v] = x[v].flip(-2)
        return (x - self.mean) / self.std


class FeatureCache:
    """The images of one split, decoded once; with ``encode`` (a frozen tower's
    ``vision_features``), their patch features for ``views`` views, kept in bf16.

    bf16 halves the memory; the projector sees ~0.4% rounding, far below the crop noise."""

    def __init__(self, paths: Sequence[Path], processor, encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 views: int = 1, seed: int = 0, skip_bad: bool = False, progress: bool = True, desc: str = "train",
                 chunk: int = 64):
        from tqdm.auto import tqdm

        from .captions import CaptionDataset, ImageCaptions

        self.data = CaptionDataset([ImageCaptions(Path(p), []) for p in dict.fromkeys(paths)], processor,
                                   skip_bad=skip_bad, progress=progress, desc=f"decode images ({desc})")
        self.processor, self.seed, self.views = processor, seed, views
        self.index = {str(r.image): i for i, r in enumerate(self.data.records)}
        self.features: torch.Tensor | None = None
        if encode is None:
            return
        n, chunks = len(self.data), []
        with torch.no_grad():
            for s in tqdm(range(0, n, chunk), desc=f"tower features ({desc}, {views} view{'s' * (views > 1)})",
                          disable=not progress, dynamic_ncols=True):
                idx = list(range(s, min(s + chunk, n)))
                per_view = [encode(self.data.pixels(idx))]
                per_view += [encode(self.augmented(idx, [(0, i, v) for i in idx])) for v in range(1, views)]
                chunks.append(torch.stack(per_view, 1).to(torch.bfloat16))
        self.features = torch.cat(chunks)  # (N, views, P, D_v)

    def __len__(self) -> int:
        return len(self.data)

    def augmented(self, idx: Sequence[int], keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Random crops / flips of images ``idx``, image j's drawn from ``generator(seed, *keys[j])``."""
        ims = [self.data.images[i] for i in idx]
        return torch.cat([self.processor.train([im], generator(self.seed, *k)) for im, k in zip(ims, keys)])

    def eval_inputs(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs of images ``idx`` as evaluated: view 0's features, or the centre crop."""
        if self.features is not None:
            return {"image_features": self.features[torch.tensor(list(idx), dtype=torch.long), 0].float()}
        return {"pixel_values": self.data.pixels(idx)}
