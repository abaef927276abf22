"""Task heads for fine-tuning: sequence classification/regression, token classification,
extractive QA, and sequence classification on a decoder.

Every head is a small layer on top of a backbone's hidden states h (B, T, H):

* ``SequenceClassifier`` (BERT, Devlin et al. 2019, sec. 4.1): logits = W * dropout(pool(h)) + b.
  ``pool`` is BERT's pooler tanh(W_p h_[CLS] + b_p) (``head="pooler"``, BERT/ALBERT/MiniLM), or,
  as in fairseq/HF RoBERTa (``head="roberta"``), a fresh dense + tanh on h_<s> followed by
  ``out_proj``. ``head="mean"`` classifies the mean of the real tokens' vectors (SBERT's pooling,
  Reimers & Gurevych 2019, sec. 3; the natural head for a sentence-embedding model such as
  all-MiniLM-L6-v2, whose pooler was never trained for its embeddings). ``problem="regression"`` (STS-B) has one output and an MSE loss; "classification"
  uses the cross-entropy -log softmax(logits)_y; "multi_label" a per-label sigmoid BCE.
* ``TokenClassifier`` (sec. 4.3, NER): logits_t = W * dropout(h_t) + b, cross-entropy over the
  positions whose label is not -100 (sub-tokens after the first, special tokens, padding).
* ``QuestionAnswering`` (sec. 4.2, SQuAD): one linear layer gives a start score S*h_t and an end
  score E*h_t per token; loss = (CE(start) + CE(end)) / 2, with positions outside the window
  clamped to T and ignored, exactly as HF ``BertForQuestionAnswering``.
* ``DecoderSequenceClassifier`` (GPT-1, Radford et al. 2018, sec. 3.2, eq. 3: the input goes
  through the decoder and the final token's activation h_l^m feeds a linear layer W_y): scores
  every position with a bias-free ``score`` layer and keeps the LAST real token of each row,
  as HF ``GPT2ForSequenceClassification``/``LlamaForSequenceClassification`` do; works with
  left or right padding.

Losses follow HF's ``problem_type`` rules, so a head's loss equals the HF model's loss on the
same weights (tests/test_heads.py).

Checkpoints: a fine-tuned model is one ``TaskConfig`` (family ``"task"``) that stores the task,
the head kind, the labels and the backbone's own config dict (with its ``family``), so
``registry.save_model``/``load_model`` rebuild backbone + head from config.json alone, for any
backbone family (encoder or GPT) without touching the backbones' configs. Parameter names are
``backbone.*`` plus the HF head names (``classifier.*``, ``qa_outputs.*``, ``score.*``), so the
HF weight maps only re-prefix the base model's rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from ..nn.init import normal_init_

from .config import ConfigBase

TASKS = ("seq_cls", "token_cls", "qa")
PROBLEMS = ("classification", "regression", "multi_label")
HEADS = ("auto", "pooler", "roberta", "mean", "linear", "last_token")


@dataclasses.dataclass
class TaskConfig(ConfigBase):
    family: ClassVar[str] = "task"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    task: str = "seq_cls"  # seq_cls | token_cls | qa
    backbone: dict = dataclasses.field(default_factory=dict)  # the backbone's config dict (with "family")
    num_labels: int = 2
    problem: str = "classification"  # seq_cls: classification | regression | multi_label
    head: str = "auto"  # pooler (BERT) | roberta (dense+tanh+out_proj) | mean | linear | last_token (decoder)
    labels: tuple = ()  # label names by id (id2label); empty = 0..num_labels-1
    classifier_dropout: float | None = None  # None = the backbone's dropout
    pad_token_id: int | None = None  # decoder heads: which token is padding (None = the backbone's)
    word_shapes: int = 0  # token_cls: a learned embedding of this many word-shape classes (0 = none)
    crf: bool = False  # token_cls: a linear-chain CRF over the words' first sub-tokens (nn/crf.py)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"TaskConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.problem not in PROBLEMS:
            raise ValueError(f"TaskConfig.problem must be one of {PROBLEMS}, got {self.problem!r}")
        if self.head not in HEADS:
            raise ValueError(f"TaskConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.task == "qa":
            self.num_labels = 2  # start and end
        if self.problem == "regression" and self.num_labels != 1:
            raise ValueError(f"problem='regression' needs num_labels=1, got {self.num_labels}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"{len(self.labels)} label names for num_labels={self.num_labels}")
        if "family" not in self.backbone:
            raise ValueError("TaskConfig.backbone must be a config dict with a 'family' key")
        if self.word_shapes and (self.task != "token_cls" or self.backbone.get("family") != "encoder"):
            raise ValueError("word_shapes needs a token_cls head on an encoder backbone")
        if self.crf and self.task != "token_cls":
            raise ValueError("crf is a token_cls head")

    def backbone_config(self):
        from .registry import config_from_dict

        return config_from_dict(self.backbone, "TaskConfig.backbone")

    @property
    def id2label(self) -> list[str]:
        return list(self.labels) if self.labels else [str(i) for i in range(self.num_labels)]


class HeadOutput(NamedTuple):
    loss: torch.Tensor | None
    logits: torch.Tensor


class QAOutput(NamedTuple):
    loss: torch.Tensor | None
    start_logits: torch.Tensor
    end_logits: torch.Tensor


def _is_decoder(backbone: nn.Module) -> bool:
    return getattr(getattr(backbone, "config", None), "family", None) == "gpt"


def _base(backbone: nn.Module) -> nn.Module:
    """The bare backbone: an EncoderForMaskedLM/-PreTraining contributes its ``.encoder``."""
    from .encoder import Encoder

    enc = getattr(backbone, "encoder", None)
    return enc if isinstance(enc, Encoder) else backbone


def _init(module: nn.Module, std: float) -> None:
    # HF _init_weights: N(0, initializer_range) weights, zero biases.
    normal_init_(module, std, embeddings=False)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
    """HF's sequence-classification loss for ``problem_type`` (regression: MSE on the squeezed
    output; classification: CE; multi_label: BCE-with-logits on float multi-hot labels)."""
    logits = logits.float()
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.float().squeeze())
    if problem == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)


class TaskModel(nn.Module):
    """Backbone + head; subclasses define the head. Built from a backbone module or a ``TaskConfig``."""

    task: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, num_labels: int = 2, problem: str = "classification",
                 head: str = "auto", labels=(), classifier_dropout: float | None = None,
                 pad_token_id: int | None = None, name: str | None = None, word_shapes: int = 0,
                 crf: bool = False):
        super().__init__()
        self.backbone = _base(backbone)
        bc = self.backbone.config
        bd = bc.to_dict()
        if bd.get("family") == "encoder":
            bd["task"] = "base"  # the head's backbone is the bare Encoder (an MLM checkpoint's .encoder)
        labels = tuple(labels or ())
        if labels and num_labels != len(labels) and problem != "regression":
            num_labels = len(labels)
        if problem == "regression":
            num_labels = 1
        self.config = TaskConfig(
            name=name or f"{getattr(bc, 'name', 'custom')}-{self.task}", task=self.task, backbone=bd,
            num_labels=num_labels, problem=problem, head=self._resolve_head(head), labels=labels,
            classifier_dropout=classifier_dropout,
            pad_token_id=pad_token_id if pad_token_id is not None else getattr(bc, "pad_token_id", None),
            word_shapes=word_shapes, crf=crf)
        p = self.config.classifier_dropout
        self.drop = nn.Dropout(getattr(bc, "dropout", 0.0) if p is None else p)
        self.build_head()
        _init(self.head_modules(), getattr(bc, "init_std", 0.02))

    # -- hooks --------------------------------------------------------------------------------
    def _resolve_head(self, head: str) -> str:
        return "linear" if head == "auto" else head

    def build_head(self) -> None:
        raise NotImplementedError

    def head_modules(self) -> nn.Module:
        """The freshly initialised layers (trained in full even under LoRA, like PEFT's modules_to_save)."""
        return nn.ModuleList([m for n, m in self.named_children() if n not in ("backbone", "drop")])

    def head_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not n.startswith("backbone.")]

    def tie_weights(self) -> None:
        if hasattr(self.backbone, "tie_weights"):
            self.backbone.tie_weights()

    @property
    def n_embd(self) -> int:
        return self.backbone.config.n_embd

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        if _is_decoder(self.backbone):
            return self.backbone.hidden_states(input_ids, attention_mask)
        return self.backbone(input_ids, attention_mask, token_type_ids)


