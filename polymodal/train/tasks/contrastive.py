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

A locked (LiT) tower is a fixed function, so its features are computed once in ``__init__`` (each
pass under its own progress bar) and batches carry them; only the projection runs per step. For the
text tower that is every training caption; for a locked pretrained image tower (LiT proper, Zhai et
al., 2022: ALIGN's EfficientNet, Jia et al., 2021) every training image in ``image_views`` views:
view 0 the evaluation crop, view v > 0 a random resized crop / flip drawn from a generator seeded by
(seed, image, v), and step ``index`` picks each image's view from ``default_rng([seed, index])``.
``cache_image_features=False`` recomputes the same views through the tower at every step (the
reference the cache is tested against). Tuned pretrained towers train at ``tower_lr_scale`` x the
learning rate (``param_groups``, each subset split by the one decay rule of ``train.optim``).
Evaluation: retrieval on the val captions (R@1/5/10 both ways, mean rank), selecting checkpoints by
``mean_recall``, the mean of the six recalls; a locked tower's val features are computed once too.
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


def feature_device(device: str = "auto") -> torch.device:
    """Where the one-off feature passes of the locked towers run: ``--device`` (auto: CUDA when
    present), this rank's GPU under torchrun."""
    import os

    from ...runtime import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _projected(projection: nn.Module, features: torch.Tensor | None) -> torch.Tensor | None:
    """L2-normalised projections (on the CPU) of a locked tower's features, or None without them."""
    if features is None:
        return None
    w = projection.weight
    return torch.nn.functional.normalize(projection(features.to(w.device, w.dtype)).float(), dim=-1).cpu()


@torch.no_grad()
def embed_captions(tower: nn.Module, config, tokenizer, texts: list[str], batch_size: int = 256,
                   progress: bool = True, device: str | torch.device = "cpu") -> torch.Tensor:
    """Pooled features (n, D) of a frozen text tower for every caption, under a progress bar."""
    from tqdm.auto import tqdm

    from ...models.dual_encoder import tokenize_texts

    tower.eval()
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="embed captions (locked text tower)", unit="batch",
                  disable=not progress, leave=False, dynamic_ncols=True):
        ids, mask = tokenize_texts(config, tokenizer, texts[s:s + batch_size])
        out.append(tower.encode(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def image_view(dataset, idx: list[int], view: int, seed: int) -> torch.Tensor:
    """Pixels of images ``idx`` of a ``CaptionDataset`` in view ``view``: 0 the evaluation crop, v > 0
    a random resized crop / flip from ``generator(seed, image, v)``: the same pixels whenever asked."""
    from ...data.image_cache import generator

    if view == 0:
        return dataset.pixels(idx)
    return torch.cat([dataset.processor.train([dataset.images[i]], generator(seed, i, view)) for i in idx])


@torch.no_grad()
def embed_images(tower: nn.Module, dataset, views: int = 1, seed: int = 0, batch_size: int | None = None,
                 progress: bool = True, device: str | torch.device = "cpu", desc: str = "train") -> torch.Tensor:
    """Pooled features (n, views, D), float32 on the CPU, of a frozen image tower for every image of
    a ``CaptionDataset`` in each view of :func:`image_view`, under a progress bar. ``batch_size``
    None: one image per forward on the CPU (an EfficientNet's activations then stay in the CPU's
    caches: ~1.5x faster than batches of 32 at 224 px), 64 on a GPU."""
    from tqdm.auto import tqdm

    tower.eval()
    batch_size = batch_size or (1 if torch.device(device).type == "cpu" else 64)
    out, n = [], len(dataset)
    for s in tqdm(range(0, n, batch_size), desc=f"embed {desc} images (locked image tower, {views} view"
                  f"{'s' * (views > 1)})", unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        idx = list(range(s, min(s + batch_size, n)))
        out.append(torch.stack([tower.encode(image_view(dataset, idx, v, seed).to(device)).float().cpu()
                                for v in range(views)], 1))
    return torch.cat(out)


class ContrastiveTask(Task):
    name, metric, mode, unit = "contrastive", "mean_recall", "max", "img"

    def __init__(self, data: str | Path, val_data: str | None = None, image_root: str | None = None,
                 model: dict[str, Any] | None = None, batch_size: int = 64, loss: str = "infonce",
                 max_images: int = 0, skip_bad_images: bool = True, seed: int = 0, progress: bool = True,
                 tokenizer=None, image_views: int = 1, cache_image_features: bool = True,
                 tower_lr_scale: float = 1.0, weight_decay: float = 0.1, device: str = "cpu"):
        from ...data.captions import CaptionDataset, load_captions
        from ...data.images import ImageProcessor
        from ...models.dual_encoder import dual_encoder_recipe

        if image_views < 1:
            raise ValueError(f"--image-views must be >= 1, got {image_views}")
        if tower_lr_scale <= 0:
            raise ValueError(f"--tower-lr-scale must be > 0, got {tower_lr_scale}")
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
        self.tower_lr_scale, self.weight_decay = tower_lr_scale, weight_decay
        proc = ImageProcessor.from_config(self.recipe.config)  # the tower's own size, resize, mean/std
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
        if batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (the other pairs are the negatives), got {batch_size}")
        self.batch_size = min(batch_size, len(self.train_set))
        self.captions = self.train_set.captions
        self.sampler = EpochSampler(len(self.train_set), self.batch_size, seed)
        self.image_views = image_views if self.recipe.image_locked else 0  # 0: augmented pixels each step
        self._cache_locked(cache_image_features, progress, device)

    def _cache_locked(self, cache_images: bool, progress: bool, device: str) -> None:
        """The locked towers' features, each pass under its own bar: the train images in their views
        and the val images (a locked pretrained image tower), the train and val captions (a locked
        text tower). Without ``cache_images`` the image views are recomputed at every step."""
        self.image_cache = self.eval_image_features = self.eval_pixels = None
        if self.recipe.image_locked and cache_images:
            tower = self.recipe.image_tower().to(device)
            self.eval_image_features = embed_images(tower, self.eval_set, 1, self.seed, progress=progress,
                                                    device=device, desc="val")[:, 0]
            self.image_cache = embed_images(tower, self.train_set, self.image_views, self.seed, progress=progress,
                                            device=device)
        else:
            self.eval_pixels = self.eval_set.pixels()  # the eval preprocessing, once
        self.text_cache = self.caption_index = self.eval_text_features = None
        if getattr(self.recipe.config.text, "locked", False) and self.recipe.text_tower is not None:
            # by length: the batches of the one-off embedding pass then carry little padding
            caps = sorted({c for r in self.train_set.records for c in r.captions}, key=lambda c: (len(c), c))
            self.caption_index = {c: i for i, c in enumerate(caps)}
            tower = self.recipe.text_tower.to(device)
            self.text_cache = embed_captions(tower, self.recipe.config, self.tokenizer, caps, progress=progress,
                                             device=device)
            self.eval_text_features = embed_captions(tower, self.recipe.config, self.tokenizer,
                                                     self.eval_set.all_texts()[0], progress=progress, device=device)
            self.recipe.text_tower = tower.cpu()

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
        out: dict[str, torch.Tensor] = {}
        if self.image_views:  # a locked image tower: fixed views, cached features or recomputed pixels
            views = rng.integers(self.image_views, size=len(idx)).tolist()
            if self.image_cache is not None:
                out["image_features"] = self.image_cache[[idx[j] for j in mine], [views[j] for j in mine]]
            else:
                out["pixels"] = torch.cat([image_view(self.train_set, [idx[j]], views[j], self.seed) for j in mine])
        else:
            pixels = []
            for j in mine:
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index, j]).generate_state(1)[0]))
                pixels.append(self.train_set.batch([idx[j]], g)[0])
            out["pixels"] = torch.cat(pixels)
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
        img, txt = model(batch.get("pixels"), batch.get("input_ids"), batch.get("attention_mask"),
                         text_features=batch.get("text_features"), image_features=batch.get("image_features"),
                         return_embeddings=True)
        loss = contrastive_objective(clip, img, txt, self.loss_name)  # negatives gathered from every rank
        return {"loss": loss, "tau": (-clip.logit_scale.detach()).exp()}

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """The projections, the temperature and towers trained from scratch at the learning rate; the
        trainable weights of the pretrained towers at ``tower_lr_scale`` x it (a lower rate keeps
        what they learnt: ALIGN / LiT fine-tuning); each subset split by the one decay rule."""
        from ..optim import decays, no_weight_decay_names, trainable_parameters

        prefixes = self.recipe.pretrained_prefixes
        if self.tower_lr_scale == 1.0 or not prefixes:
            return None
        listed = no_weight_decay_names(model)
        groups: dict[tuple[float, bool], dict] = {}
        for full, p, module in trainable_parameters(model):
            scale = self.tower_lr_scale if full.startswith(prefixes) else 1.0
            decay = decays(full, p, module, listed)
            g = groups.setdefault((scale, decay), {"params": [], "names": [], "lr_scale": scale,
                                                   "weight_decay": self.weight_decay if decay else 0.0})
            g["params"].append(p)
            g["names"].append(full)
        if all(scale == 1.0 for scale, _ in groups):  # locked towers: nothing at the tower rate
            return None
        return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Val retrieval; a locked tower's val features were computed once: only its projection runs."""
        from ...eval.dual_encoder import retrieval_on

        core = _core(model)
        return retrieval_on(model, self.tokenizer, self.eval_set, self.eval_pixels,
                            image_embeds=_projected(core.visual_projection, self.eval_image_features),
                            text_embeds=_projected(core.text_projection, self.eval_text_features))

    def summary(self) -> dict[str, Any]:
        return {"n_train": len(self.train_set), "n_eval": len(self.eval_set), "eval_on": self.eval_split,
                "locked_text_cache": None if self.text_cache is None else len(self.text_cache),
                "locked_image_cache": None if self.image_cache is None else list(self.image_cache.shape[:2])}
