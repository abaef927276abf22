"""The LLaVA-style generative VLM (image tower -> projector -> decoder) as a Task: captions, then VQA.

Training follows LLaVA's two stages (Liu et al., 2023, "Visual Instruction Tuning", sec. 4.2):

* stage 1, feature alignment: the image tower and the decoder are frozen and only the projector
  W learns, with the next-token loss on image-caption pairs (a caption is the answer to the image);
* stage 2, instruction tuning: starting from stage 1 (``init``), the projector keeps training and
  the decoder gets LoRA adapters (Hu et al., 2021), on question / answer pairs (easy-VQA, DAQUAR,
  VQAv2). Without ``init`` a fresh model comes from ``vision``: a tower preset then trains from
  scratch with the projector, and ``decoder="smollm2:K"`` keeps only SmolLM2's first K blocks.

Objective (LLaVA eq. 3): the cross-entropy of the target tokens only (the caption or the answer
and its end token; the prompt and the image placeholders carry label -100),

    L = -1/N sum_{b, t in target_b} log p(x_{b,t} | x_{b,<t}, X_v),

over the N target tokens of the global batch: each rank divides its token sum by N / world, so
the mean over ranks is the global mean whatever the split. Batches are right-padded to the
global batch's longest row before sharding (causality hides the pads).

With a frozen tower the features Z_v = g(X_v) never change, so they are computed once in
``__init__`` for ``views`` views per image (``polymodal.data.image_cache.FeatureCache``, its
own progress bar) and the tower drops out of the step. A training step picks one view per
image, and a trainable tower's random crops / flips are drawn, from generators seeded by the
micro-batch index (and the item), so a resumed run sees the same augmentations.

The metric: the val loss (stage 1, min), or the teacher-forced exact-match answer accuracy on
the fixed val set (stage 2, max): a row counts when every target token is the argmax, which is
when greedy decoding writes exactly that answer.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...generate.vlm import caption_chat as caption_chat_of, end_id, vqa_chat as vqa_chat_of
from .base import EpochSampler, Task, shard, trainable_state_keys

IGNORE = -100


def clean_caption(text: str) -> str:
    """Flickr8k's captions are pre-tokenized ("A dog runs .", "dog 's"); the decoder learns
    ordinary text, which the PTB tokenizer of the metrics splits back the same way."""
    s = " ".join(text.split())
    for a, b in ((" .", "."), (" ,", ","), (" 's", "'s"), (" n't", "n't"), (" !", "!"), (" ?", "?")):
        s = s.replace(a, b)
    return s


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (first on ties): VQAv2's ten human answers -> one target."""
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


def collate(samples: Sequence[tuple[int, list[int], list[int]]], pad: int, block_size: int):
    """Right-padded (ids, labels) of (image, prompt, target) samples: labels -100 on the prompt
    and the padding. Right padding keeps every real token's position and causality hides the
    pads, so no attention mask is needed."""
    rows = [(p + t)[:block_size] for _, p, t in samples]
    t_max = max(map(len, rows))
    ids = torch.full((len(rows), t_max), pad, dtype=torch.long)
    labels = torch.full((len(rows), t_max), IGNORE, dtype=torch.long)
    for r, ((_, p, _t), row) in enumerate(zip(samples, rows)):
        ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        labels[r, len(p):len(row)] = torch.tensor(row[len(p):], dtype=torch.long)
    return ids, labels


