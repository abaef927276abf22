"""Evaluating a fine-tuned text model on a task split: the task's metrics (``metrics.py``: accuracy,
F1, MCC, Pearson/Spearman, seqeval entity F1, SQuAD EM/F1), one prediction record per example,
and the trivial baseline every score is read against.

Predictions follow BERT (Devlin et al. 2019, sec. 4): the argmax of the classifier (the score
itself for regression); for NER each word takes its first sub-token's label (sec. 5.3); for SQuAD
the span i..j, j >= i, maximising S*h_i + E*h_j over every window of the context
(``data.tasks.postprocess_qa``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data import tasks as T
from ..models.task_models import span_loss, task_forward, unwrap, uses_token_types
from . import metrics as M


@torch.no_grad()
def predict(model: nn.Module, kind: str, features: Sequence[dict], pad: int,
            batch_size: int = 64) -> tuple[float, list]:
    """(mean loss, one raw output per feature): logits (sequence tasks), token argmaxes (NER) or
    (start, end) logits (QA). Batches are taken in length order so each pads little. NER tags
    come from the head's ``predict_tags`` (argmax, or a CRF's Viterbi path over the words)."""
    device = next(model.parameters()).device
    token_types = uses_token_types(model)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    outs: list[Any] = [None] * len(features)
    loss_sum = 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = T.collate([features[i] for i in idx], pad, T.label_keys(kind))
        batch = {k: v.to(device) for k, v in batch.items()}
        out = task_forward(model, batch, kind, token_types)
        loss_sum += float(span_loss(out, batch) if kind == "qa" else out.loss) * len(idx)
        if kind == "token_cls":
            core = unwrap(model)
            tags = (core.predict_tags(out.logits, batch["labels"] != -100) if hasattr(core, "predict_tags")
                    else out.logits.argmax(-1))
        for r, i in enumerate(idx):
            m = len(features[i]["input_ids"])
            if kind == "qa":
                outs[i] = (out.start_logits[r, :m].float().cpu(), out.end_logits[r, :m].float().cpu())
            elif kind == "token_cls":
                outs[i] = tags[r, :m].tolist()
            else:
                outs[i] = out.logits[r].float().cpu()
    return loss_sum / max(len(features), 1), outs


def score(spec: T.TaskSpec, examples: Sequence, features: Sequence[dict], outs: Sequence) -> tuple[dict, list]:
    """(metrics, prediction records) from :func:`predict`'s outputs."""
    if spec.kind == "seq_cls":
        return _score_sequences(spec, examples, outs)
    if spec.kind == "token_cls":
        names = spec.labels
        pred = [[names[t] for t in T.word_predictions(o, f["word_ids"], f["n_words"])] for o, f in zip(outs, features)]
        gold = [[names[t] for t in e.tags] for e in examples]
        records = [{"line": e.line, "words": e.words, "prediction": p, "label": g}
                   for e, p, g in zip(examples, pred, gold)]
        return M.entity_metrics(pred, gold), records
    preds, nbest = T.postprocess_qa(examples, features, [o[0] for o in outs], [o[1] for o in outs])
    records = [{"id": e.id, "prediction": preds[e.id], "answers": e.answers,
                "n_best": [[t, round(s, 4)] for t, s in nbest[e.id][:5]]} for e in examples]
    return M.squad_metrics(preds, {e.id: e.answers for e in examples}), records


def _score_sequences(spec: T.TaskSpec, examples: Sequence, outs: Sequence) -> tuple[dict, list]:
    if spec.problem == "regression":
        preds = [float(o.squeeze()) for o in outs]
        gold = [e.label for e in examples]
        # one example, or constant predictions or labels: the correlation is undefined, not an error
        ok = len(preds) > 1 and len(set(preds)) > 1 and len(set(gold)) > 1
        metrics = M.regression_metrics(preds, gold) if ok else {"pearson": float("nan"), "spearman": float("nan")}
        return metrics, [{"line": e.line, "prediction": p, "label": e.label} for e, p in zip(examples, preds)]
    preds = [int(o.argmax()) for o in outs]
    metrics = M.classification_metrics(preds, [e.label for e in examples], len(spec.labels))
    records = [{"line": e.line, "prediction": spec.labels[p], "label": spec.labels[e.label],
                "probs": [round(x, 5) for x in o.softmax(-1).tolist()]} for e, p, o in zip(examples, preds, outs)]
    return metrics, records


def evaluate(model: nn.Module, spec: T.TaskSpec, examples: Sequence, features: Sequence[dict], pad: int,
             batch_size: int = 64) -> tuple[dict[str, float], list[dict]]:
    """(metrics including "loss", one prediction record per example) on a split."""
    was_training = model.training
    model.eval()
    try:
        loss, outs = predict(model, spec.kind, features, pad, batch_size)
    finally:
        model.train(was_training)
    metrics, records = score(spec, examples, features, outs)
    return {"loss": loss, **metrics}, records


def baseline(spec: T.TaskSpec, train: Sequence, val: Sequence) -> dict[str, float]:
    """The trivial predictor's score: the most frequent train label (classification), the train
    mean (regression: correlation undefined, reported as 0), all "O" (NER, F1 0), or the context
    sentence with the most word overlap with the question (SQuAD)."""
    if spec.kind == "seq_cls":
        if spec.problem == "regression":
            return {"pearson": 0.0, "spearman": 0.0}
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


def write_predictions(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
