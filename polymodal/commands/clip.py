"""Dual-encoder commands: ``train-clip``, ``zero-shot``, ``retrieve``, ``eval-retrieval``.

* ``train-clip`` trains a CLIP / ALIGN-style dual encoder (Radford et al., 2021; Jia et al., 2021) with
  the symmetric InfoNCE or the sigmoid loss on the one Trainer (``polymodal/train/tasks/contrastive.py``;
  under torchrun the negatives are gathered from every rank).
* ``zero-shot`` classifies with prompt-ensembled class weights (CLIP sec. 3.1.4), ``retrieve`` ranks
  images for texts and captions for images (PNG grids), ``eval-retrieval`` reports R@1/5/10 both ways
  and the mean rank (``polymodal/eval/dual_encoder.py``, ``polymodal/eval/retrieval.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Sequence


def train_clip(data: str = "../shared/data/flickr8k", out: str = "runs/train-clip", val_data: str | None = None,
               image_root: str | None = None, image_tower: str = "vit",
               text_tower: Literal["minilm", "encoder", "clip_text"] = "minilm", lock_text: bool = True,
               lock_image: bool = True, tune_blocks: int = 0, tower_lr_scale: float = 0.1, image_views: int = 1,
               loss: Literal["infonce", "siglip"] = "infonce", image_size: int = 0, width: int = 192,
               depth: int = 4, text_width: int = 128, text_depth: int = 2, projection_dim: int = 128,
               epochs: float = 200.0, max_steps: int = 0, minutes: float = 0.0, eval_every: int = 250,
               batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.1, warmup: float = 50.0,
               max_images: int = 0, skip_bad_images: bool = True, patience: int = 0, seed: int = 0,
               device: str = "auto", dtype: Literal["auto", "bf16", "fp32"] = "auto",
               distributed: Literal["auto", "none", "ddp"] = "auto", threads: int = 0, compile: bool = False,
               progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a CLIP/ALIGN-style dual encoder on image-caption pairs (Flickr8k folder or COCO-captions JSON).

    ALIGN (EfficientNet + BERT-style text tower): --image-tower efficientnet-lite0 (ImageNet weights,
    LiT-locked: its features are computed once) with the default all-MiniLM-L6-v2 text tower.
    Multi-process: torchrun --nproc-per-node N -m polymodal.cli train-clip ... (each rank embeds
    batch_size / N pairs; the loss uses the negatives of all ranks, so N ranks = one process).

    Args:
        data: a Flickr8k-format folder (captions.txt, images/, train.txt, val.txt) or a COCO-captions .json
        out: run folder (model/ = the best val retrieval's model with its tokenizer, metrics.jsonl, checkpoints/)
        val_data: evaluation captions (default: the Flickr8k folder's val split; for JSON: 256 training images)
        image_root: image folder for a COCO JSON (default: beside the JSON or its images/)
        image_tower: vit or convnet (from scratch, sized by --width/--depth), or a pretrained tower: efficientnet-lite0, efficientnet-lite1, efficientnet-lite2 (ImageNet: ALIGN), a ViT/EfficientNet/CLIP checkpoint or train-vit/train-clip run, or a vision preset name (random init)
        text_tower: minilm (all-MiniLM-L6-v2, LiT-locked by default), encoder (small BERT) or clip_text
        lock_text: freeze a pretrained text tower (LiT); only its projection trains
        lock_image: freeze a pretrained image tower (LiT): its features are computed once; --no-lock-image fine-tunes it
        tune_blocks: partial fine-tuning: an unlocked pretrained tower trains only its last N blocks and what follows them (0 = all)
        tower_lr_scale: learning rate of the pretrained towers' trainable weights, as a multiple of --lr
        image_views: views per image cached from a locked image tower: the centre crop, plus N-1 random crops and flips
        loss: infonce (CLIP) or siglip (sigmoid)
        image_size: input resolution (0 = the tower's own: 64 for vit/convnet, 224 for efficientnet-lite0; a conv tower takes any)
        width: image tower width (ViT n_embd / last conv stage)
        depth: image tower depth (ViT blocks / conv stages)
        text_width: width of a text tower trained from scratch
        text_depth: blocks of a text tower trained from scratch
        projection_dim: dimension of the joint embedding space
        epochs: passes over the training images (200: ~2,200 steps on the 693 default images; used when --max-steps is 0; --minutes may end the run first)
        max_steps: optimizer steps (0 = --epochs)
        minutes: wall-clock budget; the cosine schedule is fitted to it (0 = no limit)
        eval_every: steps between val retrieval evaluations and checkpoints (0 = once per epoch; the run's end is always evaluated)
        batch_size: pairs per step, the negatives of each pair (split over ranks under torchrun)
        lr: peak AdamW learning rate
        weight_decay: AdamW decay of weight matrices (never of the temperature, norms, biases, positions)
        warmup: linear warm-up: steps (>= 1) or a fraction of the planned steps (< 1)
        max_images: use only the first N training images (0 = all)
        skip_bad_images: skip unreadable images with one warning giving their count (--no-skip-bad-images: stop at the first)
        patience: stop after this many evaluations without a better mean recall (0 = never)
        seed: initialisation, batch order, caption choice and crop seed
        device: auto (CUDA when present), cpu, cuda, cuda:N
        dtype: auto (bf16 autocast where native), bf16 or fp32
        distributed: auto (DDP under torchrun), none or ddp
        threads: torch CPU threads (0 = torch's default)
        compile: torch.compile the model
        progress: show progress bars (image decoding, feature caching, then training)
        resume: continue the run in --out from its latest checkpoint
        overwrite: start over in an --out that already holds checkpoints
    """
    flags = dict(locals())
    from ..train.tasks.contrastive import ContrastiveTask, feature_device
    from ..train.trainer import run

    main = int(os.environ.get("RANK", "0")) == 0
    if threads:  # the feature caches are computed before the Trainer sets it
        import torch

        torch.set_num_threads(threads)
    model = dict(image_tower=image_tower, text_tower=text_tower, image_size=image_size, width=width, depth=depth,
                 text_width=text_width, text_depth=text_depth, projection_dim=projection_dim, lock_text=lock_text,
                 lock_image=lock_image, tune_blocks=tune_blocks)
    task = ContrastiveTask(data, val_data, image_root, model, batch_size, loss, max_images, skip_bad_images, seed,
                           progress and main, tokenizer=_resumed_tokenizer(out) if resume else None,
                           image_views=image_views, tower_lr_scale=tower_lr_scale, weight_decay=weight_decay,
                           device=feature_device(device))
    s = run(task, flags, beta2=0.98)  # CLIP sec. 2.5: Adam beta2 0.98
    last = s["last"] or {}
    result = {**task.summary(), "steps": s["step"], "stop_reason": s["stop_reason"], "seconds": s["elapsed_s"],
              "best_mean_recall": s["best"], "best_step": s["best_step"], "val": last, "out": out, "model": s["model"]}
    if main:
        print(f"train-clip: {s['step']} steps in {s['elapsed_s']:.0f}s; {task.eval_split} t2i R@5 "
              f"{100 * last.get('t2i_R@5', 0):.1f}% (chance {100 * last.get('chance_t2i_R@5', 0):.1f}%), i2t R@5 "
              f"{100 * last.get('i2t_R@5', 0):.1f}%; best model in {s['model']}")
    return result


