"""``polymodal quickstart``: a character-level GPT on Tiny Shakespeare in minutes on a CPU.

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

from .commands import REPO_ROOT, load_recipe

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


def quickstart(minutes: float = 10.0, recipe: str = "configs/shakespeare-char.yaml", out: str = "runs/quickstart",
               data: str = "../shared/data/tiny_shakespeare", seed: int = 1337, ngram_order: int = 5,
               max_steps: int | None = None) -> dict:
    """Train a character-level GPT on Tiny Shakespeare within a time budget and compare it with an n-gram model.

    Args:
        minutes: training time budget (the final eval, checkpoint and sample come after it)
        recipe: YAML recipe (resolved against the repo's configs/)
        out: run folder (checkpoints, metrics.jsonl, loss.png, summary.json)
        data: folder with train.txt and val.txt (also found via $POLYMODAL_DATA or ../shared/data)
        seed: random seed (initialisation, batches, sampling)
        ngram_order: order of the Kneser-Ney character baseline (0 skips it)
        max_steps: optional step limit (for smoke tests; the time budget still applies)
    """
    from ..data import prepare
    from .loop import Trainer

    t_start = time.perf_counter()
    src = resolve_data(data)
    out_path = Path(out)
    shards = out_path / "data"
    train_txt, val_txt = src / "train.txt", src / "val.txt"
    meta_path = shards / "meta.json"
    fresh = meta_path.is_file() and json.loads(meta_path.read_text()).get("sources") == [str(train_txt)]
    if not fresh:
        prepare([str(train_txt)], str(shards), tokenizer="char", val=str(val_txt))

    baseline = None
    if ngram_order:
        try:
            from ..models.ngram import char_baseline
        except ImportError:  # the n-gram module is optional for the quickstart
            char_baseline = None
        if char_baseline is not None:
            baseline = char_baseline(train_txt.read_text(encoding="utf-8"), val_txt.read_text(encoding="utf-8"),
                                     order=ngram_order)
            print(f"{ngram_order}-gram Kneser-Ney baseline: val {baseline['cross_entropy']:.4f} nats/char", file=sys.stderr)

    d = load_recipe(recipe, data=str(shards), seed=seed, max_minutes=minutes, max_steps=max_steps)
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
    n_params = sum(p.numel() for p in model.parameters())
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
        "stop_reason": res["stop_reason"], "params": n_params, "model": model.config.to_dict(),
        "dtype": trainer.dtype, "threads": torch.get_num_threads(), "recipe": trainer.cfg.to_dict(),
        "checkpoint": res["checkpoint"], "total_seconds": time.perf_counter() - t_start, "sample": text,
        "note": "wall-clock numbers depend on the machine and its load",
    }
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2))
    base = f" | {baseline['order']}-gram KN baseline {baseline['cross_entropy']:.4f}" if baseline else ""
    hit = (f"reached {TARGET_VAL} after {reached['elapsed_s']:.0f} s (step {reached['step']})" if reached
           else f"did not reach {TARGET_VAL}")
    print(f"\n--- sample ({len(text)} chars) ---\n{text}\n---", file=sys.stderr)
    print(f"val loss {val_full:.4f} nats/char on val.txt after {res['step']} steps / {res['elapsed_s']:.0f} s{base}; {hit}",
          file=sys.stderr)
    print(f"run folder: {out_path} (summary.json, metrics.jsonl, loss.png, checkpoints/)", file=sys.stderr)
    return summary
