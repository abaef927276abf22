"""``polymodal train-vqa``, ``polymodal vqa``, ``polymodal eval-vqa``: VisualBERT / ViLBERT trained
from scratch for VQA as answer classification on the one engine (``polymodal.train.tasks.vqa``),
scored by ``polymodal.eval.vqa``; ``vqa`` and ``eval-vqa`` also take a generative VLM checkpoint
(its greedy text answer, ``polymodal.generate.vlm``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def train_vqa(data: str = "../shared/data/easy_vqa", out: str = "runs/train-vqa",
              arch: Literal["visualbert", "vilbert"] = "visualbert", val_data: str | None = None,
              image_root: str | None = None, minutes: float = 0.0, max_steps: int = 3000, epochs: float = 1.0,
              eval_every: int = 200, batch_size: int = 128, lr: float = 1e-3, min_lr: float = 0.05,
              warmup: float = 200, weight_decay: float = 0.05, image_size: int = 64, patch_size: int = 16,
              image_stem: Literal["conv", "patches"] = "conv", stem_width: int = 128, width: int = 128,
              layers: int = 3, single_layers: int = 1, heads: int = 4, dropout: float = 0.0, flip: bool = False,
              min_answer_count: int = 1, max_train: int = 0, max_val: int = 0, grad_accum: int = 1,
              patience: int = 0, log_every: int = 10, seed: int = 0, device: str = "auto", dtype: str = "fp32", threads: int = 0,
              compile: bool = False, progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Train VisualBERT or ViLBERT from scratch for VQA as answer classification (easy-VQA, DAQUAR, VQAv2).

    Args:
        data: an easy-VQA or DAQUAR folder, or a VQAv2 questions .json (annotations beside it).
        out: run folder (config.json, metrics.jsonl, curve.png, tb/, checkpoints/, model/ = best by val accuracy, val_predictions.jsonl).
        arch: visualbert (one stream) or vilbert (two streams + co-attention).
        val_data: validation set (default: the folder's val split; needed for a VQAv2 JSON).
        image_root: COCO image folder for VQAv2 JSON.
        minutes: wall-clock budget, 0 = no limit; the schedule ends at whichever of --max-steps / --minutes comes first.
        max_steps: optimizer steps (0 = --epochs over the training images).
        epochs: passes over the training images when --max-steps is 0.
        eval_every: steps between val evaluations (and checkpoints); 0 = once per epoch.
        batch_size: questions per step, about: whole images are taken, batch-size / (questions per image) of them.
        lr: peak AdamW learning rate after the linear warm-up.
        min_lr: the cosine's floor, as a fraction of --lr.
        warmup: warm-up steps (>= 1) or a fraction of the planned steps (< 1).
        weight_decay: AdamW decoupled weight decay of the weight matrices (not norms, biases, embeddings).
        image_size: square input resolution (easy-VQA images are 64x64 shapes).
        patch_size: pixels per visual token side (the conv stem's total stride).
        image_stem: conv (small ResNet stem) or patches (flattened raw pixel patches).
        stem_width: channels of the conv stem's last stage (the visual feature size).
        width: hidden size of the transformer (both ViLBERT streams).
        layers: VisualBERT blocks, or ViLBERT co-attention blocks.
        single_layers: ViLBERT text-only and vision-only blocks before the co-attention.
        heads: attention heads.
        dropout: dropout in the transformer blocks.
        flip: random horizontal/vertical flips (only for data without left/right questions, like easy-VQA).
        min_answer_count: keep answers given at least this often (rarer ones are dropped from training).
        max_train: use only the first N training questions (0 = all).
        max_val: evaluate on the first N validation questions (0 = all).
        grad_accum: micro-batches per optimizer step.
        patience: stop after this many evaluations without a better val accuracy (0 = never).
        log_every: steps per train-loss record in metrics.jsonl.
        seed: seed of the initialisation, the image order and the flips.
        device: auto, cpu, cuda, cuda:N.
        dtype: auto, bf16 or fp32 (default fp32: bf16 autocast made these small models 1.45x slower per step on a bf16-capable CPU).
        threads: torch CPU threads (0 = torch's default).
        compile: torch.compile the model.
        progress: show progress bars.
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an --out folder that already holds checkpoints (deletes them).
    """
    flags = dict(locals())
    from ..train.tasks.vqa import VQATask
    from ..train.trainer import run

    task = VQATask(data, arch, val_data, image_root, batch_size, image_size, patch_size, image_stem, stem_width,
                   width, layers, single_layers, heads, dropout, flip, min_answer_count, max_train, max_val,
                   seed=seed, progress=progress)
    info = task.summary()
    print(f"train-vqa: {json.dumps(info)}", flush=True)
    res = {**run(task, flags, beta2=0.98), **info}  # Adam's beta2 of Vaswani et al. (0.98), as BERT-style recipes
    print(f"best val {info['scoring']} {100 * (res['best'] or 0):.2f}% at step {res['best_step']} (most-frequent answer "
          f"{info['baseline_answer']!r}: {100 * info['baseline_accuracy']:.2f}%); model {res['model']}")
    return res


