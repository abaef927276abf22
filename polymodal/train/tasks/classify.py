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

Recipe options (issue 21), each off by default so the old recipes reproduce:

* ``val_split``: the shipped val file, or a val carved from train and removed from it
  (``data.splits``: SST-2 whole sentences, CoNLL held-out documents);
* ``bucket`` > 0: length bucketing: the examples of ``bucket`` consecutive batches of the epoch's
  permutation are sorted by length, cut into batches and those batches shuffled (seeded by the
  epoch and the pool), so a batch pads little and every batch is still a pure function of its index;
* ``layer_decay`` d < 1: lr * d^(L+1-depth) per layer (``train.layer_decay``);
* ``ema`` beta > 0: an average of the weights, evaluated and exported (``train.ema``);
* ``label_smoothing`` eps (classification, NER): the target is (1-eps) one-hot + eps/K uniform
  (Szegedy et al. 2016, sec. 7), L = sum_k -q_k log p_k, normalised as the plain loss;
* ``sentence_weight`` w (SST-2): rows that are whole sentences (``data.splits.whole_sentences``)
  weigh w in the loss, phrases 1: L = sum_i w_i CE_i / sum_i w_i over the GLOBAL batch (each rank
  divides its sum by sum_i w_i / world, as the NER loss does with its token count);
* ``cased`` (NER): a learned word-shape table added to the embeddings (``heads.TokenClassifier``),
  since an uncased tokenizer loses the capitalisation NER leans on;
* ``crf`` (NER): a linear-chain CRF over the words (``nn.crf``): L = sum_sentences -log p(tags) /
  N_labelled, decoded by Viterbi.
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
from ...data.splits import whole_sentences
from ...models.task_models import (DEFAULT_LORA_TARGETS, apply_task_lora, attach_head, freeze_unused_pooler,
                                   load_pretrained, max_positions, pad_id, span_loss, task_forward, unwrap,
                                   uses_token_types)
from .. import ema as E
from .base import EpochSampler, Task, shard


class BucketSampler:
    """Length-bucketed batches over an :class:`EpochSampler` (see the module docstring): the batch
    of step ``k`` of epoch ``e`` comes from the pool of steps ``k - k % bucket ...`` of that epoch,
    so it depends on the step index and the seed alone."""

    def __init__(self, sampler: EpochSampler, lengths: list[int], bucket: int, seed: int = 0):
        self.sampler, self.lengths, self.bucket, self.seed = sampler, lengths, bucket, seed
        self.steps_per_epoch = sampler.steps_per_epoch
        self._pool: tuple[tuple[int, int], list[list[int]]] | None = None

    def indices(self, step: int) -> list[int]:
        spe, bs = self.steps_per_epoch, self.sampler.batch_size
        epoch, k = divmod(step, spe)
        first = k - k % self.bucket
        if self._pool is None or self._pool[0] != (epoch, first):
            steps = range(epoch * spe + first, epoch * spe + min(first + self.bucket, spe))
            pool = sorted((i for s in steps for i in self.sampler.indices(s)), key=lambda i: (self.lengths[i], i))
            groups = [pool[j:j + bs] for j in range(0, len(pool), bs)]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + first)
            self._pool = ((epoch, first), [groups[j] for j in torch.randperm(len(groups), generator=g).tolist()])
        return self._pool[1][k - first]


