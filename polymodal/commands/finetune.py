"""``polymodal finetune`` and ``polymodal eval``: fine-tune a pretrained backbone with a task head
(all weights, or LoRA adapters plus the head) on the one Trainer, and score a checkpoint on a split.

The recipe is BERT's (Devlin et al. 2019, sec. 4 and A.3): AdamW with weight decay 0.01, linear
warm-up over the first 10% of the steps then linear decay to 0, lr 5e-5 (1e-3 for LoRA, Hu et al.
2021, whose adapters start at zero), 3 epochs, evaluated every epoch; the best model by the task's
metric goes to ``<out>/model`` and ``--patience`` evaluations without improvement stop the run.
The command then writes the best model's ``predictions_val.jsonl`` and ``val_metrics.json``
(its val scores beside the trivial baseline's).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from ..data.tasks import TASKS, encode_split, get_task, load_split
from ..models.task_models import DEFAULT_LORA_TARGETS

TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]  # every task name shows in --help
EvalTaskName = Literal[tuple(TASKS) + ("retrieval", "image-classification")]  # type: ignore[valid-type]


def finetune(task: TaskName, model: str | None = None, data: str | None = None, out: str = "runs/finetune",
             lora: bool = False, lora_r: int = 8, lora_alpha: float = 16.0, lora_targets: str = DEFAULT_LORA_TARGETS,
             epochs: float = 3.0, max_steps: int = 0, minutes: float = 0.0, lr: float | None = None,
             batch_size: int = 32, grad_accum: int = 1, max_length: int = 128, stride: int = 128,
             weight_decay: float = 0.01, warmup: float = 0.1, eval_every: int = 0, patience: int = 3,
             max_train: int | None = None, max_val: int | None = None,
             val_split: Literal["val", "sentences", "heldout-docs"] = "val", val_size: int = 0, bucket: int = 0,
             layer_decay: float = 1.0, ema: float = 0.0, label_smoothing: float = 0.0, sentence_weight: float = 1.0,
             cased: bool = False, crf: bool = False, head: Literal["auto", "pooler", "roberta", "mean"] = "auto", seed: int = 0,
             device: str = "auto",
             dtype: Literal["auto", "bf16", "fp32"] = "auto", threads: int = 0, compile: bool = False,
             progress: bool = True, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune a backbone on a text task (GLUE/SuperGLUE classification or regression, CoNLL NER, SQuAD QA).

    Args:
        task: the task (its data folder, format, labels and metric: polymodal.data.tasks.TASKS)
        model: backbone or fine-tuned checkpoint (polymodal/HF folder, .gguf or run folder); default all-MiniLM-L6-v2
        data: folder with the task's train/val files (default: $POLYMODAL_DATA/<task folder>)
        out: run folder (model/, predictions_val.jsonl, val_metrics.json, metrics.jsonl, checkpoints/)
        lora: train LoRA adapters (and the head) instead of all weights; merged into the exported model
        lora_r: LoRA rank
        lora_alpha: LoRA scale numerator (update = alpha / r * B A)
        lora_targets: comma-separated globs of linear layers to adapt
        epochs: passes over the training set (fractions allowed; used when --max-steps is 0)
        max_steps: optimizer steps (0 = --epochs)
        minutes: wall-clock budget in minutes; the schedule is fitted to it (0 = no limit)
        lr: peak learning rate (default 5e-5, or 1e-3 with --lora)
        batch_size: examples per optimizer step (split over ranks under torchrun)
        grad_accum: micro-batches of --batch-size accumulated per optimizer step
        max_length: tokens per sequence (QA: per window)
        stride: QA only: tokens shared by consecutive windows of a long context
        weight_decay: AdamW weight decay (not on biases, norms and embeddings)
        warmup: linear warm-up: a fraction of the steps (< 1) or a step count
        eval_every: evaluate (and checkpoint) every N steps (0 = once per epoch)
        patience: stop after this many evaluations without a better val metric (0 = never)
        max_train: use only N training examples (a seeded shuffle of the file)
        max_val: use only the first N val examples
        val_split: val (the shipped file), sentences (sst2: whole sentences held out of train with their own phrases) or heldout-docs (conll2003: the last documents of train.txt); see polymodal.data.splits
        val_size: sentences or documents held out by --val-split (0 = 872 sentences / 100 documents)
        bucket: length bucketing: sort each pool of N consecutive batches by length (0 = off; padding is always per batch)
        layer_decay: layer-wise lr decay d: head lr, top layer lr*d, ..., embeddings lr*d^(L+1) (1 = off)
        ema: evaluate and export an exponential moving average of the weights with this decay, e.g. 0.999 (0 = off)
        label_smoothing: label smoothing of the classification / NER cross-entropy (0 = off)
        sentence_weight: sst2: loss weight of the whole-sentence rows against the phrases (1 = equal)
        cased: NER: add a learned word-shape (capitalisation) embedding to the token embeddings
        crf: NER: a linear-chain CRF output layer (trained on -log p(tags), decoded by Viterbi)
        head: sequence classification head: auto (BERT pooler; RoBERTa dense+tanh), pooler, roberta, or mean (mean-pooled tokens)
        seed: random seed (shuffling, head init, dropout)
        device: auto (CUDA when present), cpu, cuda, cuda:N
        dtype: auto (bf16 autocast where native), bf16 or fp32
        threads: torch CPU threads (0 = torch's default)
        compile: torch.compile the model
        progress: show the progress bar
        resume: continue the run in --out from its latest checkpoint
        overwrite: start over in an --out that already holds checkpoints
    """
    flags = dict(locals())
    from ..train.tasks.classify import text_task
    from ..train.trainer import run

    t = text_task(task, model=model, data=data, batch_size=batch_size, max_length=max_length, stride=stride,
                  max_train=max_train, max_val=max_val, seed=seed, head=head, lora=lora, lora_r=lora_r,
                  lora_alpha=lora_alpha, lora_targets=lora_targets, val_split=val_split, val_size=val_size,
                  bucket=bucket, layer_decay=layer_decay, weight_decay=weight_decay, ema=ema,
                  label_smoothing=label_smoothing, sentence_weight=sentence_weight, cased=cased, crf=crf)
    main = int(os.environ.get("RANK", "0")) == 0
    info = t.summary()
    if progress and main:
        print(f"[finetune] {json.dumps(info)}", flush=True)
    s = run(t, flags, lr=lr if lr is not None else (1e-3 if lora else 5e-5), schedule="linear", min_lr=0.0)
    result = {"task": t.name, "metric": t.metric, "best": s["best"], "best_step": s["best_step"], "steps": s["step"],
              "stop_reason": s["stop_reason"], "baseline": info["baseline"], "lora": lora,
              "trainable_params": t.trainable_params, "train_seconds": s["elapsed_s"], "model": s["model"]}
    if main:  # the best model's val predictions, from the exported (merged) folder
        result.update(_score_export(t, Path(out), device, info["baseline"]))
        print(json.dumps({k: result[k] for k in ("task", "metric", "best_step", "steps", "val", "baseline")}))
    return result