def vqa(model: str, image: str, question: str, top_k: int = 5, max_new_tokens: int = 16) -> dict:
    """Answer a question about an image with a VisualBERT/ViLBERT or generative VLM checkpoint.

    Args:
        model: a checkpoint folder or a train-vqa / train-vlm run folder.
        image: the image file.
        question: the question, e.g. "what color is the shape?".
        top_k: answers to list with their probabilities (VisualBERT / ViLBERT).
        max_new_tokens: answer length limit (generative VLM).
    """
    from ..data.vqa import VQAExample
    from ..eval.vqa import load_vqa_model

    net, tok, family = load_vqa_model(model)
    if family == "vlm":
        from ..generate.vlm import answer_question

        text = answer_question(net, tok, image, question, max_new_tokens=max_new_tokens)
        print(text)
        return {"answer": text, "family": family}
    from ..data.image_cache import PixelCache
    from ..data.images import ImageProcessor
    from ..eval.vqa import predict_fusion

    ex = VQAExample(Path(image), question, [], "cli")
    top = predict_fusion(net, tok, PixelCache(ImageProcessor.from_config(net.config), [ex.image]), [ex], top_k=top_k)[0]
    for a, p in top:
        print(f"{p:7.2%}  {a}")
    return {"answer": top[0][0], "top": top, "family": family}


def eval_vqa(model: str, data: str = "../shared/data/easy_vqa", split: str = "val", image_root: str | None = None,
             batch_size: int = 256, max_examples: int = 0, max_new_tokens: int = 16, predictions: str | None = None,
             json_out: str | None = None, progress: bool = True) -> dict:
    """VQA accuracy of a checkpoint (soft VQA accuracy, or exact match for single-answer sets) beside the most-frequent-answer baseline.

    Args:
        model: a VisualBERT / ViLBERT / generative VLM checkpoint folder, or a train-vqa / train-vlm run folder.
        data: an easy-VQA or DAQUAR folder, or a VQAv2 questions .json.
        split: the split to score (train, val).
        image_root: COCO image folder for VQAv2 JSON.
        batch_size: questions per forward pass (VisualBERT / ViLBERT).
        max_examples: score only the first N questions (0 = all).
        max_new_tokens: answer length limit (generative VLM).
        predictions: write one JSON line per question (prediction, answers, score) here.
        json_out: write the metrics here.
        progress: show tqdm bars.
    """
    from ..data.vqa import load_vqa
    from ..eval.vqa import baseline_for, exact_match, gold, load_vqa_model, predict_answers, vqa_accuracy
    from ..io import atomic_write_text

    net, tok, family = load_vqa_model(model)
    examples = load_vqa(data, split, image_root)[:max_examples or None]
    preds = predict_answers(net, tok, family, examples, batch_size, max_new_tokens, progress)
    refs = gold(examples)
    scores = [exact_match(p, r) if isinstance(r, str) else vqa_accuracy(p, r) for p, r in zip(preds, refs)]
    base_answer, base, source = baseline_for(data, split, image_root, examples, net)
    metric = "soft VQA accuracy" if any(isinstance(r, list) for r in refs) else "exact match"
    out = {"accuracy": sum(scores) / len(scores), "n": len(examples), "metric": metric, "family": family,
           "baseline_answer": base_answer, "baseline_accuracy": base, "baseline_source": source}
    print(f"{family} on {data} [{split}]: {metric} {100 * out['accuracy']:.2f}% over {len(examples)} questions; "
          f"most-frequent answer {base_answer!r} ({source}): {100 * base:.2f}%")
    for f in (predictions, json_out):
        if f:
            Path(f).parent.mkdir(parents=True, exist_ok=True)
    if predictions:
        atomic_write_text(Path(predictions), "".join(json.dumps({"qid": e.qid, "question": e.question, "prediction": p,
                                                                 "answers": e.answers, "score": s}) + "\n"
                                                     for e, p, s in zip(examples, preds, scores)))
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(out, indent=1))
    return {**out, "predictions": preds}
