"""Masked-LM pretraining (BERT, RoBERTa, ALBERT, MiniLM) as a Task, with NSP or SOP where asked.

Objective (docs/mlm.md): L = L_MLM + L_pair, with

    L_MLM = -1/|M| sum_{t in M} log p(x_t | x~)        (Devlin et al. 2019, sec. 3.1 "Task #1")

over the set M of chosen positions of the global batch (80% [MASK], 10% random, 10% kept;
``polymodal.data.mlm.mask_tokens``) and L_pair the 2-way cross-entropy of next-sentence
prediction (BERT, "Task #2") or sentence-order prediction (ALBERT, Lan et al. 2020, sec. 3.2) on
the pooled [CLS]; RoBERTa (Liu et al. 2019, sec. 4.2) trains L_MLM alone.

Exact resume and distribution: global micro-batch ``index`` is a pure function of the index.
Its epoch ``e = index // steps_per_epoch`` fixes the instances (pairs are cut afresh with seed
``seed + 1000 e``, so NSP negatives and cut points vary between passes) and their order; its
mask is drawn from a generator seeded by ``index`` (RoBERTa's dynamic masking, sec. 4.1: a new
mask for every batch, yet reproducible). The whole global batch is padded and masked, then
sliced by rank; since the ranks' slices hold different numbers of masked tokens, each rank
divides its summed MLM loss by |M| / world, so the average over ranks is L_MLM of the global
batch exactly (and 2 ranks equal 1 process).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.mlm import (PairFormat, build_instances, collate, mask_token_id, mask_tokens, read_documents,
                         special_ids, split_documents, tokenize_documents)
from ...models.pretraining import (freeze_unused, head_task, load_encoder, objective_for, preset_config,
                                   preset_variant, train_tokenizer_for, with_heads)
from .base import Task, shard


def resume_tokenizer(out: str | Path):
    """The tokenizer saved with a run's newest checkpoint (a resumed run keeps its vocabulary), or None."""
    from ...tokenizers import Tokenizer
    from ..checkpoint import latest_checkpoint

    ck = latest_checkpoint(out) if (Path(out) / "checkpoints").is_dir() else None
    return Tokenizer.load(ck) if ck is not None and (ck / "tokenizer.json").is_file() else None


