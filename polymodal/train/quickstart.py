"""The quickstart recipe (``polymodal quickstart``): a character-level GPT on Tiny Shakespeare in minutes on a CPU.

The worked example of Karpathy's char-rnn / nanoGPT "shakespeare_char": tokenise the text into
its 65 characters, train a small pre-LN GPT (Radford et al., 2019) with the next-character
cross-entropy, and compare its validation loss (nats/char) with a 5-gram modified Kneser-Ney
model (Chen & Goodman, 1998), the strongest classical baseline on the same split.

Everything lands in ``runs/quickstart/``: ``data/`` (token shards), ``checkpoints/``,
``metrics.jsonl``, ``loss.png``, ``tb/`` and ``summary.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .recipes import REPO_ROOT, load_recipe

TARGET_VAL = 1.89  # the reference recipe's val loss; summary.json records when we reach it


def resolve_data(data: str | Path) -> Path:
    """The Tiny Shakespeare folder (train.txt + val.txt): ``data`` as given, then $POLYMODAL_DATA
    (a dataset folder or the root holding it), then ../shared/data next to the repo and the cwd."""
    p = Path(data)
    name = p.name or "tiny_shakespeare"
    candidates = [p]
    env = os.environ.get("POLYMODAL_DATA")
    if env:
        candidates += [Path(env), Path(env) / name]
    if not p.is_absolute():
        candidates += [REPO_ROOT / p, REPO_ROOT.parent / "shared" / "data" / name, Path.cwd() / p,
                       Path.cwd().parent / "shared" / "data" / name]
    for c in candidates:
        if (c / "train.txt").is_file() and (c / "val.txt").is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"Tiny Shakespeare not found: need train.txt and val.txt in one of {', '.join(map(str, candidates))}; "
        "set POLYMODAL_DATA or pass --data")


@torch.no_grad()
def full_val_loss(model, val_shards, block_size: int, batch_size: int = 32) -> float:
    """Mean cross-entropy over all of val.bin in consecutive non-overlapping windows (every
    character scored once; each window starts with an empty context, as in nanoGPT's estimate)."""
    from ..models.gpt import lm_loss

    model.eval()
    total, n = 0.0, 0
    for x, y in val_shards.iter_eval_batches(batch_size, block_size):
        total += float(lm_loss(model(x), y)) * y.numel()
        n += y.numel()
    return total / n


def sample(model, tokenizer, n_chars: int = 500, seed: int = 1337, temperature: float = 0.8) -> str:
    """``n_chars`` characters after a newline, in chunks that fit the context: each chunk is
    conditioned on the last half-context of text (the KV cache restarts per chunk)."""
    from ..generate import generate

    ctx = model.config.block_size
    ids = tokenizer.encode("\n")
    out: list[int] = []
    chunk = max(ctx // 2, 1)
    while len(out) < n_chars:
        prompt = (ids + out)[-(ctx - chunk):]
        new = generate(model, [prompt], max_new_tokens=min(chunk, n_chars - len(out)), temperature=temperature,
                       seed=seed + len(out))[0]
        if not new:
            break
        out += new
    return tokenizer.decode(out)


def prepare_char_shards(src: Path, shards: Path) -> None:
    """Character shards of train.txt (+ val.txt as the val split), reused when already made from it."""
    from ..data import prepare

    train_txt, val_txt = src / "train.txt", src / "val.txt"
    meta_path = shards / "meta.json"
    fresh = meta_path.is_file() and json.loads(meta_path.read_text()).get("sources") == [str(train_txt)]
    if not fresh:
        prepare([str(train_txt)], str(shards), tokenizer="char", val=str(val_txt))


def ngram_baseline(src: Path, order: int) -> dict | None:
    """The character Kneser-Ney model of the same order on the same split (None: order 0)."""
    if not order:
        return None
    from ..models.ngram import char_baseline

    b = char_baseline((src / "train.txt").read_text(encoding="utf-8"), (src / "val.txt").read_text(encoding="utf-8"),
                      order=order)
    print(f"{order}-gram Kneser-Ney baseline: val {b['cross_entropy']:.4f} nats/char", file=sys.stderr)
    return b


def run_quickstart(minutes: float = 10.0, recipe: str = "configs/shakespeare-char.yaml", out: str = "runs/quickstart",
                   data: str = "../shared/data/tiny_shakespeare", seed: int = 1337, ngram_order: int = 5,
                   max_steps: int | None = None, device: str | None = None) -> dict:
    """Prepares the shards, fits the n-gram baseline, trains within ``minutes``, scores all of
    val.txt, samples 500 characters; writes and returns ``summary.json``."""
    from .loop import Trainer

    t_start = time.perf_counter()
    src, out_path = resolve_data(data), Path(out)
    prepare_char_shards(src, out_path / "data")
    baseline = ngram_baseline(src, ngram_order)
    d = load_recipe(recipe, data=str(out_path / "data"), seed=seed, max_minutes=minutes, max_steps=max_steps,
                    device=device)
    trainer = Trainer(d, out_path, overwrite=True)
    try:
        res = trainer.fit()
        model = trainer.raw_model
        val_full = full_val_loss(model, trainer.val_data, trainer.cfg.block_size)
        text = sample(model, trainer.tokenizer, 500, seed=seed) if trainer.tokenizer is not None else ""
        hist = trainer.history
    finally:
        trainer.close()
    reached = next((r for r in hist if r.get("val_loss", math.inf) <= TARGET_VAL), None)
    summary = {
        "val_loss": val_full,  # all of val.txt
        "val_loss_eval_windows": res["val_loss"],  # the trainer's fixed random val windows
        "val_bits_per_char": val_full / math.log(2),
        "ngram_baseline": None if baseline is None else {
            "order": baseline["order"], "val_loss": baseline["cross_entropy"], "val_perplexity": baseline["perplexity"]},
        "target_val_loss": TARGET_VAL,
        "seconds_to_target": reached["elapsed_s"] if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "steps": res["step"], "tokens": res["tokens"], "train_seconds": res["elapsed_s"],
        "stop_reason": res["stop_reason"], "params": sum(p.numel() for p in model.parameters()),
        "model": model.config.to_dict(), "dtype": trainer.dtype, "threads": torch.get_num_threads(),
        "recipe": trainer.cfg.to_dict(), "checkpoint": res["checkpoint"],
        "total_seconds": time.perf_counter() - t_start, "sample": text, "load_average": list(os.getloadavg()),
        "note": "wall-clock numbers depend on the machine and its load",
    }
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