def _resumed_tokenizer(out: str):
    """A resumed run keeps its own tokenizer (the BPE trained on its captions), from its newest checkpoint."""
    from ..interop import resolve_model_path
    from ..tokenizers import Tokenizer

    ck = Path(out) / "checkpoints" / "latest"
    folder = resolve_model_path(ck) if ck.is_file() else None
    return Tokenizer.load(folder) if folder is not None and (folder / "tokenizer.json").is_file() else None


def eval_retrieval(model: str, data: str = "../shared/data/flickr8k", split: str = "val",
                   image_root: str | None = None, json_out: str | None = None, skip_bad_images: bool = False) -> dict:
    """Image-text retrieval: R@1/5/10 in both directions, mean rank and MRR, with chance levels.

    Args:
        model: a dual-encoder model folder or train-clip run folder
        data: a Flickr8k-format folder or a COCO-captions .json
        split: the Flickr8k split (train, val, all)
        image_root: image folder for a COCO JSON (default: beside the JSON or its images/)
        json_out: also write the metrics here
        skip_bad_images: skip unreadable images (one warning with their count) instead of stopping
    """
    from ..eval.retrieval import format_metrics
    from ..eval.vision import evaluate_retrieval

    m = evaluate_retrieval(model, data, split, image_root, skip_bad_images)
    print(format_metrics(m))
    if json_out:
        Path(json_out).write_text(json.dumps(m, indent=1))
    return m


def _read_list(values: Sequence[str] | None) -> list[str] | None:
    """A list given on the command line ('a,b,c' or several values), or one file with an item per line."""
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        from ..data.textio import read_utf8

        return [s.strip() for s in read_utf8(Path(values[0])).splitlines() if s.strip()]
    if len(values) == 1 and "," in values[0]:
        return [s.strip() for s in values[0].split(",") if s.strip()]
    return list(values)


