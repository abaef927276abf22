"""Dual-encoder commands: ``train-clip``, ``zero-shot``, ``retrieve``, ``eval-retrieval``.

* ``train-clip`` trains a CLIP / ALIGN-style dual encoder (Radford et al., 2021;
  Jia et al., 2021) with the symmetric InfoNCE or the sigmoid loss
  (``polymodal.models.contrastive``) on Flickr8k-format folders or COCO-captions JSON.
* ``zero-shot`` classifies with text prompts (CLIP sec. 3.1.4): each class's
  weight is the normalised mean of its normalised prompt embeddings over the
  templates ("prompt ensembling"), and an image's class is the argmax cosine.
* ``retrieve`` ranks images for text queries and captions for image queries and
  writes a PNG grid; ``eval-retrieval`` reports R@1/5/10 both ways and the mean rank
  (``polymodal.eval.retrieval.retrieval_metrics``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's CIFAR-10 prompt templates (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, CIFAR list).
DEFAULT_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a low contrast photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


# ---------------------------------------------------------------------------------------
# model helpers
# ---------------------------------------------------------------------------------------
def load_clip(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, image processor) of a polymodal dual-encoder folder."""
    from .data.images import ImageProcessor
    from .models.registry import load_model
    from .tokenizers import Tokenizer

    path = Path(path)
    model = load_model(path, device=device)
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise ValueError(f"{path}: not a dual-encoder checkpoint (family {model.config.family!r})")
    return model, Tokenizer.load(path), ImageProcessor.from_config(model.config)


def _text_limit(model) -> int:
    c = model.config.text
    return int(getattr(c, "block_size", 77))


def tokenize(model, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) for the model's text tower.

    A CLIP text tower is read out at its end-of-text token, so one is appended (and kept
    when truncating); an Encoder tower uses the tokenizer's own specials ([CLS] ... [SEP])."""
    limit = _text_limit(model)
    family = model.config.text.family
    rows = []
    for t in texts:
        if family == "clip_text":
            eos = model.config.text.eos_token_id if model.config.text.eos_token_id not in (None, 2) else tokenizer.eos_id
            ids = tokenizer.encode(t, add_special_tokens=True)
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
            ids = ids[:limit - 1] + [eos] if len(ids) > limit else ids
        else:
            ids = tokenizer.encode(t, add_special_tokens=True)[:limit]
        rows.append(ids or [tokenizer.pad_id or 0])
    longest = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (n, projection_dim)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize(model, tokenizer, texts[s:s + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device), normalize=True).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)


