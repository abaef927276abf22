"""Image classification with a Vision Transformer trained from scratch, as a Task.

Model: ViT (Dosovitskiy et al., 2021, eq. 1-4) from a preset (``polymodal.models.vit``), optionally
with the convolutional stem of Xiao et al. (2021). Objective: the cross-entropy between the
softmax and *soft* targets, L = -1/B sum_b sum_k t_bk log softmax(f(x_b))_k, where t is the
label-smoothed one-hot (Szegedy et al., 2016, sec. 7) mixed by Mixup / CutMix (Zhang et al., 2018;
Yun et al., 2019) as in DeiT (Touvron et al., 2021, sec. 6). The augmentation (``data/augment.py``)
runs on the uint8 image cache decoded once in ``__init__`` (``data/image_sets.py``).

Exact resume and splitting: global batch ``index`` is ``EpochSampler`` batch ``index`` (a pure
function of the index and the seed), and every augmentation draw of that batch comes from
``numpy.random.default_rng([seed, index])`` as one :class:`~polymodal.data.augment.BatchPlan`; a rank
applies the plan to its own rows (and their Mixup partners), so N ranks see exactly the batch one
process would. (A BatchNorm conv stem still normalises with per-rank batch statistics under DDP.)

Evaluation: accuracy (the metric, to maximise) and cross-entropy on the val split, optionally
averaging the logits of each image and its mirror (flip TTA).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.augment import AugmentConfig, augment_rows, draw_plan
from ...data.image_sets import decode_images, labelled_splits, normalize
from ...data.images import ImageProcessor
from .base import EpochSampler, Task


class ImageClassifyTask(Task):
    name, metric, mode, unit = "image_classify", "accuracy", "max", "img"

    def __init__(self, data: str | Path, preset: str = "vit-tiny-cifar-conv", overrides: dict[str, Any] | None = None,
                 batch_size: int = 64, augment: AugmentConfig | None = None, flip_tta: bool = True,
                 val_fraction: float = 0.1, skip_bad_images: bool = True, seed: int = 0, progress: bool = True):
        from ...models.vit import ViTConfig

        splits = labelled_splits(data, val_fraction, seed)
        self.classes = sorted(set(splits["train"][1]))
        if len(self.classes) < 2:
            raise ValueError(f"{data}: classification needs at least 2 classes in the training split, "
                             f"found {self.classes}")
        if not splits["val"][0]:
            raise ValueError(f"{data}: the val split is empty")
        kw = {k: v for k, v in (overrides or {}).items() if v is not None}
        if kw.get("pool") == "mean":
            kw.setdefault("class_token", False)
        self.config = ViTConfig.from_preset(preset, **kw, num_labels=len(self.classes),
                                            id2label={str(i): c for i, c in enumerate(self.classes)})
        self.processor = ImageProcessor.from_config(self.config)
        self.train_set = decode_images(*splits["train"], self.classes, self.processor, skip_bad_images,
                                       "decode train", progress)
        self.val_set = decode_images(*splits["val"], self.classes, self.processor, skip_bad_images, "decode val",
                                     progress)
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.batch_size = min(batch_size, len(self.train_set))
        self.augment = augment or AugmentConfig()
        self.flip_tta, self.seed = flip_tta, seed
        self.sampler = EpochSampler(len(self.train_set), self.batch_size, seed)

    def build_model(self) -> nn.Module:
        from ...models.vit import ViT

        return ViT(self.config)

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        if self.batch_size % world:
            raise ValueError(f"--batch-size {self.batch_size} does not split over {world} ranks")
        idx = torch.tensor(self.sampler.indices(index))
        pixels, labels = self.train_set.pixels[idx], self.train_set.labels[idx]
        rng = np.random.default_rng([self.seed, index])
        plan = draw_plan(self.augment, len(idx), tuple(pixels.shape[-2:]), rng)
        per = self.batch_size // world
        x, t = augment_rows(pixels, labels, range(rank * per, (rank + 1) * per), self.augment, plan,
                            len(self.classes))
        return {"pixels": normalize(x, self.processor), "targets": t}

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        logp = F.log_softmax(model(batch["pixels"]).float(), dim=-1)
        return {"loss": torch.sum(-batch["targets"] * logp, dim=-1).mean()}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        from ...eval.vision import classification_scores, classify

        logits = classify(model, self.val_set, self.processor, flip_tta=self.flip_tta)
        return classification_scores(logits, self.val_set.labels)

    def summary(self) -> dict[str, Any]:
        return {"classes": self.classes, "n_train": len(self.train_set), "n_val": len(self.val_set),
                "chance": 1 / len(self.classes), "flip_tta": self.flip_tta}
