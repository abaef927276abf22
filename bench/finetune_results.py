"""Issue 4's results: fine-tune all-MiniLM-L6-v2 on SST-2, CoNLL-2003 and the SQuAD subset within a
time budget each (train on train, report on val), next to each task's trivial baseline.

Each run is exactly `polymodal finetune` with the recipe below (the command line is printed), so a
user reproduces a row with the CLI alone:

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_results.py --tasks sst2 conll2003 squad
    .venv/bin/python bench/finetune_results.py --tasks sst2 --minutes 2 --max-train 2000   # smoke

Baselines: majority class (SST-2 accuracy), all-"O" (CoNLL entity F1 = 0), and for SQuAD the
context sentence with the most word overlap with the question (``polymodal.eval.text_tasks.baseline``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from polymodal.commands.finetune import finetune

# the recipes docs/results.md quotes (budgets are wall-clock minutes of training)
RECIPES = {
    "sst2": dict(epochs=1, lr=1e-4, batch_size=32, max_length=66, eval_every=300, minutes=28),
    "conll2003": dict(epochs=3, lr=1e-4, batch_size=32, max_length=128, eval_every=200, minutes=25),
    "squad": dict(epochs=6, lr=1e-4, batch_size=16, max_length=256, stride=96, eval_every=40, minutes=12),
}


def command_line(task: str, out: str, recipe: dict) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items())
    return f"polymodal finetune --task {task} --out {out} --patience 100 --overwrite {flags}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--minutes", type=float, default=None, help="override every task's time budget")
    ap.add_argument("--max-train", type=int, default=None, help="training examples per task (smoke runs)")
    args = ap.parse_args()
    rows = []
    for task in args.tasks:
        recipe = dict(RECIPES[task])
        if args.minutes is not None:
            recipe["minutes"] = args.minutes
        out = str(Path(args.out) / task)
        print("$", command_line(task, out, recipe), flush=True)
        r = finetune(task, out=out, patience=100, max_train=args.max_train, overwrite=True, **recipe)
        key = r["metric"]
        rows.append({"task": task, "metric": key, "val": r["val"].get(key), "baseline": r["baseline"].get(key),
                     "best_step": r["best_step"], "steps": r["steps"], "train_seconds": r["train_seconds"],
                     **({"exact_match": r["val"].get("exact_match"),
                         "baseline_exact_match": r["baseline"].get("exact_match")} if task == "squad" else {})})
    print(f"\n{'task':10s} {'metric':10s} {'val':>8s} {'baseline':>9s} {'steps':>6s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['task']:10s} {row['metric']:10s} {row['val']:8.4f} {row['baseline']:9.4f} "
              f"{row['steps']:6d} {row['train_seconds']:8.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "finetune_results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