class VLMTask(Task):
    name, unit = "vlm", "seq"

    def __init__(self, data: str | Path, stage: int = 1, vision: str | None = None, decoder: str = "smollm2",
                 init: str | None = None, val_data: str | None = None, image_root: str | None = None,
                 pixel_shuffle: int = 2, projector: str = "mlp", train_vision: bool | None = None, lora: int = 0,
                 lora_mlp: bool = False, train_decoder: bool = False, caption_prompt: str | None = None,
                 caption_chat: bool | None = None, vqa_prompt: str | None = None, vqa_chat: bool | None = None,
                 views: int = 0, crop_scale: float = 0.5, flip: bool | None = None, batch_size: int = 16,
                 lr: float = 1e-3, lora_lr: float | None = None, weight_decay: float = 0.0, val_samples: int = 64,
                 limit: int = 0, seed: int = 0, skip_bad_images: bool = False, progress: bool = True):
        from ...data.image_cache import FeatureCache
        from ...data.images import ImageProcessor

        _check_flags(stage, init, vision, crop_scale, lora, lora_mlp, train_decoder, batch_size)
        self.stage, self.seed, self.batch_size = stage, seed, batch_size
        self.metric, self.mode = ("loss", "min") if stage == 1 else ("accuracy", "max")
        self.lr, self.lora_lr, self.weight_decay = lr, lora_lr, weight_decay
        self._spec = dict(vision=vision, decoder=decoder, init=init, pixel_shuffle=pixel_shuffle, projector=projector,
                          train_vision=train_vision, lora=lora, lora_mlp=lora_mlp, train_decoder=train_decoder,
                          prompts=dict(caption_prompt=caption_prompt, caption_chat=caption_chat,
                                       vqa_prompt=vqa_prompt, vqa_chat=vqa_chat))
        self._built, self.tokenizer, self.frozen = self._make()
        model = self._built
        self.config, self.block = model.config, model.config.block_size
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.chat = (caption_chat_of if stage == 1 else vqa_chat_of)(model, self.tokenizer)
        proc = ImageProcessor.from_config(model.config)
        proc.crop_scale = (crop_scale, 1.0)  # captions and questions describe the whole scene: keep most of it
        proc.hflip = (stage == 1) if flip is None else flip  # VQA: "on the left" must stay on the left
        self.augment = crop_scale < 1 or proc.hflip
        views = views or (4 if stage == 1 else 1)
        train, val, self.val_source = _load(data, stage, val_data, image_root, limit, val_samples, seed)
        encode = None
        if self.frozen:
            model.vision.eval()
            encode = model.vision_features
        self.train_images = FeatureCache([x.image for x in train], proc, encode, views, seed, skip_bad_images,
                                         progress, "train")
        self.val_images = (FeatureCache([x.image for x in val], proc, encode, 1, seed, skip_bad_images, progress,
                                        "val") if val else self.train_images)
        self.samples = self._samples(train, self.train_images)
        if not self.samples:
            raise ValueError(f"{data}: no usable training examples (every prompt fills the "
                             f"{self.block}-token context, or every image was skipped)")
        self.val_set = self._samples(val, self.val_images, first_captions=True)[:val_samples] or \
            self.samples[:val_samples]  # no val split: a fixed slice of training (say so in summary)
        tok = self.tokenizer
        self.pad = tok.pad_id if tok.pad_id is not None and tok.pad_id != self.config.image_token_id else \
            end_id(tok, self.chat)
        self.sampler = EpochSampler(len(self.samples), batch_size, seed)

    # -- the model ---------------------------------------------------------------------------------
    def _make(self):
        """(VLM, tokenizer, tower frozen?), built the same way every time (seeded: LoRA and a fresh
        projector / tower start from the same weights for a fresh run and a resume)."""
        from ...models.vlm import LORA_ATTN, LORA_MLP, build_vlm

        s = self._spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if s["init"]:
                from ...generate.vlm import load_vlm

                vlm, tok, _ = load_vlm(s["init"])
                frozen = not bool(s["train_vision"])
                vlm.freeze(vision=frozen, decoder=True, projector=False)
            else:
                vlm, tok, frozen = build_vlm(s["vision"] or "vit-nano-cifar", s["decoder"], s["pixel_shuffle"],
                                             s["projector"], s["train_vision"])
            _set_prompts(vlm.config, **s["prompts"])
            if s["lora"]:  # adapters on the decoder's attention (and MLPs); the rest of the decoder stays frozen
                vlm.add_lora(r=s["lora"], alpha=2.0 * s["lora"], targets=LORA_ATTN + (LORA_MLP if s["lora_mlp"] else ()))
            if s["train_decoder"]:
                for p in vlm.decoder.parameters():
                    p.requires_grad_(True)
        if not any(p.requires_grad for p in vlm.parameters()):
            raise ValueError("nothing to train: every parameter is frozen")
        return vlm.train(), tok, frozen

    def checkpoint_keys(self, model: nn.Module) -> set[str]:
        """Checkpoints hold the projector, LoRA, a trainable tower and buffers, not the frozen
        decoder (540 MB of fp32 SmolLM2 at every save): build_model() rebuilds that on resume."""
        return trainable_state_keys(model)

    def build_model(self) -> nn.Module:
        model, self._built = self._built, None  # the one built in __init__ (its tower made the features)
        return model if model is not None else self._make()[0]

    def param_groups(self, model) -> list[dict] | None:
        """The one decay rule's groups, LoRA adapters split off with ``lr_scale = lora_lr / lr``."""
        if not self.lora_lr or self.lora_lr == self.lr:
            return None
        from ..optim import param_groups

        out = []
        for g in param_groups(model, self.weight_decay):
            for lora in (False, True):
                pick = [(n, p) for n, p in zip(g["names"], g["params"]) if ("lora_" in n) == lora]
                if pick:
                    out.append({"params": [p for _, p in pick], "names": [n for n, _ in pick],
                                "weight_decay": g["weight_decay"], "lr_scale": self.lora_lr / self.lr if lora else 1.0})
        return out

    # -- data --------------------------------------------------------------------------------------
    def _samples(self, items, images, first_captions: bool = False) -> list[tuple[int, list[int], list[int]]]:
        """(image row, prompt ids, target ids) per caption (stage 1) or question (stage 2); with
        ``first_captions`` every image's first caption comes first, then the seconds..."""
        from ...generate.vlm import caption_prompt_ids, question_prompt_ids, target_ids

        model, tok, chat, block = self._built, self.tokenizer, self.chat, self.block
        per_item = []
        for x in items:
            i = images.index.get(str(x.image))
            if i is None:  # an unreadable image, skipped
                continue
            if self.stage == 1:
                prompt = caption_prompt_ids(model, tok)
                per_item.append([(i, prompt, target_ids(tok, clean_caption(c), chat)) for c in x.captions])
            else:
                per_item.append([(i, question_prompt_ids(model, tok, x.question),
                                  target_ids(tok, majority_answer(x.answers), chat))])
        if first_captions:
            rounds = max(map(len, per_item), default=0)
            out = [s[k] for k in range(rounds) for s in per_item if len(s) > k]
        else:
            out = [s for group in per_item for s in group]
        return [s for s in out if len(s[1]) < block]  # a prompt that fills the context leaves no target

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, Any]:
        from ...data.image_cache import generator

        chunk = [self.samples[i] for i in self.sampler.indices(index)]
        ids, labels = collate(chunk, self.pad, self.block)
        n_tokens = int((labels[:, 1:] != IGNORE).sum())
        mine = shard(list(range(len(chunk))), rank, world)
        rows = [chunk[k][0] for k in mine]
        out: dict[str, Any] = {"input_ids": ids[mine], "labels": labels[mine], "scale": world / max(n_tokens, 1)}
        cache = self.train_images
        if cache.features is not None:
            v = cache.features.shape[1]
            views = (torch.randint(v, (len(chunk),), generator=generator(self.seed, 2, index))
                     if self.augment and v > 1 else torch.zeros(len(chunk), dtype=torch.long))
            out["image_features"] = cache.features[torch.tensor(rows, dtype=torch.long), views[mine]].float()
        elif self.augment:
            out["pixel_values"] = cache.augmented(rows, [(1, index, k) for k in mine])
        else:
            out["pixel_values"] = cache.data.pixels(rows)
        return out

    # -- objective ---------------------------------------------------------------------------------
    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        images = {k: batch[k] for k in ("image_features", "pixel_values") if k in batch}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        # VLM.forward with labels is the mean target-token loss (through DDP's forward); x n / (N / world)
        mean = model(batch["input_ids"], labels=batch["labels"], **images)
        return {"loss": mean * (n * batch["scale"])}

    def count(self, batch) -> int:
        return int(batch["input_ids"].shape[0])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean target-token loss over the fixed val set and (stage 2) its teacher-forced answer accuracy."""
        device = next(model.parameters()).device
        total, count, right = 0.0, 0, 0
        for s in range(0, len(self.val_set), self.batch_size):
            chunk = self.val_set[s:s + self.batch_size]
            ids, labels = collate(chunk, self.pad, self.block)
            inputs = {k: v.to(device) for k, v in self.val_images.eval_inputs([c[0] for c in chunk]).items()}
            logits, targets = model.labelled_logits(ids.to(device), labels=labels.to(device), **inputs)
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += len(targets)
            keep = labels[:, 1:] != IGNORE
            hit = torch.ones_like(keep)
            hit[keep] = (logits.argmax(-1) == targets).cpu()
            right += int(hit.all(-1).sum())
        out = {"loss": total / max(count, 1)}
        if self.stage == 2:
            out["accuracy"] = right / len(self.val_set)
        return out

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {"stage": self.stage, "train_samples": len(self.samples), "val_samples": len(self.val_set),
                "val_source": self.val_source, "trainable_params": self.trainable_params,
                "frozen_tower": self.frozen, "n_image_tokens": cfg.n_image_tokens}


# -- flags and data ------------------------------------------------------------------------------
def _check_flags(stage, init, vision, crop_scale, lora, lora_mlp, train_decoder, batch_size) -> None:
    if stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {stage}")
    if stage == 2 and not init and vision is None:
        raise ValueError("stage 2 starts from a stage-1 model (--init <stage-1 run or checkpoint>) or builds a fresh "
                         "one: pass --vision <tower preset or checkpoint> (a fresh tower trains with the projector)")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")
    if lora and train_decoder:
        raise ValueError("choose --lora (adapters on a frozen decoder) or --train-decoder (every weight), not both")
    if lora_mlp and not lora:
        raise ValueError("--lora-mlp adds MLP adapters to --lora's: give a --lora rank")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")


def _set_prompts(cfg, caption_prompt=None, caption_chat=None, vqa_prompt=None, vqa_chat=None) -> None:
    """The prompts the model is trained with go into its config, so inference asks the same way."""
    if caption_prompt is not None:
        if cfg.image_token not in caption_prompt:
            raise ValueError(f"--caption-prompt must contain the image placeholder {cfg.image_token!r}")
        cfg.caption_prompt = caption_prompt
    if caption_chat is not None:
        cfg.caption_chat = caption_chat
    if vqa_prompt is not None:
        if cfg.image_token not in vqa_prompt or "{question}" not in vqa_prompt:
            raise ValueError(f"--vqa-prompt must contain the image placeholder {cfg.image_token!r} and '{{question}}'")
        cfg.vqa_prompt = vqa_prompt
    if vqa_chat is not None:
        cfg.vqa_chat = vqa_chat


def _load(data, stage: int, val_data, image_root, limit: int, val_samples: int, seed: int):
    """(training items, val items, where val comes from): caption records (stage 1) or VQA
    examples (stage 2; a fixed random ``val_samples`` of the val split)."""
    if stage == 1:
        from ...data.captions import load_captions

        train = load_captions(data, "train", image_root)[:limit or None]
        if val_data is None and Path(data).is_dir():
            val_data = data
        val = load_captions(val_data, "val", image_root) if val_data else []
    else:
        from ...data.vqa import load_vqa

        train = load_vqa(data, "train", image_root)[:limit or None]
        try:
            val = load_vqa(val_data or data, "val", image_root)
        except FileNotFoundError:
            if val_data:
                raise
            val = []
        g = torch.Generator().manual_seed(seed + 1)
        val = [val[i] for i in torch.randperm(len(val), generator=g)[:val_samples].tolist()]
    return train, val, ("val split" if val else "training examples (no val split)")