def zero_shot(model: str, images: str = "../shared/data/cifar10", classes: list[str] | None = None,
              templates: list[str] | None = None, split: str = "val", batch_size: int = 64,
              json_out: str | None = None, skip_bad_images: bool = False) -> dict:
    """Zero-shot image classification with prompt templates ensembled per class.

    Args:
        model: a dual-encoder model folder or train-clip run folder
        images: a folder of class sub-folders, a flat folder, a 'path<TAB>class' TSV, or a dataset folder with <split>.tsv (CIFAR-10)
        classes: class names (a list, 'a,b,c', or a file with one per line); default: the labels in the data
        templates: prompt templates with '{}' (a list or a file); default: CLIP's CIFAR templates
        split: which <split>.tsv of a dataset folder
        batch_size: images per forward pass
        json_out: write accuracy and per-image predictions here
        skip_bad_images: skip unreadable images (one warning with their count) instead of stopping
    """
    from ..data.captions import load_labeled_images
    from ..data.images import load_images
    from ..eval.dual_encoder import DEFAULT_TEMPLATES, zero_shot_probs
    from ..models.dual_encoder import load_dual_encoder

    net, tok, proc = load_dual_encoder(model)
    paths, labels = load_labeled_images(images, split)
    names = _read_list(classes) or (sorted(set(labels)) if labels else None)
    if not names:
        raise ValueError(f"{images}: no labels found; pass --classes")
    temps = _read_list(templates) or list(DEFAULT_TEMPLATES)
    pil, keep = load_images(paths, skip_bad_images)
    probs = zero_shot_probs(net, tok, proc, pil, names, temps, batch_size)
    pred = probs.argmax(dim=-1).tolist()
    result: dict = {"classes": names, "n_templates": len(temps), "n_images": len(keep),
                    "predictions": [{"image": str(paths[i]), "pred": names[p], "prob": round(probs[r, p].item(), 4)}
                                    for r, (i, p) in enumerate(zip(keep, pred))]}
    if labels:
        gold = [labels[i] for i in keep]
        unknown = sorted(set(gold) - set(names))
        if unknown:
            raise ValueError(f"{images}: labels {unknown} are not among the classes {names}")
        result["accuracy"] = sum(names[p] == g for p, g in zip(pred, gold)) / len(gold)
        result["chance"] = 1 / len(names)
        print(f"zero-shot accuracy {100 * result['accuracy']:.1f}% on {len(gold)} images "
              f"({len(names)} classes, {len(temps)} templates; chance {100 * result['chance']:.1f}%)")
    else:
        for r in result["predictions"]:
            print(f"{r['image']}\t{r['pred']}\t{r['prob']:.3f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result


def _gallery(data: str, split: str, image_root: str | None, captions: str | None):
    """(gallery image paths, candidate captions) of a caption dataset, or of an image folder / TSV."""
    from ..data.captions import load_captions, load_labeled_images

    p = Path(data)
    if p.suffix.lower() == ".json" or (p.is_dir() and (p / "captions.txt").is_file()):
        recs = load_captions(p, split, image_root)
        return [r.image for r in recs], [c for r in recs for c in r.captions]
    return load_labeled_images(p, split)[0], (_read_list([captions]) if captions else [])


def retrieve(model: str, data: str = "../shared/data/flickr8k", text: list[str] | None = None,
             image: list[str] | None = None, captions: str | None = None, split: str = "val", k: int = 5,
             out: str = "retrieval.png", image_root: str | None = None) -> dict:
    """Text->image and image->text search: top-k results, written as a PNG grid.

    Args:
        model: a dual-encoder model folder or train-clip run folder
        data: the gallery: a Flickr8k-format folder / COCO-captions .json (images and their captions) or an image folder / TSV
        text: text queries (ranked against the gallery images)
        image: query image files (ranked against the gallery captions)
        captions: a file of candidate captions, one per line, for image queries on an image-folder gallery
        split: the Flickr8k split used as gallery
        k: results per query
        out: the PNG grid (text queries; image queries go to <out stem>_i2t.png when both are given)
        image_root: image folder for a COCO JSON (default: beside the JSON or its images/)
    """
    from ..data.images import load_image
    from ..eval.dual_encoder import search_images, search_texts
    from ..models.dual_encoder import load_dual_encoder
    from ..viz.retrieval_grid import image_to_text_grid, text_to_image_grid

    if not text and not image:
        raise ValueError("give at least one --text query or --image query")
    net, tok, proc = load_dual_encoder(model)
    gallery, texts = _gallery(data, split, image_root, captions)
    if image and not texts:
        raise ValueError("image queries need candidate captions: a caption dataset as --data or --captions FILE")
    result: dict = {"grids": []}
    if text:
        gal = [load_image(g) for g in gallery]
        idx, sc = search_images(net, tok, proc, text, gal, k)
        result["text_to_image"] = [{"query": q, "results": [{"image": str(gallery[j]), "score": round(v, 4)}
                                                           for j, v in zip(js, vs)]} for q, js, vs in zip(text, idx, sc)]
        result["grids"].append(str(text_to_image_grid(text, gal, idx, sc, out)))
    if image:
        q_ims = [load_image(x) for x in image]
        idx, sc = search_texts(net, tok, proc, q_ims, texts, k)
        result["image_to_text"] = [{"query": str(x), "results": [{"text": texts[j], "score": round(v, 4)}
                                                                for j, v in zip(js, vs)]} for x, js, vs in zip(image, idx, sc)]
        grid = Path(out) if not text else Path(out).with_name(Path(out).stem + "_i2t.png")
        result["grids"].append(str(image_to_text_grid(q_ims, texts, idx, sc, grid)))
    for key in ("text_to_image", "image_to_text"):
        for r in result.get(key, []):
            print(f"{r['query']}:")
            for n, hit in enumerate(r["results"], 1):
                print(f"  {n}. {hit.get('image', hit.get('text'))}  ({hit['score']:.3f})")
    print("wrote " + ", ".join(result["grids"]))
    return result
