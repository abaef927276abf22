"""Causal language modelling (GPT family) as a Task.

Objective: the mean next-token cross-entropy L = -1/(B T) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})
(Radford et al., 2018, eq. 1). Batches are ``batch_size`` random windows of ``block_size + 1``
tokens from ``train.bin`` (``polymodal prepare``), drawn from a generator seeded by the
micro-batch index, so the data position is the index itself.

MFU counts (PaLM, Chowdhery et al., 2022, appendix B) 6N + 12 L T d FLOPs per token: the forward
(2N) and backward (4N) multiply-adds of the N non-embedding-table weights, and the attention
score/value products of L layers of width d over context T.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...models.gpt import GPT, GPTConfig, lm_loss
from .base import Task, shard


def flops_per_token(model: GPT, seq_len: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if model.wpe is not None:  # a position table is a lookup, not a matmul
        n -= sum(p.numel() for p in model.wpe.parameters())
    return 6 * n + 12 * c.n_layer * seq_len * c.n_head * c.hd


def load_shards(folder: str | Path):
    """(train, val, meta) from a ``polymodal prepare`` folder; token ids beyond the vocabulary are
    refused here with the file's name, not as an IndexError deep inside the embedding."""
    from ...data import TokenShards
    from ...io import read_json

    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; prepare token shards first (polymodal prepare)")
    meta = read_json(meta_path)
    if "vocab_size" not in meta:
        raise ValueError(f"{meta_path}: no 'vocab_size' key")
    dtype = meta.get("dtype", "uint16")
    out = {}
    for split in ("train", "val"):
        p = folder / f"{split}.bin"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (expected next to {meta_path.name})")
        sh = TokenShards(p, dtype)
        if len(sh) < 2:
            raise ValueError(f"{p}: holds {len(sh)} tokens; a split needs at least 2")
        top = int(sh.data.max())
        if top >= int(meta["vocab_size"]):
            pos = int((sh.data >= int(meta["vocab_size"])).nonzero()[0][0])
            raise ValueError(f"{p}: token id {top} at position {pos} is beyond the vocabulary "
                             f"({meta['vocab_size']} ids in {meta_path.name})")
        out[split] = sh
    return out["train"], out["val"], meta


def load_tokenizer(folder: Path):
    if not (Path(folder) / "tokenizer.json").is_file():
        return None
    try:
        from ...tokenizers import Tokenizer

        return Tokenizer.load(folder)
    except Exception:  # noqa: BLE001 - a checkpoint is still useful without its tokenizer
        return None


class CausalLMTask(Task):
    name, metric, mode, unit = "causal_lm", "loss", "min", "tok"

    def __init__(self, data: str | Path, model: str = "tiny", model_overrides: dict[str, Any] | None = None,
                 batch_size: int = 32, block_size: int = 128, eval_batches: int = 20, seed: int = 0,
                 model_config: GPTConfig | None = None):
        self.train_data, self.val_data, self.meta = load_shards(data)
        self.tokenizer = load_tokenizer(Path(data))
        self.batch_size, self.block_size, self.eval_batches, self.seed = batch_size, block_size, eval_batches, seed
        if model_config is None:
            overrides = dict(model_overrides or {})
            overrides.setdefault("vocab_size", int(self.meta["vocab_size"]))
            overrides.setdefault("block_size", block_size)
            model_config = GPTConfig.from_preset(model, **overrides)
        if block_size > model_config.block_size:
            raise ValueError(f"block_size {block_size} exceeds the model's context {model_config.block_size}")
        if model_config.vocab_size < int(self.meta["vocab_size"]):
            raise ValueError(f"the model's vocab_size {model_config.vocab_size} is smaller than the data's "
                             f"{self.meta['vocab_size']}")
        self.model_config = model_config
        for split, sh in (("train", self.train_data), ("val", self.val_data)):
            if len(sh) <= block_size:
                raise ValueError(f"{Path(data) / (split + '.bin')}: {len(sh)} tokens, fewer than one window of "
                                 f"block_size + 1 = {block_size + 1}")

    def build_model(self) -> nn.Module:
        return GPT(self.model_config)

    def batch(self, index: int, rank: int, world: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x, y = self.train_data.get_batch(self.batch_size, self.block_size, g)
        return shard(x, rank, world), shard(y, rank, world)

    def loss(self, model, batch):
        x, y = batch
        return {"loss": lm_loss(model(x), y)}

    def count(self, batch) -> int:
        return int(batch[0].numel())

    def flops_per_item(self, model) -> float:
        return flops_per_token(model, self.block_size)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean loss over a fixed set of val windows (the same windows at every evaluation)."""
        import math

        gen = torch.Generator().manual_seed(self.seed + 3)
        device = next(model.parameters()).device
        losses = []
        for _ in range(self.eval_batches):
            x, y = self.val_data.get_batch(self.batch_size, self.block_size, gen)
            losses.append(float(lm_loss(model(x.to(device)), y.to(device))))
        v = sum(losses) / len(losses)
        return {"loss": v, "ppl": math.exp(min(v, 50))}

    def export(self, model, folder):
        from ...models.registry import save_model

        return save_model(model, folder, tokenizer=self.tokenizer)