class SequenceClassifier(TaskModel):
    """One label (or score) per sequence: BERT pooler style or RoBERTa style."""

    task = "seq_cls"

    def _resolve_head(self, head: str) -> str:
        if _is_decoder(self.backbone):
            raise ValueError("a GPT backbone needs DecoderSequenceClassifier (last-token pooling)")
        if head == "auto":
            c = self.backbone.config
            # RoBERTa drops BERT's NSP-trained pooler and learns a fresh dense+tanh on <s>;
            # a BERT-style encoder without a pooler (e.g. from an MLM checkpoint) does the same.
            return "roberta" if c.variant == "roberta" or self.backbone.pooler is None else "pooler"
        if head not in ("pooler", "roberta", "mean"):
            raise ValueError(f"SequenceClassifier head must be 'pooler', 'roberta' or 'mean', got {head!r}")
        if head == "pooler" and self.backbone.pooler is None:
            raise ValueError("head='pooler' needs an encoder built with pooler=True")
        return head

    def build_head(self) -> None:
        h, n = self.n_embd, self.config.num_labels
        if self.config.head in ("pooler", "mean"):
            self.classifier = nn.Linear(h, n)
        else:
            self.classifier = nn.Module()
            self.classifier.dense = nn.Linear(h, h)
            self.classifier.out_proj = nn.Linear(h, n)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput:
        h = self.hidden(input_ids, attention_mask, token_type_ids)
        if self.config.head == "pooler":
            logits = self.classifier(self.drop(self.backbone.pool(h)))
        elif self.config.head == "mean":
            from .encoder import mean_pool

            logits = self.classifier(self.drop(mean_pool(h, attention_mask)))
        else:  # RobertaClassificationHead: dropout -> dense -> tanh -> dropout -> out_proj on <s>
            x = torch.tanh(self.classifier.dense(self.drop(h[:, 0])))
            logits = self.classifier.out_proj(self.drop(x))
        loss = classification_loss(logits, labels, self.config.problem) if labels is not None else None
        return HeadOutput(loss, logits)