class MLMTask(Task):
    name, metric, mode, unit = "mlm", "loss", "min", "tok"

    def __init__(self, data: Sequence[str | Path], preset: str | None = None, model: str | None = None,
                 objective: str | None = None, whole_word: bool = False, vocab_size: int = 8000,
                 lowercase: bool = True, max_length: int = 128, batch_size: int = 32, mask_prob: float = 0.15,
                 val_fraction: float = 0.05, max_val: int = 1000, text_field: str | None = None,
                 weight_decay: float = 0.01, seed: int = 0, tokenizer=None):
        if (preset is None) == (model is None):
            raise ValueError("give exactly one of --preset (train from scratch) or --model (continue pretraining)")
        if not 0 < mask_prob < 1:
            raise ValueError(f"--mask-prob must be in (0, 1), got {mask_prob}")
        if batch_size < 1 or max_length < 4:
            raise ValueError(f"--batch-size must be >= 1 and --max-length >= 4, got {batch_size} and {max_length}")
        self.batch_size, self.mask_prob, self.whole_word = batch_size, mask_prob, whole_word
        self.weight_decay, self.seed, self.preset, self.source = weight_decay, seed, preset, model
        train_docs, val_docs = split_documents(read_documents(data, text_field), val_fraction)
        self._setup_model(train_docs, objective, vocab_size, lowercase, tokenizer)
        self.max_length = min(max_length, self.model_config.max_tokens)
        self._setup_tokens()
        self.train_docs = tokenize_documents(self.tokenizer, train_docs)
        self._cache: tuple[int, list[dict], list[int]] | None = None
        first = self._epoch(0)[0]
        if len(first) < batch_size:
            raise ValueError(f"{', '.join(map(str, data))}: too short to form a batch: {len(first)} training "
                             f"sequences of up to {self.max_length} tokens, fewer than --batch-size {batch_size}; "
                             "give more text or a smaller --batch-size")
        self.n_train, self._spe = len(first), len(first) // batch_size
        self.val_batches = self._eval_batches(tokenize_documents(self.tokenizer, val_docs), first, max_val)

    # -- set-up ----------------------------------------------------------------------------------
    def _setup_model(self, train_docs, objective, vocab_size, lowercase, tokenizer) -> None:
        """A preset (and a tokenizer trained on the training text) or a checkpoint (with its own)."""
        if self.preset is not None:
            variant = preset_variant(self.preset)
            self.objective = objective_for(variant, objective)
            self.tokenizer = tokenizer or train_tokenizer_for(
                variant, ["\n".join(d) + "\n" for d in train_docs], vocab_size, lowercase)
            self.model_config = preset_config(self.preset, self.tokenizer, self.objective)
            self._source = None
        else:
            self._source, own = load_encoder(self.source)
            self.objective = objective_for(self._source.config.variant, objective)
            self.tokenizer = tokenizer or own
            self.model_config = dataclasses.replace(self._source.config, task=head_task(self.objective))

    def _setup_tokens(self) -> None:
        tok, cfg = self.tokenizer, self.model_config
        self.fmt = PairFormat.from_tokenizer(tok)
        self.mask_id = mask_token_id(tok)
        specials = special_ids(tok)
        self.pad_id = tok.pad_id if tok.pad_id is not None else (cfg.pad_token_id or 0)
        self.specials = torch.tensor(sorted(specials), dtype=torch.long)
        # the random 10%: any ordinary token, never a special one
        self.replace_ids = torch.tensor([i for i in range(min(tok.vocab_size, cfg.vocab_size)) if i not in specials])
        self.use_types = cfg.type_vocab_size > 1
        self.pairs = self.objective != "mlm"

    def _epoch(self, epoch: int) -> tuple[list[dict], list[int]]:
        """The instances of pass ``epoch`` and their order (pairs are re-cut on every pass; packed
        single segments are the same each pass, only their order changes)."""
        if self._cache is None or self._cache[0] != epoch:
            if self._cache is not None and not self.pairs:
                inst = self._cache[1]
            else:
                inst = build_instances(self.train_docs, self.fmt, self.max_length, self.objective,
                                       random.Random(self.seed + 1000 * epoch))
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cache = (epoch, inst, torch.randperm(len(inst), generator=g).tolist())
        return self._cache[1], self._cache[2]

    def _eval_batches(self, val_docs, train_inst: list[dict], max_val: int) -> list[dict]:
        """Held-out sequences with masks drawn once (seed + 2), so every evaluation (and that of a
        run continued from this one) scores the same inputs. NSP's negatives need two documents:
        with fewer held out, or none (--val-fraction 0), a fixed slice of the training sequences is scored."""
        ok = len(val_docs) >= (2 if self.objective == "mlm+nsp" else 1)
        inst = build_instances(val_docs, self.fmt, self.max_length, self.objective, random.Random(self.seed + 1)) if ok else []
        self.eval_on = "val" if inst else "train"
        inst = (inst or train_inst)[:max_val]
        self.n_val = len(inst)
        g = torch.Generator().manual_seed(self.seed + 2)
        return [self._masked(collate(inst[s:s + self.batch_size], self.pad_id, self.specials), g)
                for s in range(0, len(inst), self.batch_size)]

    def _masked(self, b: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = mask_tokens(b["input_ids"], b["special_mask"], self.mask_id, self.replace_ids, self.mask_prob,
                           b["word_ids"] if self.whole_word else None, g)
        return {"input_ids": x, "labels": y, "attention_mask": b["attention_mask"],
                "token_type_ids": b["token_type_ids"], "pair_labels": b["pair_labels"]}

    # -- the Task interface ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if self._source is None:
            from ...models.encoder import build_encoder

            return build_encoder(self.model_config)
        return freeze_unused(with_heads(self._source, self.objective, str(self.source)), self.objective)

    def steps_per_epoch(self) -> int:
        return self._spe

    def batch(self, index: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(index, self._spe)
        inst, order = self._epoch(epoch)
        rows = [inst[order[(k * self.batch_size + j) % len(order)]] for j in range(self.batch_size)]
        full = self._masked(collate(rows, self.pad_id, self.specials),
                            torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        out = {k: shard(v, rank, world) for k, v in full.items()}
        # |M| / world: see the module docstring (the slices' masked counts differ)
        out["mlm_norm"] = torch.tensor(int(full["labels"].ne(-100).sum()) / world)
        return out

    def _forward(self, model: nn.Module, b: dict):
        out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"] if self.use_types else None)
        logits, pair_logits = out if isinstance(out, tuple) else (out, None)
        return logits, pair_logits if self.pairs else None

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits, pair_logits = self._forward(model, batch)
        sel = batch["labels"].ne(-100)
        mlm = F.cross_entropy(logits[sel].float(), batch["labels"][sel], reduction="sum") / batch["mlm_norm"]
        if pair_logits is None:
            return {"loss": mlm, "mlm_loss": mlm.detach()}
        pair = F.cross_entropy(pair_logits.float(), batch["pair_labels"])
        return {"loss": mlm + pair, "mlm_loss": mlm.detach(), "pair_loss": pair.detach()}

    def count(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """MLM loss (mean over the masked tokens) and accuracy; with a pair task its loss and accuracy."""
        device = next(model.parameters()).device
        nll = hit = n = pair_nll = pair_hit = pair_n = 0.0
        for b in self.val_batches:
            b = {k: v.to(device) for k, v in b.items()}
            logits, pair_logits = self._forward(model, b)
            sel = b["labels"].ne(-100)
            lg, y = logits[sel].float(), b["labels"][sel]
            nll += float(F.cross_entropy(lg, y, reduction="sum"))
            hit += int((lg.argmax(-1) == y).sum())
            n += int(sel.sum())
            if pair_logits is not None:
                pair_nll += float(F.cross_entropy(pair_logits.float(), b["pair_labels"], reduction="sum"))
                pair_hit += int((pair_logits.argmax(-1) == b["pair_labels"]).sum())
                pair_n += len(b["pair_labels"])
        out = {"loss": nll / max(n, 1), "mlm_accuracy": hit / max(n, 1)}
        if pair_n:
            out.update(pair_loss=pair_nll / pair_n, pair_accuracy=pair_hit / pair_n)
        return out

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The one decay rule, with BERT's Adam epsilon 1e-6 (appendix A.2)."""
        from ..optim import param_groups

        return [{**g, "eps": 1e-6} for g in param_groups(model, self.weight_decay)]

    def summary(self) -> dict[str, Any]:
        return {"arch": self.model_config.name, "init": self.source, "objective": self.objective,
                "whole_word": self.whole_word, "vocab_size": self.tokenizer.vocab_size, "max_length": self.max_length,
                "train_sequences": self.n_train, "eval_sequences": self.n_val, "eval_on": self.eval_on,
                "steps_per_epoch": self._spe}
