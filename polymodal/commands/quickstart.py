"""``polymodal quickstart``: a character-level GPT on Tiny Shakespeare in minutes on a CPU, next to a
Kneser-Ney n-gram baseline (the recipe is ``polymodal.train.quickstart``)."""
from __future__ import annotations

import sys


def quickstart(minutes: float = 10.0, recipe: str = "configs/shakespeare-char.yaml", out: str = "runs/quickstart",
               data: str = "../shared/data/tiny_shakespeare", seed: int = 1337, ngram_order: int = 5,
               max_steps: int | None = None, device: str | None = None) -> dict:
    """Train a character-level GPT on Tiny Shakespeare within a time budget and compare it with an n-gram model.

    Args:
        minutes: training time budget (the final eval, checkpoint and sample come after it)
        recipe: YAML recipe (resolved against the repo's configs/)
        out: run folder (checkpoints/, model/, metrics.jsonl, curve.png, summary.json)
        data: folder with train.txt and val.txt (also found via $POLYMODAL_DATA or ../shared/data)
        seed: random seed (initialisation, batches, sampling)
        ngram_order: order of the Kneser-Ney character baseline (0 skips it)
        max_steps: optional step limit (for smoke tests; the time budget still applies)
        device: auto, cpu, cuda (default: the recipe's, auto)
    """
    from ..train.quickstart import TARGET_VAL, run_quickstart

    if minutes < 0:
        raise ValueError(f"--minutes must be >= 0 (0 = no limit), got {minutes}")
    s = run_quickstart(minutes, recipe, out, data, seed, ngram_order, max_steps, device)
    b = s["ngram_baseline"]
    base = f" | {b['order']}-gram KN baseline {b['val_loss']:.4f}" if b else ""
    hit = (f"reached {TARGET_VAL} after {s['seconds_to_target']:.0f} s (step {s['step_at_target']})"
           if s["seconds_to_target"] is not None else f"did not reach {TARGET_VAL}")
    print(f"\n--- sample ({len(s['sample'])} chars) ---\n{s['sample']}\n---", file=sys.stderr)
    print(f"val loss {s['val_loss']:.4f} nats/char on val.txt after {s['steps']} steps / {s['train_seconds']:.0f} s"
          f"{base}; {hit}", file=sys.stderr)
    print(f"run folder: {out} (summary.json, metrics.jsonl, curve.png, checkpoints/, model/)", file=sys.stderr)
    return s