class TokenClassifier(TaskModel):
    """One label per token (NER); labels of -100 are ignored.

    With ``word_shapes`` > 0 a learned table E_shape (one row per capitalisation class of the word a
    token belongs to, ``data.tasks.WORD_SHAPES``) is added to the word embeddings before the
    embedding LayerNorm, as BERT adds its segment table: an uncased backbone then sees "US" and
    "us" apart in every layer. E_shape starts at zero, so training starts from the pretrained
    network's exact function.

    With ``crf`` the logits of each word's first sub-token (the positions whose label is not
    -100) are the emissions of a linear-chain CRF over the words (``nn.crf``): the loss is the
    sentence's -log p(tags), summed (``crf_nll``), and predictions are the Viterbi path
    (``predict_tags``), so the tagger can learn that I-PER does not follow B-LOC."""

    task = "token_cls"

    def build_head(self) -> None:
        self.classifier = nn.Linear(self.n_embd, self.config.num_labels)
        if self.config.word_shapes:
            self.shape_embed = nn.Embedding(self.config.word_shapes, self.backbone.embeddings.word.embedding_dim)
        if self.config.crf:
            from ..nn.crf import CRF

            self.crf = CRF(self.config.num_labels)

    def __init__(self, backbone: nn.Module, **kw):
        super().__init__(backbone, **kw)
        if self.config.word_shapes:
            nn.init.zeros_(self.shape_embed.weight)

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None, shape_ids=None) -> torch.Tensor:
        if not self.config.word_shapes:
            return super().hidden(input_ids, attention_mask, token_type_ids)
        if shape_ids is None:
            raise ValueError("this model was trained with word shapes: pass shape_ids (data.tasks.encode_ner)")
        add = self.shape_embed(shape_ids)
        hook = self.backbone.embeddings.word.register_forward_hook(lambda m, i, out: out + add.to(out.dtype))
        try:
            return super().hidden(input_ids, attention_mask, token_type_ids)
        finally:
            hook.remove()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, shape_ids=None) -> HeadOutput:
        logits = self.classifier(self.drop(self.hidden(input_ids, attention_mask, token_type_ids, shape_ids)))
        loss = None
        if labels is not None and self.config.crf:  # per labelled word, as the cross-entropy below
            loss = self.crf_nll(logits, labels) / (labels != -100).sum().clamp(min=1)
        elif labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        return HeadOutput(loss, logits)

    def crf_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The CRF's -log p(tags) summed over the batch's sentences; words are the positions
        whose label is not -100."""
        em, tags, mask, _ = word_steps(logits.float(), labels != -100, labels)
        return self.crf.nll(em, tags, mask).sum()

    @torch.no_grad()
    def predict_tags(self, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """A tag per position (B, T): the argmax, or with a CRF the Viterbi path of the positions
        marked in ``first`` (each word's first sub-token), written back at those positions."""
        pred = logits.argmax(-1)
        if not self.config.crf:
            return pred
        em, _, mask, pos = word_steps(logits.float(), first)
        for r, path in enumerate(self.crf.decode(em, mask)):
            pred[r, pos[r, :len(path)]] = torch.tensor(path, dtype=pred.dtype, device=pred.device)
        return pred


def word_steps(logits: torch.Tensor, first: torch.Tensor, labels: torch.Tensor | None = None):
    """(emissions (B, W, K), tags (B, W) or None, mask (B, W), positions (B, W)): the marked
    positions of each row moved to the front, in order (W = the most marked in a row)."""
    b, t, k = logits.shape
    counts = first.sum(1)
    w = max(int(counts.max()) if b else 0, 1)
    pos = torch.sort((~first).to(torch.int8), dim=1, stable=True).indices[:, :w]  # marked first, in order
    em = logits.gather(1, pos.unsqueeze(-1).expand(b, w, k))
    mask = torch.arange(w, device=logits.device)[None] < counts[:, None]
    tags = labels.gather(1, pos).masked_fill(~mask, 0) if labels is not None else None
    return em, tags, mask, pos


def qa_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2; positions outside the sequence are clamped to T and ignored
    (HF: an answer cut off by the window contributes nothing)."""
    t = start_logits.size(1)
    s = start_positions.view(-1).clamp(0, t)
    e = end_positions.view(-1).clamp(0, t)
    return (F.cross_entropy(start_logits.float(), s, ignore_index=t)
            + F.cross_entropy(end_logits.float(), e, ignore_index=t)) / 2


class QuestionAnswering(TaskModel):
    """Extractive QA: start and end logits per token (``qa_outputs``: H -> 2)."""

    task = "qa"

    def __init__(self, backbone: nn.Module, **kw):
        kw.pop("num_labels", None)
        super().__init__(backbone, num_labels=2, **kw)

    def build_head(self) -> None:
        self.qa_outputs = nn.Linear(self.n_embd, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None) -> QAOutput:
        # No dropout before qa_outputs, as in HF BertForQuestionAnswering.
        logits = self.qa_outputs(self.hidden(input_ids, attention_mask, token_type_ids))
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = qa_loss(start, end, start_positions, end_positions)
        return QAOutput(loss, start.contiguous(), end.contiguous())


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     pad_token_id: int | None) -> torch.Tensor:
    """Index of each row's last real token (left or right padding).

    With a mask: the rightmost position whose mask is 1. Without: HF's rule, the rightmost
    token that is not ``pad_token_id`` ((arange * non_pad).argmax). Without either, every row
    must be full length, so the last position."""
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device)
    if attention_mask is not None:
        return (pos * attention_mask.to(torch.long)).argmax(-1)
    if pad_token_id is not None:
        return (pos * input_ids.ne(pad_token_id).long()).argmax(-1)
    if b != 1:
        raise ValueError("batches of more than one sequence need attention_mask or pad_token_id "
                         "to find each row's last token")
    return torch.full((b,), t - 1, device=input_ids.device, dtype=torch.long)


class DecoderSequenceClassifier(TaskModel):
    """Sequence classification on a GPT/LLaMA backbone from its LAST real token."""

    task = "seq_cls"

    def _resolve_head(self, head: str) -> str:
        if not _is_decoder(self.backbone):
            raise ValueError("DecoderSequenceClassifier needs a GPT-family backbone")
        if head not in ("auto", "last_token"):
            raise ValueError(f"DecoderSequenceClassifier head must be 'last_token', got {head!r}")
        return "last_token"

    def build_head(self) -> None:
        self.score = nn.Linear(self.n_embd, self.config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> HeadOutput:
        h = self.backbone.hidden_states(input_ids, attention_mask)
        idx = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        # Pool before scoring: the same numbers as HF's score-then-gather, T times cheaper.
        logits = self.score(self.drop(h[torch.arange(h.size(0), device=h.device), idx]))
        loss = classification_loss(logits, labels, self.config.problem) if labels is not None else None
        return HeadOutput(loss, logits)


def task_model_class(config: TaskConfig) -> type[TaskModel]:
    if config.task == "seq_cls":
        return DecoderSequenceClassifier if config.backbone.get("family") == "gpt" else SequenceClassifier
    return {"token_cls": TokenClassifier, "qa": QuestionAnswering}[config.task]


def build_task_model(config: TaskConfig) -> TaskModel:
    """The registry's constructor: backbone from ``config.backbone``, then the head."""
    from .registry import build_model

    backbone = build_model(config.backbone_config())
    kw = dict(problem=config.problem, head=config.head, labels=config.labels,
              classifier_dropout=config.classifier_dropout, pad_token_id=config.pad_token_id, name=config.name)
    cls = task_model_class(config)
    if config.word_shapes:
        kw["word_shapes"] = config.word_shapes
    if config.crf:
        kw["crf"] = True
    if cls is not QuestionAnswering:
        kw["num_labels"] = config.num_labels
    model = cls(backbone, **kw)
    model.config = config  # keep the exact saved config (e.g. its name)
    return model


def for_task(task: str, backbone: nn.Module, **kw) -> TaskModel:
    """The right head for ``task`` on ``backbone`` (a decoder gets last-token pooling)."""
    if task == "seq_cls":
        return (DecoderSequenceClassifier if _is_decoder(_base(backbone)) else SequenceClassifier)(backbone, **kw)
    if task == "token_cls":
        return TokenClassifier(backbone, **kw)
    if task == "qa":
        return QuestionAnswering(backbone, **kw)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