def _score_export(t, out: Path, device: str, baseline: dict) -> dict:
    from ..eval.text_tasks import write_predictions
    from ..interop import load
    from ..runtime import pick_device

    net, _ = load(out / "model", device=pick_device(device), dtype="float32")
    metrics, records = t.predictions(net)
    write_predictions(out / "predictions_val.jsonl", records)
    (out / "val_metrics.json").write_text(json.dumps({"task": t.name, "metric": t.metric, "val": metrics,
                                                      "baseline": baseline}, indent=2))
    return {"val": metrics, "predictions": str(out / "predictions_val.jsonl")}


def eval_cmd(task: EvalTaskName, model: str, data: str | None = None, split: str = "val", val_size: int = 0,
             batch_size: int = 64, max_length: int = 128, stride: int = 128, out: str | None = None,
             device: str = "auto") -> dict:
    """Evaluate a fine-tuned checkpoint on a task's split and write its predictions.

    Args:
        task: a text task (polymodal.data.tasks.TASKS), or retrieval (a dual encoder: R@1/5/10 both ways, mean rank) or image-classification (a train-vit checkpoint)
        model: a fine-tuned checkpoint or run folder (from 'polymodal finetune', or an HF *For* folder)
        data: folder with the task's files (default: $POLYMODAL_DATA/<task folder>); retrieval: a Flickr8k folder or COCO-captions .json
        split: which split to evaluate (val, train, test; sst2: sentences, conll2003: heldout-docs, the val splits of finetune --val-split)
        val_size: sentences or documents of --split sentences / heldout-docs (0 = 872 / 100, as finetune)
        batch_size: examples per forward pass
        max_length: tokens per sequence (QA: per window)
        stride: QA only: tokens shared by consecutive windows
        out: where to write predictions (.jsonl); default <model>/predictions_<split>.jsonl (vision tasks: a metrics .json)
        device: auto (CUDA when present), cpu, cuda, cuda:N
    """
    if task not in TASKS:  # image-text retrieval / image classification
        from ..eval.vision import VISION_TASKS, eval_vision

        if task not in VISION_TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS) + sorted(VISION_TASKS)}")
        return eval_vision(task, model, data, split, batch_size, out)
    from ..eval.text_tasks import evaluate, write_predictions
    from ..interop import load, resolve_model_path
    from ..models.heads import TaskModel
    from ..models.task_models import pad_id
    from ..runtime import pick_device

    spec = get_task(task)
    path = resolve_model_path(model)
    net, tok = load(path, device=pick_device(device), dtype="float32")
    if not isinstance(net, TaskModel) or net.config.task != spec.kind:
        raise ValueError(f"{model}: not a fine-tuned {spec.kind} model (run 'polymodal finetune --task {task}')")
    if tok is None:
        raise ValueError(f"{path}: no tokenizer.json")
    examples = load_split(spec, split, data, val_size)
    feats = encode_split(spec, tok, examples, max_length, stride)
    metrics, records = evaluate(net, spec, examples, feats, pad_id(net.backbone, tok), batch_size)
    dest = write_predictions(Path(out) if out else path / f"predictions_{split}.jsonl", records)
    print(json.dumps({"task": spec.name, "split": split, **metrics}, indent=2))
    return {"task": spec.name, "split": split, "metrics": metrics, "predictions": str(dest)}
