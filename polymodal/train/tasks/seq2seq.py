"""Sequence-to-sequence training (T5 / BART encoder-decoders: translation, summarisation) as a Task.

Objective: the teacher-forced cross-entropy of the target given the source (Sutskever et al.
2014; Vaswani et al. 2017, sec. 5; Raffel et al. 2020, sec. 3.1.2),

    L = -1/N sum_{b,t} log p(y_{b,t} | y_{b,<t}, x_b),

summed over the N real target tokens of the global batch (padding labels are -100 and skipped);
the decoder reads the targets shifted right behind the model's start token (``shift_right``).
Each rank divides its token sum by N / world, not by its own token count, so the mean over ranks
is exactly the mean over the global batch's tokens, whatever the split.

Batches are dynamically padded (as long as their longest row). With ``bucket`` > 0 they are also
length-bucketed: the examples of ``bucket`` consecutive batches of the epoch's permutation
(:class:`EpochSampler`) are sorted by length, cut into batches, and those batches are shuffled,
so rows of a batch have similar lengths (less padding) while the order stays random. Every batch
is a pure function of its index (and the seed), which is what makes resume exact.

The metric is the token-weighted val loss (min); BLEU / ROUGE of decoded outputs are the
command's business (decoding is far slower than a loss).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.pairs import IGNORE, collate_pairs, encode_texts, read_pairs
from ...models.seq2seq import Seq2Seq, Seq2SeqConfig, config_for_tokenizer, shift_right
from .base import EpochSampler, Task, shard


def resumed_state(out: str | Path):
    """(tokenizer, model config) of a run's newest checkpoint, or (None, None) when it has none: a
    resumed run must use the vocabulary and model it was trained with."""
    from ...io import read_json
    from ...models.registry import config_from_dict
    from ...tokenizers import Tokenizer
    from ..checkpoint import latest_checkpoint

    newest = latest_checkpoint(out)
    if newest is None or not (newest / "tokenizer.json").is_file():
        return None, None
    return Tokenizer.load(newest), config_from_dict(read_json(newest / "config.json"), str(newest / "config.json"))


class Seq2SeqTask(Task):
    name, metric, mode, unit = "seq2seq", "loss", "min", "tok"

    def __init__(self, data: str | Path, task: str = "translate", preset: str = "t5-tiny", *,
                 src_lang: str = "en", tgt_lang: str = "de", tokenizer: Any = None, tokenizer_kind: str = "unigram",
                 vocab_size: int = 8000, model_config: Seq2SeqConfig | None = None,
                 model_overrides: dict[str, int] | None = None, dropout: float = 0.1, max_src_len: int = 128,
                 max_tgt_len: int = 128, batch_size: int = 32, bucket: int = 50, limit: int = 0, val_limit: int = 0,
                 eval_batch_size: int = 64, seed: int = 0):
        # each flag with its least sensible value (a length must hold a token and the EOS)
        for k, v, least in (("max_src_len", max_src_len, 2), ("max_tgt_len", max_tgt_len, 2),
                            ("batch_size", batch_size, 1), ("bucket", bucket, 0), ("limit", limit, 0),
                            ("val_limit", val_limit, 0)):
            if v < least:
                raise ValueError(f"--{k.replace('_', '-')} must be >= {least}, got {v}")
        train = read_pairs(data, task, "train", src_lang, tgt_lang)
        val = read_pairs(data, task, "val", src_lang, tgt_lang)
        train, val = train[:limit or None], val[:val_limit or None]
        if tokenizer is None:  # one vocabulary for both sides (the tied embedding)
            from ...tokenizers.seq2seq import train_seq2seq_tokenizer

            tokenizer = train_seq2seq_tokenizer([s for s, _ in train] + [t for _, t in train], vocab_size,
                                                tokenizer_kind)
        self.tokenizer = tokenizer
        self.model_config = model_config or config_for_tokenizer(
            preset, tokenizer, max_len=max(max_src_len, max_tgt_len), dropout=dropout, **(model_overrides or {}))
        if self.model_config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model's vocab_size {self.model_config.vocab_size} is smaller than the "
                             f"tokenizer's {tokenizer.vocab_size}")
        self.src = encode_texts(tokenizer, [s for s, _ in train], max_src_len)
        self.tgt = encode_texts(tokenizer, [t for _, t in train], max_tgt_len)
        self.val_src = encode_texts(tokenizer, [s for s, _ in val], max_src_len)
        self.val_tgt = encode_texts(tokenizer, [t for _, t in val], max_tgt_len)
        self.batch_size, self.bucket, self.seed, self.eval_batch_size = batch_size, bucket, seed, eval_batch_size
        self.sampler = EpochSampler(len(self.src), batch_size, seed)
        self.n_train, self.n_val = len(train), len(val)
        self._pool: tuple[tuple[int, int], list[list[int]]] | None = None

    def build_model(self) -> nn.Module:
        return Seq2Seq(self.model_config)

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    # -- batches ---------------------------------------------------------------------------------
    def indices(self, index: int) -> list[int]:
        """The training examples of global batch ``index`` (a pure function of index and seed)."""
        if not self.bucket:
            return self.sampler.indices(index)
        spe = self.sampler.steps_per_epoch
        epoch, k = divmod(index, spe)
        first = k - k % self.bucket  # the pool: this batch and its neighbours in the epoch
        key = (epoch, first)
        if self._pool is None or self._pool[0] != key:
            steps = range(epoch * spe + first, epoch * spe + min(first + self.bucket, spe))
            pool = sorted((i for s in steps for i in self.sampler.indices(s)),
                          key=lambda i: (len(self.src[i]), len(self.tgt[i]), i))
            groups = [pool[j:j + self.batch_size] for j in range(0, len(pool), self.batch_size)]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + first)
            self._pool = (key, [groups[j] for j in torch.randperm(len(groups), generator=g).tolist()])
        return self._pool[1][k - first]

    def batch(self, index: int, rank: int, world: int) -> dict[str, Any]:
        idx = self.indices(index)
        # pad the global batch, then take this rank's rows: every rank sees one shape, and the
        # loss is normalised by the global token count (see the module docstring)
        b = collate_pairs([self.src[i] for i in idx], [self.tgt[i] for i in idx], self.model_config.pad_token_id or 0)
        n_global = int((b["labels"] != IGNORE).sum())
        out = {k: shard(v, rank, world) for k, v in b.items()}
        out["decoder_input_ids"] = self._shift(out["labels"])
        out["token_scale"] = world / max(n_global, 1)
        return out

    def _shift(self, labels: torch.Tensor) -> torch.Tensor:
        c = self.model_config
        return shift_right(labels, c.decoder_start_token_id, c.pad_token_id or 0, IGNORE)

    # -- objective -------------------------------------------------------------------------------
    def loss(self, model, batch) -> dict[str, torch.Tensor]:
        # called through the (possibly DDP-wrapped) module's forward, so gradient sync hooks run
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                             reduction="sum")
        return {"loss": ce * batch["token_scale"]}

    def count(self, batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Token-weighted mean cross-entropy over the whole val split (and its perplexity)."""
        device = next(model.parameters()).device
        order = sorted(range(len(self.val_src)), key=lambda i: len(self.val_src[i]))  # similar lengths: less padding
        total, count = 0.0, 0
        for j in range(0, len(order), self.eval_batch_size):
            idx = order[j:j + self.eval_batch_size]
            b = collate_pairs([self.val_src[i] for i in idx], [self.val_tgt[i] for i in idx],
                              self.model_config.pad_token_id or 0)
            b["decoder_input_ids"] = self._shift(b["labels"])
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(b["input_ids"], b["attention_mask"], b["decoder_input_ids"])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
            count += int((b["labels"] != IGNORE).sum())
        v = total / max(count, 1)
        return {"loss": v, "ppl": math.exp(min(v, 50))}

    def summary(self) -> dict[str, Any]:
        return {"train_pairs": self.n_train, "val_pairs": self.n_val, "vocab": self.tokenizer.vocab_size,
                "preset": self.model_config.name,
                "mean_src_tokens": round(sum(map(len, self.src)) / max(len(self.src), 1), 1),
                "mean_tgt_tokens": round(sum(map(len, self.tgt)) / max(len(self.tgt), 1), 1)}
