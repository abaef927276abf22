"""Encoder pretraining models from presets or checkpoints: which heads an objective needs, and
which tokenizer a preset trains.

* BERT (Devlin et al. 2019, sec. 3.1) pretrains MLM + next-sentence prediction, ALBERT (Lan et al.
  2020, sec. 3.2) MLM + sentence-order prediction, RoBERTa (Liu et al. 2019, sec. 4.2) MLM alone:
  ``DEFAULT_OBJECTIVE``. The loss is L = L_MLM (+ L_NSP or L_SOP), so an objective with a pair
  task builds ``EncoderForPreTraining`` (MLM head + pair head on the pooled [CLS]) and MLM alone
  ``EncoderForMaskedLM`` (``config.task`` "pretraining" or "mlm").
* From scratch a tokenizer is trained on the text: byte-level BPE for RoBERTa (sec. 4.4),
  WordPiece for BERT/ALBERT/MiniLM (the real ALBERT uses SentencePiece; only the vocabulary
  differs), with the special-token ids the presets expect.
* Continuing a checkpoint (e.g. all-MiniLM-L6-v2, a bare encoder) keeps its weights and
  tokenizer and adds whichever head it lacks, freshly initialised.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .encoder import Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForPreTraining, build_encoder

OBJECTIVES = ("mlm", "mlm+nsp", "mlm+sop")
DEFAULT_OBJECTIVE = {"bert": "mlm+nsp", "albert": "mlm+sop", "roberta": "mlm"}


def preset_variant(preset: str) -> str:
    """The preset's variant (bert, roberta, albert); an unknown name is refused with the list."""
    if preset not in EncoderConfig.presets:
        raise ValueError(f"--preset {preset!r}: unknown encoder preset; choose from "
                         f"{', '.join(sorted(EncoderConfig.presets))}")
    return EncoderConfig.presets[preset].get("variant", "bert")


def objective_for(variant: str, objective: str | None) -> str:
    objective = objective or DEFAULT_OBJECTIVE[variant]
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r}: choose from {', '.join(OBJECTIVES)}")
    return objective


def head_task(objective: str) -> str:
    """EncoderConfig.task for an objective: "pretraining" has the NSP/SOP head, "mlm" has not."""
    return "mlm" if objective == "mlm" else "pretraining"


def train_tokenizer_for(variant: str, texts: Iterable[str], vocab_size: int, lowercase: bool = True):
    """The tokenizer a preset of ``variant`` trains from scratch on ``texts``."""
    from ..tokenizers.train import train_roberta_tokenizer, train_wordpiece_tokenizer

    if variant == "roberta":
        return train_roberta_tokenizer(texts, vocab_size)
    return train_wordpiece_tokenizer(texts, vocab_size, lowercase=lowercase)


def preset_config(preset: str, tok, objective: str) -> EncoderConfig:
    """``preset`` sized to ``tok``'s vocabulary, with its special-token ids and the objective's heads."""
    variant = preset_variant(preset)
    if variant == "roberta":
        ids = dict(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    else:
        ids = dict(pad_token_id=tok.pad_id)
        if variant == "albert":
            ids.update(bos_token_id=tok.cls_id, eos_token_id=tok.sep_id)
    return EncoderConfig.from_preset(preset, task=head_task(objective), vocab_size=tok.vocab_size, **ids)


def load_encoder(path: str | Path):
    """(model, tokenizer) of an encoder checkpoint to continue pretraining (polymodal or HF folder,
    or a run folder); a fine-tuned task model, another family or a missing tokenizer is refused."""
    from ..interop import load
    from .heads import TaskModel

    m, tok = load(path, device="cpu", dtype=torch.float32)
    if isinstance(m, TaskModel):
        raise ValueError(f"{path}: a fine-tuned {m.config.task} model; pretrain-mlm continues pretraining a "
                         "backbone (give the encoder it was fine-tuned from)")
    if getattr(getattr(m, "config", None), "family", None) != "encoder":
        raise ValueError(f"{path}: not an encoder (BERT/RoBERTa/ALBERT/MiniLM) checkpoint")
    if tok is None:
        raise ValueError(f"{path}: no tokenizer.json next to the weights")
    return m, tok


def with_heads(model: nn.Module, objective: str, where: str = "checkpoint") -> nn.Module:
    """``model`` (an encoder with or without heads) as the objective's pretraining model: the
    weights it has are kept, a missing MLM or pair head is added fresh (from the current RNG).
    ``model`` itself is not changed."""
    need = head_task(objective)
    if isinstance(model, EncoderForPreTraining) or (need == "mlm" and isinstance(model, EncoderForMaskedLM)):
        return copy.deepcopy(model)
    enc = model.encoder if isinstance(model, EncoderForMaskedLM) else model
    if not isinstance(enc, Encoder):
        raise ValueError(f"{where}: an encoder of unexpected type {type(model).__name__}")
    config = dataclasses.replace(model.config, task=need, pooler=bool(model.config.pooler) or need == "pretraining")
    new = build_encoder(config)
    missing, unexpected = new.encoder.load_state_dict(enc.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"{where}: weights do not fit the encoder (missing {missing}, unexpected {unexpected})")
    if isinstance(model, EncoderForMaskedLM):
        new.mlm.load_state_dict(model.mlm.state_dict())
    new.tie_weights()
    return new


def freeze_unused(model: nn.Module, objective: str) -> nn.Module:
    """MLM alone trains neither a pooler nor a pair head the model may carry: they are frozen (kept
    as they are, and DDP sees no parameter without a gradient)."""
    if objective == "mlm":
        for part in (getattr(model, "pair_head", None), getattr(model.encoder, "pooler", None)):
            if part is not None:
                part.requires_grad_(False)
    return model
