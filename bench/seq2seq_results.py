"""Issue 7's results: train a seq2seq model within a time budget, decode the val split, score it.

    translate:  Multi30k en->de, sacreBLEU BLEU and chrF on val (goal: BLEU >= 30 within 60 minutes)
    summarize:  BBC News, ROUGE-1/2/L (rouge-score, stemming) on val beside the lead-3 baseline

Each run is the same three commands a user types (train-seq2seq, translate/summarize, score-text),
called as functions so the numbers printed here are exactly what the CLI gives:

    .venv/bin/python bench/seq2seq_results.py translate --minutes 45 --out runs/results/mt
    .venv/bin/python bench/seq2seq_results.py summarize --minutes 30 --out runs/results/sum
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from polymodal.eval.text_metrics import bleu_chrf, lead_n, rouge
from polymodal.commands.seq2seq import summarize, train_seq2seq, translate
from polymodal.data.pairs import read_pairs

DATA = {"translate": "../shared/data/multi30k", "summarize": "../shared/data/bbc_news_summary"}
# the recipes the numbers in docs/results.md were measured with
RECIPES = {
    "translate": dict(preset="t5-tiny", vocab_size=8000, n_layer=3, n_embd=256, n_head=4, batch_size=64,
                      lr=1.5e-3, warmup=300, max_steps=20000, dropout=0.1, eval_every=500, max_src_len=64, max_tgt_len=64),
    "summarize": dict(preset="bart-tiny", vocab_size=8000, n_layer=3, n_embd=256, n_head=4, batch_size=8,
                      lr=1e-3, warmup=200, max_steps=20000, dropout=0.1, eval_every=400, max_src_len=512,
                      max_tgt_len=192),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(RECIPES))
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget (decoding is extra)")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="training pairs (0 = all); for smoke tests")
    ap.add_argument("--val-limit", type=int, default=0, help="val examples decoded (0 = all)")
    ap.add_argument("--skip-train", action="store_true", help="decode and score an existing <out>/model")
    args = ap.parse_args()
    data = args.data or DATA[args.task]
    out = Path(args.out or f"runs/results/{args.task}")
    recipe = RECIPES[args.task]
    t0 = time.time()
    if not args.skip_train:
        # --overwrite: a rerun into the same folder starts over (the engine refuses to mix runs)
        train_seq2seq(data, out=str(out), task=args.task, minutes=args.minutes, limit=args.limit, overwrite=True,
                      **recipe)
    train_s = time.time() - t0
    val = read_pairs(data, args.task, "val")
    if args.val_limit:
        val = val[: args.val_limit]
    srcs, refs = [s for s, _ in val], [t for _, t in val]
    src_file, hyp_file = out / "val.src.txt", out / "val.hyp.txt"
    src_file.write_text("\n".join(s.replace("\n", " ") for s in srcs) + "\n", encoding="utf-8")
    t1 = time.time()
    if args.task == "translate":
        translate(str(out / "model"), str(src_file), str(hyp_file), num_beams=args.beams,
                  max_src_len=recipe["max_src_len"])
    else:
        summarize(str(out / "model"), str(src_file), str(hyp_file), num_beams=args.beams,
                  max_src_len=recipe["max_src_len"], max_new_tokens=recipe["max_tgt_len"])
    decode_s = time.time() - t1
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    result = {"task": args.task, "data": data, "recipe": recipe, "minutes_budget": args.minutes,
              "train_seconds": round(train_s, 1), "decode_seconds": round(decode_s, 1), "n_val": len(refs),
              "beams": args.beams}
    if args.task == "translate":
        result["ours"] = bleu_chrf(hyps, refs)
    else:
        result["ours"] = rouge(hyps, refs)
        result["lead3"] = rouge([lead_n(s, 3) for s in srcs], refs)
    summary = out / "summary.json"  # the engine's run summary
    if summary.exists():
        s = json.loads(summary.read_text())
        result["best_val_loss"] = s["best"]
        result["steps"] = s["step"]
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
