"""``polymodal train-vlm``, ``polymodal caption``, ``polymodal eval-caption``: the LLaVA-style
generative VLM trained on the one engine (``polymodal.train.tasks.vlm``: stage 1 captions, stage 2
VQA), captions decoded by ``polymodal.generate.vlm`` and scored by pycocoevalcap
(``polymodal.eval.caption_metrics``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

DEFAULT_DATA = "../shared/data/flickr8k"


def train_vlm(data: str = DEFAULT_DATA, out: str = "runs/train-vlm", stage: Literal[1, 2] = 1,
              vision: str | None = None, decoder: str = "smollm2", init: str | None = None,
              val_data: str | None = None, image_root: str | None = None, pixel_shuffle: int = 2,
              projector: Literal["mlp", "linear"] = "mlp", train_vision: bool | None = None, lora: int = 0,
              lora_mlp: bool = False, train_decoder: bool = False, caption_prompt: str | None = None,
              caption_chat: bool | None = None, vqa_prompt: str | None = None, vqa_chat: bool | None = None,
              views: int = 0, crop_scale: float = 0.5, flip: bool | None = None, batch_size: int = 16,
              lr: float = 1e-3, lora_lr: float | None = None, weight_decay: float = 0.0, warmup: float = 30,
              max_steps: int = 2000, epochs: float = 1.0, minutes: float = 0.0, eval_every: int = 100,
              patience: int = 0, grad_accum: int = 1, val_samples: int = 64, limit: int = 0, log_every: int = 10,
              seed: int = 0, device: str = "auto", dtype: str = "auto", threads: int = 0, compile: bool = False,
              skip_bad_images: bool = False, progress: bool = True, resume: bool = False,
              overwrite: bool = False) -> dict:
    """Train a LLaVA-style VLM: stage 1 aligns the projector on captions, stage 2 tunes on VQA.

    Args:
        data: stage 1: Flickr8k-format folder or COCO-captions .json; stage 2: easy-VQA/DAQUAR folder or VQAv2 .json.
        out: run folder (config.json, metrics.jsonl, curve.png, tb/, checkpoints/, model/ = the best model, LoRA merged).
        stage: 1 (captions, projector only; best by val loss) or 2 (VQA, projector + LoRA; best by answer accuracy; from --init, or a fresh model from --vision).
        vision: image tower: a tower preset (trained from scratch; default vit-nano-cifar) or a CLIP / ViT / VLM checkpoint or run folder (its tower, frozen).
        decoder: smollm2 (SmolLM2-135M-Instruct, real weights), smollm2:K (its first K blocks only) or a causal-LM checkpoint; frozen but for LoRA.
        init: a VLM checkpoint or run folder to start from (stage 2: the stage-1 run); replaces --vision/--decoder.
        val_data: validation data (default: the val split of --data where it has one; else a slice of training).
        image_root: image folder of a COCO / VQAv2 JSON.
        pixel_shuffle: fold r x r patch tokens into one image token (must divide the tower's patch grid).
        projector: mlp (LLaVA-1.5) or linear (LLaVA-1).
        train_vision: train the tower (default: only a fresh one); a frozen tower's features are computed once.
        lora: LoRA rank on the decoder's attention (0 = none); stage 2 usually 8.
        lora_mlp: LoRA on the decoder's MLPs too (what a truncated decoder needs to relearn its upper computation).
        train_decoder: train every decoder weight instead (a small decoder; LLaVA's stage 2 tunes the whole LLM).
        caption_prompt: stage 1 prompt text with <image> (default: the model config's, '<image>').
        caption_chat: wrap the caption prompt in the chat template (default: the model config's, off).
        vqa_prompt: stage 2 prompt text with <image> and {question} (default: the model config's, LLaVA-1.5's).
        vqa_chat: wrap the VQA prompt in the chat template (default: the model config's, on); off: BOS + prompt, fewer tokens.
        views: precomputed views per image, frozen tower (0 = 4 for captions, 1 for VQA: no flips of left/right).
        crop_scale: smallest area fraction of a random training crop (1 = whole images, no crops).
        flip: random horizontal flips (default: captions yes, VQA no; easy-VQA never says left or right).
        batch_size: sequences per step, over all ranks.
        lr: projector (and tower) learning rate, linear warm-up then cosine to 0.
        lora_lr: LoRA learning rate (default: lr).
        weight_decay: AdamW weight decay of the weight matrices (LLaVA uses none).
        warmup: warm-up steps (>= 1) or a fraction of the planned steps (< 1).
        max_steps: optimizer steps (0 = --epochs over the training sequences).
        epochs: passes over the training sequences when --max-steps is 0.
        minutes: wall-clock budget, 0 = no limit; the schedule ends at whichever of --max-steps / --minutes comes first.
        eval_every: steps between validation evaluations (and checkpoints); 0 = once per epoch.
        patience: stop after this many evaluations without a better metric (0 = never).
        grad_accum: micro-batches per optimizer step.
        val_samples: validation sequences per evaluation (fixed: each val image's first caption first; stage 2 a fixed random sample).
        limit: use only the first N training images (stage 1) or questions (stage 2); 0 = all.
        log_every: steps per train-loss record in metrics.jsonl.
        seed: seeds the initialisation, the batches and the augmented views.
        device: auto, cpu, cuda, cuda:N.
        dtype: auto, bf16 or fp32.
        threads: torch CPU threads (0 = torch's default).
        compile: torch.compile the model.
        skip_bad_images: warn and skip unreadable images instead of stopping.
        progress: show progress bars.
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an --out folder that already holds checkpoints (deletes them).
    """
    flags = dict(locals())
    from ..train.tasks.vlm import VLMTask
    from ..train.trainer import run

    task = VLMTask(data, stage, vision, decoder, init, val_data, image_root, pixel_shuffle, projector, train_vision,
                   lora, lora_mlp, train_decoder, caption_prompt, caption_chat, vqa_prompt, vqa_chat, views,
                   crop_scale, flip, batch_size, lr, lora_lr, weight_decay, val_samples, limit, seed,
                   skip_bad_images, progress)
    info = task.summary()
    print(f"train-vlm: {json.dumps(info)}", flush=True)
    res = {**run(task, flags), **info}
    print(json.dumps({k: res.get(k) for k in ("step", "stop_reason", "metric", "best", "best_step", "last", "model")}))
    return res


def caption(model: str, image: list[str], beam: int = 3, max_new_tokens: int = 30, no_repeat_ngram: int = 3,
            out: str | None = None, references: str | None = None, prompt: str | None = None,
            batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """Caption images with a VLM (greedy or beam search); --out draws them with their captions.

    Args:
        model: a VLM checkpoint or train-vlm run folder.
        image: image files.
        beam: beam width (1 = greedy).
        max_new_tokens: the longest caption in tokens.
        no_repeat_ngram: never repeat an n-gram of this size (0 = off).
        out: write a PNG grid of the images with generated (and reference) captions.
        references: reference captions: a Flickr8k folder, a COCO-captions .json or a '<image><TAB><caption>' file.
        prompt: a prompt with <image> instead of the model's caption prompt.
        batch_size: images per generation batch.
        device: cpu, cuda, ...
    """
    from ..eval.caption_metrics import load_references
    from ..generate.vlm import generate_captions, load_vlm

    if not image:
        raise ValueError("give at least one --image")
    refs = load_references(references) if references else {}  # a bad file fails before the model loads
    m, tok, _ = load_vlm(model, device=device)
    caps = generate_captions(m, tok, image, beam, max_new_tokens, no_repeat_ngram, batch_size, prompt)
    rows = [{"image": str(p), "caption": c, "references": refs.get(Path(p).name, [])} for p, c in zip(image, caps)]
    for r in rows:
        print(f"{r['image']}\t{r['caption']}")
    if out:
        from ..viz.caption_grid import caption_grid

        print(f"wrote {caption_grid(image, caps, out, references=[r['references'] for r in rows] if refs else None)}")
    return rows


def eval_caption(model: str, data: str = DEFAULT_DATA, split: str = "val", limit: int = 0, beam: int = 3,
                 max_new_tokens: int = 30, no_repeat_ngram: int = 3, batch_size: int = 16,
                 image_root: str | None = None, out: str | None = None, grid: str | None = None,
                 meteor: bool = True, skip_bad_images: bool = False, device: str = "cpu") -> dict:
    """Caption every image of a split and score against all its references: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

    Args:
        model: a VLM checkpoint or train-vlm run folder.
        data: a Flickr8k-format folder or a COCO-captions .json.
        split: the Flickr8k split (train, val, all).
        limit: caption only the first N images (0 = all).
        beam: beam width (1 = greedy).
        max_new_tokens: the longest caption in tokens.
        no_repeat_ngram: never repeat an n-gram of this size (0 = off).
        batch_size: images per generation batch.
        image_root: image folder of a COCO-captions .json (default: beside it or its images/).
        out: the predictions + metrics JSON (default: <model>/eval-caption-<split>.json).
        grid: also draw the first 8 images with generated and reference captions to this PNG.
        meteor: compute METEOR (Java, ~10 s to start).
        skip_bad_images: warn and skip unreadable images instead of stopping.
        device: cpu, cuda, ...
    """
    from ..data.captions import load_captions
    from ..data.images import load_images
    from ..eval.caption_metrics import format_caption_metrics, score_captions
    from ..generate.vlm import generate_captions, load_vlm
    from ..interop import resolve_model_path
    from ..io import atomic_write_text

    m, tok, _ = load_vlm(model, device=device)
    records = load_captions(data, split, image_root)[:limit or None]
    pil, keep = load_images([r.image for r in records], skip_bad_images)
    records = [records[i] for i in keep]
    if not records:
        raise ValueError(f"{data}: no readable images to caption in split {split!r}")
    t = time.perf_counter()
    caps = generate_captions(m, tok, pil, beam, max_new_tokens, no_repeat_ngram, batch_size, progress=True)
    gen_s = time.perf_counter() - t
    keys = [str(r.image) for r in records]
    scores = score_captions(dict(zip(keys, caps)), {k: r.captions for k, r in zip(keys, records)},
                            meteor=None if meteor else False, per_image=True)  # None: when Java is there
    per = scores.pop("per_image")
    result = {**scores, "split": split, "beam": beam, "max_new_tokens": max_new_tokens,
              "model": str(resolve_model_path(model)), "data": str(data), "generation_s": round(gen_s, 1),
              "predictions": [{"image": k, "caption": c, "references": r.captions, **per[k]}
                              for k, c, r in zip(keys, caps, records)]}
    print(format_caption_metrics(scores) + f"  ({len(records)} images)")
    path = Path(out) if out else Path(model) / f"eval-caption-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
    if grid:
        from ..viz.caption_grid import caption_grid

        n = min(8, len(records))
        caption_grid(pil[:n], caps[:n], grid, references=[r.captions for r in records[:n]],
                     notes=[f"CIDEr {per[k]['CIDEr']:.2f}" for k in keys[:n]])
        print(f"wrote {grid}")
    return result