class TextTask(Task):
    """The shared part: data, model assembly, batching and evaluation; subclasses name the loss."""

    kind = ""
    unit = "ex"

    def __init__(self, spec: T.TaskSpec | str, model: str | Path | None = None, data: str | Path | None = None,
                 batch_size: int = 32, max_length: int = 128, stride: int = 128, max_train: int | None = None,
                 max_val: int | None = None, seed: int = 0, head: str = "auto", lora: bool = False, lora_r: int = 8,
                 lora_alpha: float = 16.0, lora_targets: str = DEFAULT_LORA_TARGETS,
                 eval_batch_size: int | None = None, val_split: str = "val", val_size: int = 0, bucket: int = 0,
                 layer_decay: float = 1.0, weight_decay: float = 0.01, ema: float = 0.0,
                 label_smoothing: float = 0.0, sentence_weight: float = 1.0, cased: bool = False, crf: bool = False):
        self.spec = T.get_task(spec) if isinstance(spec, str) else spec
        if self.spec.kind != self.kind:
            raise ValueError(f"task {self.spec.name} is {self.spec.kind}, not {self.kind}")
        if batch_size < 1 or max_length < 8:
            raise ValueError(f"--batch-size must be >= 1 and --max-length >= 8, got {batch_size} and {max_length}")
        self._check_recipe(bucket, layer_decay, ema, label_smoothing, sentence_weight, cased, crf)
        self.name, self.metric, self.mode, self.seed = self.spec.name, self.spec.metric, self.spec.mode, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.head, self.lora = head, dict(targets=lora_targets, r=lora_r, alpha=lora_alpha) if lora else None
        self.val_split, self.layer_decay, self.weight_decay, self.ema = val_split, layer_decay, weight_decay, ema
        self.label_smoothing, self.sentence_weight, self.cased, self.crf = label_smoothing, sentence_weight, cased, crf
        train, val = T.load_train_val(self.spec, data, val_split, val_size)
        # whole sentences are found in the full training file, before --max-train takes a sample
        whole = whole_sentences([e.text_a for e in train]) if sentence_weight != 1 else [False] * len(train)
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)  # --max-train takes a spread of the file, not its first block
        order = order[:max_train] if max_train else order
        self.train_examples = [train[i] for i in order]
        self.row_weights = [sentence_weight if whole[i] else 1.0 for i in order]
        self.val_examples = val[:max_val] if max_val else val
        self.pretrained, self.tokenizer = load_pretrained(model)
        limit = max_positions(self.pretrained)
        if limit is not None and max_length > limit:
            raise ValueError(f"--max-length {max_length} exceeds the model's {limit} positions")
        self.pad = pad_id(self.pretrained, self.tokenizer)
        self.train_features = T.encode_split(self.spec, self.tokenizer, self.train_examples, max_length, stride)
        self.val_features = T.encode_split(self.spec, self.tokenizer, self.val_examples, max_length, stride)
        self.sampler = EpochSampler(len(self.train_features), batch_size, seed)
        if bucket:
            self.sampler = BucketSampler(self.sampler, [len(f["input_ids"]) for f in self.train_features], bucket,
                                         seed)
        self.token_types: bool | None = None
        self.trainable_params = 0

    def _check_recipe(self, bucket, layer_decay, ema, label_smoothing, sentence_weight, cased, crf) -> None:
        if bucket < 0:
            raise ValueError(f"--bucket must be >= 0 (0 = off), got {bucket}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1] (1 = off), got {layer_decay}")
        if not 0 <= ema < 1:
            raise ValueError(f"--ema must be in [0, 1) (0 = off), got {ema}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and (self.kind == "qa" or self.spec.problem == "regression"):
            raise ValueError(f"--label-smoothing is for classification and NER, not {self.spec.name}")
        if sentence_weight <= 0:
            raise ValueError(f"--sentence-weight must be > 0, got {sentence_weight}")
        if sentence_weight != 1 and self.spec.name != "sst2":
            raise ValueError(f"--sentence-weight is for sst2 (whole sentences among its phrases), not {self.spec.name}")
        if (cased or crf) and self.kind != "token_cls":
            raise ValueError(f"--{'cased' if cased else 'crf'} is for NER, not {self.spec.name}")
        if crf and label_smoothing:
            raise ValueError("--crf and --label-smoothing do not combine (a CRF scores whole tag sequences)")

    # -- model ------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A copy of the pretrained model with a fresh head (drawn from the Trainer's seeded RNG),
        LoRA applied and unused parts frozen, and the weight average when ``ema``: the same model
        for a fresh run and a resume."""
        net = self.assemble()
        self.trainable_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        return E.attach(net, self.ema) if self.ema else net

    def assemble(self) -> nn.Module:
        net = attach_head(self.spec, copy.deepcopy(self.pretrained), self.tokenizer, head=self.head,
                          word_shapes=len(T.WORD_SHAPES) if self.cased else 0, crf=self.crf)
        if self.lora is not None:
            apply_task_lora(net, **self.lora)
        freeze_unused_pooler(net)
        self.token_types = uses_token_types(net)
        return net

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        if self.layer_decay == 1:
            return None  # the one rule of train.optim
        from ..layer_decay import layer_decay_groups

        return layer_decay_groups(model, self.layer_decay, self.weight_decay)

    def after_step(self, model: nn.Module) -> None:
        ema = E.find(model)
        if ema is not None:
            ema.update(model)

    def export(self, model: nn.Module, folder: str | Path) -> Path:
        return super().export(E.export_copy(model), folder)

    # -- data ---------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        idx = self.sampler.indices(index)
        mine = shard(idx, rank, world)
        out = T.collate([self.train_features[i] for i in mine], self.pad, T.label_keys(self.kind))
        if self.kind == "seq_cls" and (self.sentence_weight != 1 or self.label_smoothing):
            total = sum(self.row_weights[i] for i in idx)  # the GLOBAL batch's weight
            out["weights"] = torch.tensor([self.row_weights[i] for i in mine], dtype=torch.float32)
            out["weight_per_rank"] = torch.tensor(total / world, dtype=torch.float32)
        return out

    # -- objective ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "weights" not in batch:
            return {"loss": task_forward(model, batch, self.kind, self.token_types).loss}
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights", "weight_per_rank")}
        logits = task_forward(model, inputs, self.kind, self.token_types).logits
        ce = F.cross_entropy(logits.float(), batch["labels"], reduction="none", label_smoothing=self.label_smoothing)
        return {"loss": (ce * batch["weights"]).sum() / batch["weight_per_rank"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with E.averaged(model):
            return self.predictions(model)[0]

    def predictions(self, model: nn.Module) -> tuple[dict[str, float], list[dict]]:
        """(val metrics, one prediction record per val example)."""
        from ...eval.text_tasks import evaluate

        return evaluate(model, self.spec, self.val_examples, self.val_features, self.pad, self.eval_batch_size)

    def summary(self) -> dict[str, Any]:
        from ...eval.text_tasks import baseline

        return {"task": self.name, "kind": self.kind, "metric": self.metric, "val_split": self.val_split,
                "train_examples": len(self.train_examples), "train_features": len(self.train_features),
                **({"sentence_rows": sum(w != 1 for w in self.row_weights)} if self.sentence_weight != 1 else {}),
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
        if self.crf:  # the sentences' -log p(tags), per labelled word of the global batch
            return {"loss": unwrap(model).crf_nll(logits, batch["labels"]) / batch["tokens_per_rank"]}
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                             reduction="sum", label_smoothing=self.label_smoothing)
        return {"loss": ce / batch["tokens_per_rank"]}


class ExtractiveQATask(TextTask):
    """Start and end of the answer span per context window (windows without the answer point at
    [CLS], as in BERT's SQuAD 2.0 setup and HF run_qa.py)."""

    kind = "qa"

    def assemble(self) -> nn.Module:
        net = super().assemble()
        # softmax_i(S.h_i + b) does not depend on b: the bias's gradient is exactly 0, and Adam
        # would turn the rounding noise left in it into steps of ~lr; it stays at its init (0).
        bias = getattr(getattr(net, "qa_outputs", None), "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            bias.requires_grad_(False)
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
