"""Fine-tuning a pretrained encoder (or decoder) with a task head, as Tasks for the one Trainer:
sequence classification and regression (GLUE/SuperGLUE, STS-B), token classification (CoNLL-2003
NER) and extractive QA (SQuAD v1.1).

The objectives are BERT's (Devlin et al. 2019, sec. 4):

* sequences: L = -log softmax(W h_pool)_y (STS-B's regression: the squared error (w.h - y)^2);
* tokens (sec. 5.3): the cross-entropy of each word's FIRST sub-token, averaged over the labelled
  tokens of the whole global batch: L = sum_{t labelled} -log p_t(y_t) / N_labelled;
* QA (sec. 4.2): P_start(i) = softmax_i(S.h_i), P_end(j) = softmax_j(E.h_j),
  L = (-log P_start(s) - log P_end(e)) / 2 over the context windows, the softmax taken over the
  window's real tokens only (so padding cannot change the loss).

A Task holds the split's encoded features; a batch is ``batch_size`` features chosen by the
:class:`EpochSampler` (a pure function of the step, so resume is exact), padded to its longest
row (dynamic padding). The token loss is normalised by the labelled-token count of the GLOBAL
batch, which every rank computes from the step alone: each rank's sum / (N / world) averages
over the ranks to exactly the one-process mean, whatever each rank's share of labelled tokens.

With LoRA the backbone is frozen and adapted (``models.task_models.apply_task_lora``); the
export (``Task.export``) merges the adapters, so ``<out>/model`` is a plain fine-tuned model.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import tasks as T
from ...models.task_models import (DEFAULT_LORA_TARGETS, apply_task_lora, attach_head, freeze_unused_pooler,
                                   load_pretrained, max_positions, pad_id, span_loss, task_forward, uses_token_types)
from .base import EpochSampler, Task, shard


class TextTask(Task):
    """The shared part: data, model assembly, batching and evaluation; subclasses name the loss."""

    kind = ""
    unit = "ex"

    def __init__(self, spec: T.TaskSpec | str, model: str | Path | None = None, data: str | Path | None = None,
                 batch_size: int = 32, max_length: int = 128, stride: int = 128, max_train: int | None = None,
                 max_val: int | None = None, seed: int = 0, head: str = "auto", lora: bool = False, lora_r: int = 8,
                 lora_alpha: float = 16.0, lora_targets: str = DEFAULT_LORA_TARGETS,
                 eval_batch_size: int | None = None):
        self.spec = T.get_task(spec) if isinstance(spec, str) else spec
        if self.spec.kind != self.kind:
            raise ValueError(f"task {self.spec.name} is {self.spec.kind}, not {self.kind}")
        if batch_size < 1 or max_length < 8:
            raise ValueError(f"--batch-size must be >= 1 and --max-length >= 8, got {batch_size} and {max_length}")
        self.name, self.metric, self.mode, self.seed = self.spec.name, self.spec.metric, self.spec.mode, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.head, self.lora = head, dict(targets=lora_targets, r=lora_r, alpha=lora_alpha) if lora else None
        train = T.load_split(self.spec, "train", data)
        val = T.load_split(self.spec, "val", data)
        random.Random(seed).shuffle(train)  # --max-train takes a spread of the file, not its first block
        self.train_examples = train[:max_train] if max_train else train
        self.val_examples = val[:max_val] if max_val else val
        self.pretrained, self.tokenizer = load_pretrained(model)
        limit = max_positions(self.pretrained)
        if limit is not None and max_length > limit:
            raise ValueError(f"--max-length {max_length} exceeds the model's {limit} positions")
        self.pad = pad_id(self.pretrained, self.tokenizer)
        self.train_features = T.encode_split(self.spec, self.tokenizer, self.train_examples, max_length, stride)
        self.val_features = T.encode_split(self.spec, self.tokenizer, self.val_examples, max_length, stride)
        self.sampler = EpochSampler(len(self.train_features), batch_size, seed)
        self.token_types: bool | None = None
        self.trainable_params = 0

    # -- model ------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A copy of the pretrained model with a fresh head (drawn from the Trainer's seeded RNG),
        LoRA applied and unused parts frozen: the same model for a fresh run and a resume."""
        net = attach_head(self.spec, copy.deepcopy(self.pretrained), self.tokenizer, head=self.head)
        if self.lora is not None:
            apply_task_lora(net, **self.lora)
        freeze_unused_pooler(net)
        self.token_types = uses_token_types(net)
        self.trainable_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        return net

    # -- data ---------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        idx = self.sampler.indices(index)
        feats = [self.train_features[i] for i in shard(idx, rank, world)]
        return T.collate(feats, self.pad, T.label_keys(self.kind))

    # -- objective ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": task_forward(model, batch, self.kind, self.token_types).loss}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.predictions(model)[0]

    def predictions(self, model: nn.Module) -> tuple[dict[str, float], list[dict]]:
        """(val metrics, one prediction record per val example)."""
        from ...eval.text_tasks import evaluate

        return evaluate(model, self.spec, self.val_examples, self.val_features, self.pad, self.eval_batch_size)

    def summary(self) -> dict[str, Any]:
        from ...eval.text_tasks import baseline

        return {"task": self.name, "kind": self.kind, "metric": self.metric,
                "train_examples": len(self.train_examples), "train_features": len(self.train_features),
                "val_examples": len(self.val_examples), "val_features": len(self.val_features),
                "baseline": baseline(self.spec, self.train_examples, self.val_examples)}


class SequenceClassificationTask(TextTask):
    """One label (or score) per sentence or sentence pair; the mean loss over the rank's slice
    (equal slices, so the ranks' average is the global mean)."""

    kind = "seq_cls"


class TokenClassificationTask(TextTask):
    """One label per word (NER), the loss averaged over the global batch's labelled tokens."""

    kind = "token_cls"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.n_labelled = [sum(t != -100 for t in f["labels"]) for f in self.train_features]

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        out = super().batch(index, rank, world)
        n = sum(self.n_labelled[i] for i in self.sampler.indices(index))  # the GLOBAL batch's count
        out["tokens_per_rank"] = torch.tensor(max(n, 1) / world, dtype=torch.float32)
        return out

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = task_forward(model, {k: v for k, v in batch.items() if k != "labels"}, self.kind,
                              self.token_types).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                             reduction="sum")
        return {"loss": ce / batch["tokens_per_rank"]}


class ExtractiveQATask(TextTask):
    """Start and end of the answer span per context window (windows without the answer point at
    [CLS], as in BERT's SQuAD 2.0 setup and HF run_qa.py)."""

    kind = "qa"

    def build_model(self) -> nn.Module:
        net = super().build_model()
        # softmax_i(S.h_i + b) does not depend on b: the bias's gradient is exactly 0, and Adam
        # would turn the rounding noise left in it into steps of ~lr; it stays at its init (0).
        bias = getattr(getattr(net, "qa_outputs", None), "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            bias.requires_grad_(False)
            self.trainable_params -= bias.numel()
        return net

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        return {"loss": span_loss(task_forward(model, inputs, self.kind, self.token_types), batch)}


TASK_CLASSES: dict[str, type[TextTask]] = {c.kind: c for c in (SequenceClassificationTask, TokenClassificationTask,
                                                                ExtractiveQATask)}


def text_task(task: str | T.TaskSpec, **kw) -> TextTask:
    """The Task for a task name of ``data.tasks.TASKS`` (its kind picks the class)."""
    spec = T.get_task(task) if isinstance(task, str) else task
    return TASK_CLASSES[spec.kind](spec, **kw)