@torch.no_grad()
def encode_images(model, processor, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings (n, projection_dim) of PIL images or paths."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        px = processor(list(images[s:s + batch_size])).to(device)
        out.append(model.encode_image(px, normalize=True).float().cpu())
    return torch.cat(out)


def zero_shot_weights(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(n_classes, D) classifier: per class, the renormalised mean of its normalised prompt
    embeddings over the templates (CLIP's prompt ensembling, in embedding space)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a '{}' placeholder for the class name")
    weights = []
    for name in classnames:
        e = encode_texts(model, tokenizer, [t.format(name) for t in templates])
        weights.append(F.normalize(e.mean(dim=0), dim=-1))
    return torch.stack(weights)


# ---------------------------------------------------------------------------------------
# building a model for training
# ---------------------------------------------------------------------------------------
def _image_tower(kind: str, image_size: int, width: int, depth: int) -> dict:
    from .data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    prep = dict(image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample="bicubic",
                resize_mode="shortest", center_crop=True)
    if kind == "vit":
        patch = max(image_size // 8, 1)
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be a multiple of 8 for the ViT tower")
        heads = max(width // 64, 1) if width % 64 == 0 else (4 if width % 4 == 0 else 1)
        return dict(family="vit", image_size=image_size, patch_size=patch, n_embd=width, n_layer=depth,
                    n_head=heads, intermediate_size=2 * width, activation="gelu", norm_eps=1e-5, pre_norm=True,
                    final_norm="pooled", pool="cls", patch_bias=False, **prep)
    if kind == "convnet":
        widths = tuple(max(8, (width >> (depth - 1 - i)) // 8 * 8) for i in range(depth))
        return dict(family="convnet", image_size=image_size, widths=widths, **prep)
    raise ValueError(f"image_tower must be 'vit' or 'convnet', got {kind!r}")


def _caption_tokenizer(texts: Sequence[str], vocab_size: int):
    from .tokenizers import Tokenizer, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(list(texts), vocab_size, special_tokens=("<pad>", "<|endoftext|>"))
    return Tokenizer.from_tokenizers(bpe.backend, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", kind="bpe")


def build_dual_encoder(image_tower: str, text_tower: str, texts: Sequence[str], image_size: int = 64,
                       width: int = 192, depth: int = 4, text_width: int = 128, text_depth: int = 2,
                       projection_dim: int = 128, loss: str = "infonce", lock_text: bool = True,
                       vocab_size: int = 2048, minilm: str | None = None):
    """(CLIP model, tokenizer). ``text_tower``: "minilm" (all-MiniLM-L6-v2, locked unless
    ``lock_text=False``: LiT), "encoder" (a small BERT + BPE from the captions) or
    "clip_text" (a small causal CLIP text transformer + BPE)."""
    from .models.clip import CLIP, CLIPConfig
    from .models.contrastive import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, minilm_text_tower

    vision = _image_tower(image_tower, image_size, width, depth)
    scale = dict(logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT) if loss == "siglip" else {}
    heads = max(text_width // 32, 1)
    if text_tower == "minilm":
        tower, tok = minilm_text_tower(minilm, locked=lock_text)
        text = tower.config.to_dict()
    elif text_tower in ("encoder", "clip_text"):
        tok = _caption_tokenizer(texts, vocab_size)
        if text_tower == "encoder":
            enc = dict(family="encoder", vocab_size=tok.vocab_size, block_size=64, n_layer=text_depth, n_head=heads,
                       n_embd=text_width, intermediate_size=2 * text_width, dropout=0.0, pooler=False,
                       pad_token_id=tok.pad_id)
            text = dict(family="encoder_tower", encoder=enc, locked=False)
        else:
            text = dict(family="clip_text", vocab_size=tok.vocab_size, block_size=64, n_embd=text_width,
                        n_layer=text_depth, n_head=heads, intermediate_size=2 * text_width, activation="gelu",
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        tower = None
    else:
        raise ValueError(f"text_tower must be 'minilm', 'encoder' or 'clip_text', got {text_tower!r}")
    config = CLIPConfig(name=f"{image_tower}+{text_tower}", vision=vision, text=text, projection_dim=projection_dim,
                        **scale)
    model = CLIP(config)
    if tower is not None:
        model.text.load_state_dict(tower.state_dict())
        if lock_text:
            model.text.lock()
    return model, tok


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def train_clip(data: str = "../shared/data/flickr8k", out: str = "out/clip", val_data: str | None = None,
               image_root: str | None = None, image_tower: Literal["vit", "convnet"] = "vit",
               text_tower: Literal["minilm", "encoder", "clip_text"] = "minilm", lock_text: bool = True,
               loss: Literal["infonce", "siglip"] = "infonce", image_size: int = 64, width: int = 192,
               depth: int = 4, text_width: int = 128, text_depth: int = 2, projection_dim: int = 128,
               batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.1, warmup: int = 50,
               max_steps: int = 2000, time_budget: float = 0.0, eval_every: int = 0, max_images: int = 0,
               skip_bad_images: bool = False, seed: int = 0, threads: int = 0, progress: bool = True,
               distributed: Literal["none", "ddp"] = "ddp") -> dict:
    """Train a CLIP/ALIGN-style dual encoder on image-caption pairs (Flickr8k folder or COCO-captions JSON).

    Multi-process: ``torchrun --nproc-per-node N -m polymodal.cli train-clip ...`` (gloo on CPU).
    Every rank embeds batch_size / N pairs of the same global batch, the loss uses the negatives
    of all ranks (``polymodal.models.contrastive.gather_features``) and DDP averages the gradients,
    so N ranks take the same steps as one process with the whole batch.

    Args:
        data: a Flickr8k-format folder (captions.txt, images/, train.txt, val.txt) or a COCO-captions .json.
        out: checkpoint folder (config.json, model.safetensors, tokenizer, train_log.json).
        val_data: evaluation captions (default: the Flickr8k folder's val split; none for JSON).
        image_root: image folder for a COCO JSON (default: beside the JSON or its images/).
        image_tower: vit or convnet (ALIGN-style).
        text_tower: minilm (all-MiniLM-L6-v2, LiT-locked by default), encoder (small BERT) or clip_text.
        lock_text: freeze a pretrained text tower (LiT); only its projection trains.
        loss: infonce (CLIP) or siglip (sigmoid).
        image_size: input resolution of the image tower.
        width: image tower width (ViT n_embd / last conv stage).
        depth: image tower depth (ViT blocks / conv stages).
        batch_size: pairs per step (the negatives of each pair).
        time_budget: stop after this many minutes (0 = no limit).
        eval_every: steps between validation retrieval evaluations and checkpoints (0 = end only).
        max_images: use only the first N training images (0 = all).
        skip_bad_images: warn and skip unreadable images instead of stopping.
        threads: torch CPU threads (0 = torch's default).
        distributed: ddp joins the process group when launched by torchrun (no effect in a single process); none never does.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from .data.captions import CaptionDataset, load_captions
    from .data.images import ImageProcessor
    from .eval.retrieval import format_metrics
    from .models.contrastive import contrastive_objective
    from .models.registry import save_model
    from .train import distributed as D

    if threads:
        torch.set_num_threads(threads)
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = D.setup(distributed, device="cpu")
    torch.manual_seed(seed)
    records = load_captions(data, "train", image_root)
    if max_images:
        records = records[:max_images]
    if val_data is None and Path(data).is_dir():
        val_data = data
    val_records = load_captions(val_data, "val", image_root) if val_data else None
    texts = [c for r in records for c in r.captions]
    model, tok = build_dual_encoder(image_tower, text_tower, texts, image_size, width, depth, text_width, text_depth,
                                    projection_dim, loss, lock_text)
    proc = ImageProcessor.from_config(model.config)
    proc.crop_scale = (0.5, 1.0)  # captions describe the whole scene: keep most of it
    train_set = CaptionDataset(records, proc, skip_bad=skip_bad_images)
    val_set = CaptionDataset(val_records, proc, skip_bad=skip_bad_images) if val_records else None
    if len(train_set) < 2:
        raise ValueError("contrastive training needs at least 2 images")
    batch_size = min(batch_size, len(train_set))
    if batch_size % info.world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {info.world} processes")
    local = batch_size // info.world  # this rank's slice of every global batch

    # A locked text tower is a fixed function: embed every caption once instead of every step.
    text_cache = None
    if getattr(model.config.text, "locked", False):
        all_caps = sorted({c for r in train_set.records for c in r.captions})
        model.text.eval()
        with torch.no_grad():
            feats = []
            for s in range(0, len(all_caps), 256):
                ids, mask = tokenize(model, tok, all_caps[s:s + 256])
                feats.append(model.text.encode(ids, mask))
        text_cache = dict(zip(all_caps, torch.cat(feats)))

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on gains, biases, temperature
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 0 (CLIP sec. 2.5)
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        if time_budget:  # whichever runs out first, steps or time, ends the cosine at 0
            frac = max(frac, now / (60 * time_budget))
        return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, frac)))

    # Only the image order comes from this generator (identical on every rank); each image's crop and
    # caption come from its own seed (seed, step, position in the global batch), so a batch looks
    # the same however it is split over ranks.
    gen = torch.Generator().manual_seed(seed)
    pair_encoder = D.wrap(_PairEncoder(model), info)  # DDP: gradients averaged over ranks in backward
    log: dict = {"losses": [], "evals": [], "config": model.config.to_dict()}
    start = time.perf_counter()
    step, order, pos = 0, torch.randperm(len(train_set), generator=gen).tolist(), 0
    bar = tqdm(total=max_steps, disable=not progress or not info.is_main, desc="train-clip", dynamic_ncols=True)

    def elapsed() -> float:  # rank 0's clock, so every rank agrees on the learning rate and on stopping
        t = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        if info.active:
            dist.broadcast(t, src=0)
        return float(t)

    def evaluate() -> dict | None:
        if val_set is None or not info.is_main:
            return None
        model.eval()
        m = _retrieval_on(model, tok, val_set)
        model.train()
        m["step"] = step
        log["evals"].append(m)
        if progress:
            tqdm.write(f"step {step}\n" + format_metrics(m))
        return m

    model.train()
    while step < max_steps:
        now = elapsed() if time_budget else 0.0
        if time_budget and now > 60 * time_budget:
            break
        if pos + batch_size > len(order):  # epoch boundary: reshuffle, never repeat an image in a batch
            order, pos = torch.randperm(len(train_set), generator=gen).tolist(), 0
        first = pos + info.rank * local
        idx = order[first:first + local]
        pos += batch_size
        pxs, caps = [], []
        for j, i in enumerate(idx):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, first + j]).generate_state(1)[0]))
            px_j, cap_j = train_set.batch([i], g)
            pxs.append(px_j)
            caps += cap_j
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        cached = torch.stack([text_cache[c] for c in caps]) if text_cache is not None else None
        ids, mask = tokenize(model, tok, caps) if cached is None else (None, None)
        img, txt = pair_encoder(torch.cat(pxs), ids, mask, cached)
        loss_v = contrastive_objective(model, img, txt, loss)  # negatives gathered from every rank
        opt.zero_grad(set_to_none=True)
        loss_v.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        model.clamp_logit_scale()
        step += 1
        log["losses"].append(round(loss_v.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v.item():.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}")
        if eval_every and step % eval_every == 0 and step < max_steps and info.is_main:
            evaluate()
            save_model(model, out, tok)
    bar.close()
    log["steps"], log["seconds"] = step, round(time.perf_counter() - start, 2)
    log["world_size"] = info.world
    final = evaluate()
    log["final"] = final
    if info.is_main:
        save_model(model, out, tok)
        (Path(out) / "train_log.json").write_text(json.dumps(log, indent=1))
    D.barrier(info)  # no rank returns before the checkpoint exists
    if owns_group:
        D.cleanup(info)
    return {"steps": step, "seconds": log["seconds"], "loss": log["losses"][-1] if log["losses"] else None,
            "first_loss": log["losses"][0] if log["losses"] else None, "val": final, "out": str(out)}


class _PairEncoder(torch.nn.Module):
    """The image and text embeddings of a batch in one ``forward``: DDP synchronises the
    gradients of what runs through its wrapped module's forward. A locked text tower's
    features come precomputed (``cached``), then only the text projection runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, cached):
        img = self.model.encode_image(pixel_values)
        if cached is not None:
            return img, self.model.text_projection(cached)
        return img, self.model.encode_text(input_ids, attention_mask)


def _retrieval_on(model, tokenizer, dataset) -> dict:
    from .eval.retrieval import retrieval_metrics

    img = encode_images(model, dataset.processor, dataset.images)
    texts, owner = dataset.all_texts()
    txt = encode_texts(model, tokenizer, texts)
    return retrieval_metrics(img @ txt.t(), owner)


def retrieval_scores(model_path: str, data: str, split: str = "val", image_root: str | None = None,
                     skip_bad_images: bool = False):
    """(scores (n_images, n_texts), text_to_image, dataset) of a checkpoint on a caption set,
    the input of ``polymodal.eval.retrieval.retrieval_metrics``."""
    from .data.captions import CaptionDataset, load_captions

    model, tok, proc = load_clip(model_path)
    ds = CaptionDataset(load_captions(data, split, image_root), proc, skip_bad=skip_bad_images)
    img = encode_images(model, proc, ds.images)
    texts, owner = ds.all_texts()
    return img @ encode_texts(model, tok, texts).t(), owner, ds


def eval_retrieval(model: str, data: str = "../shared/data/flickr8k", split: str = "val",
                   image_root: str | None = None, json_out: str | None = None, skip_bad_images: bool = False) -> dict:
    """Image-text retrieval: R@1/5/10 in both directions, mean rank and MRR, with chance levels.

    Args:
        model: a dual-encoder checkpoint folder.
        data: a Flickr8k-format folder or a COCO-captions .json.
        split: the Flickr8k split (train, val, all).
        json_out: also write the metrics here.
    """
    from .eval.retrieval import format_metrics, retrieval_metrics

    scores, owner, _ = retrieval_scores(model, data, split, image_root, skip_bad_images)
    m = retrieval_metrics(scores, owner)
    print(format_metrics(m))
    if json_out:
        Path(json_out).write_text(json.dumps(m, indent=1))
    return m


def _read_list(values: Sequence[str] | None) -> list[str] | None:
    """A list given on the command line, or one file with an item per line."""
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        return [s.strip() for s in Path(values[0]).read_text(encoding="utf-8").splitlines() if s.strip()]
    if len(values) == 1 and "," in values[0]:
        return [s.strip() for s in values[0].split(",") if s.strip()]
    return list(values)


def zero_shot(model: str, images: str = "../shared/data/cifar10", classes: list[str] | None = None,
              templates: list[str] | None = None, split: str = "val", batch_size: int = 64,
              json_out: str | None = None, skip_bad_images: bool = False) -> dict:
    """Zero-shot image classification with prompt templates ensembled per class.

    Args:
        model: a dual-encoder checkpoint folder.
        images: a folder of class sub-folders, a flat folder, a 'path<TAB>class' TSV, or a dataset folder with <split>.tsv (CIFAR-10).
        classes: class names (a list, 'a,b,c', or a file with one per line); default: the labels in the data.
        templates: prompt templates with '{}' (a list or a file); default: CLIP's CIFAR templates.
        split: which <split>.tsv of a dataset folder.
        json_out: write accuracy and per-image predictions here.
        skip_bad_images: warn and skip unreadable images instead of stopping.
    """
    from .data.captions import load_labeled_images
    from .data.images import load_images

    net, tok, proc = load_clip(model)
    paths, labels = load_labeled_images(images, split)
    classnames = _read_list(classes) or (sorted(set(labels)) if labels else None)
    if not classnames:
        raise ValueError(f"{images}: no labels found; pass --classes")
    temps = _read_list(templates) or list(DEFAULT_TEMPLATES)
    pil, keep = load_images(paths, skip_bad_images)
    w = zero_shot_weights(net, tok, classnames, temps)
    probs = (net.logit_scale.exp().item() * encode_images(net, proc, pil, batch_size) @ w.t()).softmax(dim=-1)
    pred = probs.argmax(dim=-1).tolist()
    result: dict = {"classes": classnames, "n_templates": len(temps), "n_images": len(keep),
                    "predictions": [{"image": str(paths[i]), "pred": classnames[p], "prob": round(probs[r, p].item(), 4)}
                                    for r, (i, p) in enumerate(zip(keep, pred))]}
    if labels:
        gold = [labels[i] for i in keep]
        unknown = sorted(set(gold) - set(classnames))
        if unknown:
            raise ValueError(f"{images}: labels {unknown} are not among the classes {classnames}")
        result["accuracy"] = sum(classnames[p] == g for p, g in zip(pred, gold)) / len(gold)
        result["chance"] = 1 / len(classnames)
        print(f"zero-shot accuracy {100 * result['accuracy']:.1f}% on {len(gold)} images "
              f"({len(classnames)} classes, {len(temps)} templates; chance {100 * result['chance']:.1f}%)")
    else:
        for r in result["predictions"]:
            print(f"{r['image']}\t{r['pred']}\t{r['prob']:.3f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result


def retrieve(model: str, data: str = "../shared/data/flickr8k", text: list[str] | None = None,
             image: list[str] | None = None, captions: str | None = None, split: str = "val", k: int = 5,
             out: str = "retrieval.png", image_root: str | None = None) -> dict:
    """Text->image and image->text search: top-k results, written as a PNG grid.

    Args:
        model: a dual-encoder checkpoint folder.
        data: the gallery: a Flickr8k-format folder / COCO-captions .json (images and their captions) or an image folder / TSV.
        text: text queries (ranked against the gallery images).
        image: query image files (ranked against the gallery captions).
        captions: a file of candidate captions, one per line, for image queries on an image-folder gallery.
        split: the Flickr8k split used as gallery.
        k: results per query.
        out: the PNG grid (text queries; image queries go to <out stem>_i2t.png when both are given).
    """
    from .data.captions import load_captions, load_labeled_images
    from .data.images import load_image
    from .viz.retrieval_grid import image_to_text_grid, text_to_image_grid

    if not text and not image:
        raise ValueError("give at least one --text query or --image query")
    net, tok, proc = load_clip(model)
    p = Path(data)
    if p.suffix.lower() == ".json" or (p.is_dir() and (p / "captions.txt").is_file()):
        recs = load_captions(p, split, image_root)
        gallery = [r.image for r in recs]
        texts = [c for r in recs for c in r.captions]
    else:
        gallery, _ = load_labeled_images(p, split)
        texts = _read_list([captions]) if captions else []
    result: dict = {}
    outs = []
    if text:
        gal = [load_image(g) for g in gallery]
        img = encode_images(net, proc, gal)
        s = encode_texts(net, tok, text) @ img.t()
        top = s.topk(min(k, len(gallery)), dim=-1)
        result["text_to_image"] = [{"query": q, "results": [{"image": str(gallery[j]), "score": round(v, 4)}
                                                           for v, j in zip(vs.tolist(), js.tolist())]}
                                   for q, vs, js in zip(text, top.values, top.indices)]
        outs.append(text_to_image_grid(text, gal, top.indices.tolist(), top.values.tolist(), out))
    if image:
        if not texts:
            raise ValueError("image queries need candidate captions: a caption dataset as --data or --captions FILE")
        q_ims = [load_image(x) for x in image]
        s = encode_images(net, proc, q_ims) @ encode_texts(net, tok, texts).t()
        top = s.topk(min(k, len(texts)), dim=-1)
        result["image_to_text"] = [{"query": str(x), "results": [{"text": texts[j], "score": round(v, 4)}
                                                                for v, j in zip(vs.tolist(), js.tolist())]}
                                   for x, vs, js in zip(image, top.values, top.indices)]
        o = Path(out) if not text else Path(out).with_name(Path(out).stem + "_i2t.png")
        outs.append(image_to_text_grid(q_ims, texts, top.indices.tolist(), top.values.tolist(), o))
    for key in ("text_to_image", "image_to_text"):
        for r in result.get(key, []):
            print(f"{r['query']}:")
            for n, hit in enumerate(r["results"], 1):
                print(f"  {n}. {hit.get('image', hit.get('text'))}  ({hit['score']:.3f})")
    result["grids"] = [str(o) for o in outs]
    print("wrote " + ", ".join(result["grids"]))
    return result
