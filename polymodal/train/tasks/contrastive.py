"""Contrastive image-text training (CLIP, Radford et al., 2021; ALIGN, Jia et al., 2021) as a Task.

Objective: the symmetric InfoNCE of CLIP (fig. 3's pseudo-code; van den Oord et al., 2018, eq. 4),
with s_ij = exp(t) <u_i, v_j> over L2-normalised image and text embeddings u, v of the N pairs of a
global batch,

    L = 1/2 [ -1/N sum_i log softmax_j(s_ij)[i]  -  1/N sum_j log softmax_i(s_ij)[j] ],

or SigLIP's sigmoid loss (Zhai et al., 2023, algorithm 1); both in ``polymodal.models.contrastive``.
The learned log-temperature t is clipped at log 100 (CLIP sec. 2.5) before every step.

2 ranks x N/2 = 1 process x N: each rank embeds its slice of the global batch, and the loss
all-gathers the embeddings with a gradient-preserving all-gather (``gather_features``: its backward
reduce-scatters the gradients to the rank that computed each row), so every rank computes the same
loss on the full N x N matrix against all N - 1 negatives; rank r's embeddings receive W * dL/du_r
and DDP's gradient average over the W ranks divides the W back out. The model is called once per
step (``CLIP.forward(..., return_embeddings=True)``) so DDP sees the forward it synchronises.

Batches: global batch ``index`` is ``EpochSampler`` batch ``index`` (no image twice in a batch: a
duplicate would be its own false negative); the caption of each image is drawn from
``numpy.random.default_rng([seed, index])`` and each image's random resized crop from a generator
seeded by (seed, index, position in the global batch), so a batch is the same however it is split
over ranks and a resumed run draws the same batches. The captions of the whole global batch are
tokenised together, so every rank pads to the same length.

A locked (LiT) text tower is a fixed function: every training caption is embedded once in
``__init__`` (its own progress bar) and batches carry the cached features; only the text projection
runs per step. Evaluation: retrieval on the val captions (R@1/5/10 both ways, mean rank), selecting
checkpoints by ``mean_recall``, the mean of the six recalls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import EpochSampler, Task

EVAL_IMAGES_WITHOUT_VAL = 256  # with no val split, retrieval is scored on this many training images


def _core(model: nn.Module) -> nn.Module:
    """The CLIP inside a compiled and / or DDP-wrapped model (for its temperature parameter)."""
    m = getattr(model, "_orig_mod", model)
    return m.module if isinstance(getattr(m, "module", None), nn.Module) else m


@torch.no_grad()
def embed_captions(tower: nn.Module, config, tokenizer, texts: list[str], batch_size: int = 256,
                   progress: bool = True) -> torch.Tensor:
    """Pooled features (n, D) of a frozen text tower for every caption, under a progress bar."""
    from tqdm.auto import tqdm

    from ...models.dual_encoder import tokenize_texts

    tower.eval()
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="embed captions (locked text tower)", unit="batch",
                  disable=not progress, leave=False, dynamic_ncols=True):
        ids, mask = tokenize_texts(config, tokenizer, texts[s:s + batch_size])
        out.append(tower.encode(ids, mask).float())
    return torch.cat(out)


class ContrastiveTask(Task):
    name, metric, mode, unit = "contrastive", "mean_recall", "max", "img"

    def __init__(self, data: str | Path, val_data: str | None = None, image_root: str | None = None,
                 model: dict[str, Any] | None = None, batch_size: int = 64, loss: str = "infonce",
                 max_images: int = 0, skip_bad_images: bool = True, seed: int = 0, progress: bool = True,
                 tokenizer=None):
        from ...data.captions import CaptionDataset, load_captions
        from ...data.images import ImageProcessor
        from ...models.dual_encoder import dual_encoder_recipe

        records = load_captions(data, "train", image_root)
        if not records:
            raise ValueError(f"{data}: no captioned images")
        if max_images:
            records = records[:max_images]
        if val_data is None and Path(data).is_dir():
            val_data = data
        texts = [c for r in records for c in r.captions]
        self.recipe = dual_encoder_recipe(**(model or {}), texts=texts, loss=loss, tokenizer=tokenizer)
        self.tokenizer, self.loss_name, self.seed = self.recipe.tokenizer, loss, seed
        proc = ImageProcessor.from_config(self.recipe.config)
        proc.crop_scale = (0.5, 1.0)  # captions describe the whole scene: keep most of it
        self.train_set = CaptionDataset(records, proc, skip_bad=skip_bad_images, progress=progress,
                                        desc="decode train images")
        if len(self.train_set) < 2:
            raise ValueError(f"{data}: contrastive training needs at least 2 usable images, found {len(self.train_set)}")
        self.eval_set = (CaptionDataset(load_captions(val_data, "val", image_root), proc, skip_bad=skip_bad_images,
                                        progress=progress, desc="decode val images") if val_data else None)
        self.eval_split = "val" if self.eval_set is not None else f"train[:{EVAL_IMAGES_WITHOUT_VAL}] (no val data)"
        if self.eval_set is None:
            self.eval_set = CaptionDataset(self.train_set.records[:EVAL_IMAGES_WITHOUT_VAL], proc)
        self.eval_pixels = self.eval_set.pixels()  # the eval preprocessing, once
        if batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (the other pairs are the negatives), got {batch_size}")
        self.batch_size = min(batch_size, len(self.train_set))
        self.captions = self.train_set.captions
        self.sampler = EpochSampler(len(self.train_set), self.batch_size, seed)
        self.text_cache = self.caption_index = None
        if getattr(self.recipe.config.text, "locked", False) and self.recipe.text_tower is not None:
            # by length: the batches of the one-off embedding pass then carry little padding
            caps = sorted({c for r in self.train_set.records for c in r.captions}, key=lambda c: (len(c), c))
            self.caption_index = {c: i for i, c in enumerate(caps)}
            self.text_cache = embed_captions(self.recipe.text_tower, self.recipe.config, self.tokenizer, caps,
                                             progress=progress)

    def build_model(self) -> nn.Module:
        return self.recipe.build()

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        from ...models.dual_encoder import tokenize_texts

        if self.batch_size % world:
            raise ValueError(f"--batch-size {self.batch_size} does not split over {world} ranks")
        idx = self.sampler.indices(index)
        rng = np.random.default_rng([self.seed, index])
        caps = [self.captions[i][int(rng.integers(len(self.captions[i])))] for i in idx]
        per = self.batch_size // world
        mine = range(rank * per, (rank + 1) * per)
        pixels = []
        for j in mine:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index, j]).generate_state(1)[0]))
            pixels.append(self.train_set.batch([idx[j]], g)[0])
        out = {"pixels": torch.cat(pixels)}
        if self.text_cache is not None:
            out["text_features"] = self.text_cache[[self.caption_index[caps[j]] for j in mine]]
        else:
            ids, mask = tokenize_texts(self.recipe.config, self.tokenizer, caps)  # one padded length for all ranks
            out["input_ids"], out["attention_mask"] = ids[mine.start:mine.stop], mask[mine.start:mine.stop]
        return out

    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        from ...models.contrastive import contrastive_objective

        clip = _core(model)
        clip.clamp_logit_scale()  # CLIP sec. 2.5: the scale never exceeds 100 (in place, before the step)
        img, txt = model(batch["pixels"], batch.get("input_ids"), batch.get("attention_mask"),
                         text_features=batch.get("text_features"), return_embeddings=True)
        loss = contrastive_objective(clip, img, txt, self.loss_name)  # negatives gathered from every rank
        return {"loss": loss, "tau": (-clip.logit_scale.detach()).exp()}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        from ...eval.dual_encoder import retrieval_on

        return retrieval_on(model, self.tokenizer, self.eval_set, self.eval_pixels)

    def summary(self) -> dict[str, Any]:
        return {"n_train": len(self.train_set), "n_eval": len(self.eval_set), "eval_on": self.eval_split,
                "locked_text_cache": None if self.text_cache is None else len(self.text_cache)}
