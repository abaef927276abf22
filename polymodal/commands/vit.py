"""``polymodal train-vit`` (a ViT from scratch on a labelled image folder, on the one Trainer) and
``polymodal linear-probe`` (logistic regression on a frozen image tower's features).

The train-vit recipe leans on regularisation, as a ViT trained on 1,000 images must (DeiT, Touvron et
al., 2021): random crops and flips, RandAugment-lite, Mixup / CutMix and label smoothing
(``polymodal/data/augment.py``), AdamW with weight decay 0.05, linear warm-up then cosine decay over
the epochs or the ``--minutes`` budget; the best val accuracy's model goes to ``<out>/model``
(``polymodal/train/tasks/image_classify.py``). The linear probe is CLIP's (Radford et al., 2021,
appendix A.3; ``polymodal/eval/vision.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal


def train_vit(data: str = "../shared/data/cifar10", out: str = "runs/train-vit", preset: str = "vit-tiny-cifar-conv",
              n_embd: int | None = None, n_layer: int | None = None, n_head: int | None = None,
              intermediate_size: int | None = None, patch_size: int | None = None,
              pool: Literal["cls", "mean"] | None = None, dropout: float | None = None,
              epochs: float = 300.0, max_steps: int = 0, minutes: float = 0.0, eval_every: int = 80,
              batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, warmup: float = 80.0,
              label_smoothing: float = 0.1, crop_pad: int = 4, randaugment: int = 1, ra_magnitude: float = 5.0,
              mix_prob: float = 0.2, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, flip_tta: bool = True,
              val_fraction: float = 0.1, skip_bad_images: bool = True, patience: int = 0, grad_accum: int = 1,
              seed: int = 0, device: str = "auto", dtype: Literal["auto", "bf16", "fp32"] = "auto",
              distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto", threads: int = 0, compile: bool = False,
              progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a ViT classifier from scratch on a labelled image folder (CIFAR-10 format or class sub-folders).

    Args:
        data: a folder with train.tsv/val.tsv (../shared/data/cifar10), with train/ and val/ class folders, or of class sub-folders
        out: run folder (model/ = the best evaluation's model, metrics.jsonl, curve.png, checkpoints/, summary.json)
        preset: ViT preset (vit-tiny-cifar-conv, vit-tiny-cifar, vit-nano-cifar, ...); the flags below override its fields
        n_embd: width
        n_layer: number of transformer blocks
        n_head: attention heads
        intermediate_size: MLP hidden size
        patch_size: patch side in pixels
        pool: cls (class token) or mean (average of the patch tokens)
        dropout: dropout rate
        epochs: passes over the training set (used when --max-steps is 0; --minutes may end the run first)
        max_steps: optimizer steps (0 = --epochs)
        minutes: wall-clock budget; the cosine schedule is fitted to it (0 = no limit)
        eval_every: steps between val evaluations and checkpoints (80 = 5 epochs of 1,000 images at batch 64; 0 = once per epoch)
        batch_size: images per optimizer step (split over ranks under torchrun)
        lr: peak AdamW learning rate
        weight_decay: AdamW decay of weight matrices (never of norms, biases, positions, the class token)
        warmup: linear warm-up: steps (>= 1) or a fraction of the planned steps (< 1)
        label_smoothing: probability mass spread over all classes
        crop_pad: random-crop padding in pixels (0 = no crop)
        randaugment: RandAugment ops per image (0 = off)
        ra_magnitude: RandAugment magnitude on the 0-10 scale
        mix_prob: probability that a batch is mixed (Mixup or CutMix, 50/50)
        mixup_alpha: Beta(a, a) of Mixup
        cutmix_alpha: Beta(a, a) of CutMix
        flip_tta: score val images as the mean logits of the image and its mirror
        val_fraction: share of each class held out when the folder has no val split
        skip_bad_images: skip unreadable images with one warning giving their count (--no-skip-bad-images: stop at the first)
        patience: stop after this many evaluations without a better val accuracy (0 = never)
        grad_accum: micro-batches of --batch-size accumulated per optimizer step
        seed: initialisation, batch order and augmentation seed
        device: auto (CUDA when present), cpu, cuda, cuda:N
        dtype: auto (bf16 autocast where native), bf16 or fp32
        distributed: auto (DDP under torchrun), none, ddp or fsdp
        threads: torch CPU threads (0 = torch's default)
        compile: torch.compile the model
        progress: show progress bars (image decoding, then training)
        resume: continue the run in --out from its latest checkpoint
        overwrite: start over in an --out that already holds checkpoints
    """
    flags = dict(locals())
    from ..data.augment import AugmentConfig
    from ..train.tasks.image_classify import ImageClassifyTask
    from ..train.trainer import run

    main = int(os.environ.get("RANK", "0")) == 0
    aug = AugmentConfig(crop_pad=crop_pad, randaugment=randaugment, ra_magnitude=ra_magnitude, mix_prob=mix_prob,
                        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing)
    overrides = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, intermediate_size=intermediate_size,
                     patch_size=patch_size, pool=pool, dropout=dropout)
    task = ImageClassifyTask(data, preset, overrides, batch_size, aug, flip_tta, val_fraction, skip_bad_images, seed,
                             progress and main)
    s = run(task, flags)
    info = task.summary()
    result = {**info, "steps": s["step"], "epochs": round(s["step"] * grad_accum / task.steps_per_epoch(), 2),
              "stop_reason": s["stop_reason"], "seconds": s["elapsed_s"], "best_val_accuracy": s["best"],
              "best_step": s["best_step"], "final_val_accuracy": (s["last"] or {}).get("accuracy"),
              "params": sum(p.numel() for p in task.build_model().parameters()), "config": task.config.to_dict(),
              "out": out, "model": s["model"]}
    if main:
        print(f"train-vit: best val accuracy {100 * result['best_val_accuracy']:.1f}% (step {s['best_step']}), "
              f"last {100 * (result['final_val_accuracy'] or 0):.1f}% (chance {100 * info['chance']:.0f}%), "
              f"{s['step']} steps in {s['elapsed_s']:.0f}s; best model in {s['model']}")
    return result


def linear_probe(model: str, data: str = "../shared/data/cifar10", c_values: list[float] | None = None,
                 holdout: float = 0.2, max_iter: int = 2000, batch_size: int = 256, val_fraction: float = 0.1,
                 seed: int = 0, threads: int = 0, json_out: str | None = None) -> dict:
    """Linear probe: frozen image-tower features -> logistic regression, C chosen on a held-out part of train.

    Args:
        model: a dual-encoder model or train-clip run (its image tower), a ViT model or train-vit run, or efficientnet-lite0/1/2 (pooled features)
        data: a labelled image folder (as for train-vit)
        c_values: the inverse regularisation strengths to sweep (default 1e-3 ... 1e3, 13 values)
        holdout: share of each training class used to choose C (then refit on all of train)
        max_iter: L-BFGS iterations
        batch_size: images per forward pass
        val_fraction: share of each class held out when the folder has no val split
        seed: split seed
        threads: torch CPU threads (0 = torch's default)
        json_out: also write the result here
    """
    import torch

    from ..eval.vision import linear_probe_eval

    if threads:
        torch.set_num_threads(threads)
    r = linear_probe_eval(model, data, c_values, holdout, max_iter, batch_size, val_fraction, seed)
    print(f"linear probe ({r['tower']}, {r['feature_dim']}-d features): val accuracy {100 * r['accuracy']:.1f}% on "
          f"{r['n_val']} images (C={r['C']:g} chosen on {r['n_holdout']} held-out train images; "
          f"chance {100 * r['chance']:.1f}%)")
    if json_out:
        Path(json_out).write_text(json.dumps(r, indent=1))
    return r
