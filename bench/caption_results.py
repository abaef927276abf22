"""Flickr8k captioning with the generative VLM: stage-1 training under a time budget, then
BLEU-1..4 / METEOR / ROUGE-L / CIDEr on the val split (pycocoevalcap, PTB tokenizer).

The recipe (LLaVA stage 1, made to fit a CPU budget):
* image tower: the ViT of a CLIP trained on Flickr8k's train split by ``polymodal train-clip``
  (``--clip``; trained here first for ``--clip-minutes`` if the folder does not exist), frozen.
  Its patch features are computed once per image, for 4 views (centre crop + 3 random crops /
  flips), so a training step costs only the decoder;
* projector: LLaVA-1.5's 2-layer GELU MLP after a 2x2 pixel shuffle (8x8 patches -> 16 image
  tokens per image);
* decoder: SmolLM2-135M-Instruct with its real weights, frozen, with rank-8 LoRA adapters on
  the attention (``--lora 0`` for the projector alone). A LoRA adapter adds little to the step:
  the backward pass has to go through the decoder anyway to reach the projector;
* the loss on the caption tokens only; AdamW, warm-up then cosine to 0 at the end of the budget;
  the checkpoint with the lowest val loss is kept;
* decoding: beam search (3 beams), no repeated trigram, at most 30 tokens.

    .venv/bin/python bench/caption_results.py                          # 45 min, 2 threads
    .venv/bin/python bench/caption_results.py --minutes 0.1 --limit 4 --out /tmp/cap   # smoke test
    .venv/bin/python bench/caption_results.py --eval-only               # re-score an existing run

Goal (issue 6): val BLEU-4 >= 0.15 and CIDEr >= 0.40 within 45 minutes of training on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"BLEU-4": 0.15, "CIDEr": 0.40}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--clip", default=str(ROOT / "runs" / "results" / "clip"),
                    help="CLIP checkpoint whose image tower is used (trained here if missing)")
    ap.add_argument("--clip-minutes", type=float, default=None,
                    help="train-clip budget when --clip does not exist (default: 20, or --minutes if smaller)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "results" / "caption"), help="the train-vlm run folder")
    ap.add_argument("--minutes", type=float, default=45.0, help="stage-1 training budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", type=int, default=8)
    ap.add_argument("--pixel-shuffle", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="caption only the first N val images (smoke tests)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    ap.add_argument("--eval-only", action="store_true", help="score the model already in --out")
    ap.add_argument("--json-out", default=None, help="results JSON (default: <out>/caption_results.json)")
    args = ap.parse_args(argv)

    import torch

    from polymodal.eval.caption_metrics import METRICS
    from polymodal.commands.vlm import eval_caption, train_vlm

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    summary = None
    if not args.eval_only:
        if (out / "metrics.jsonl").exists() and not args.resume:
            if not args.overwrite:
                raise SystemExit(f"{out} already holds a run: pass --resume, --overwrite or --eval-only")
            shutil.rmtree(out)
        clip = Path(args.clip)
        if not (clip / "config.json").is_file():
            from polymodal.commands.clip import train_clip

            minutes = args.clip_minutes if args.clip_minutes is not None else min(20.0, args.minutes)
            print(f"no CLIP checkpoint at {clip}: training one for {minutes} min", flush=True)
            train_clip(data=args.data, out=str(clip), minutes=minutes, epochs=10_000, threads=args.threads,
                       eval_every=-1)
        summary = train_vlm(data=args.data, out=str(out), stage=1, vision=str(clip), decoder="smollm2",
                            pixel_shuffle=args.pixel_shuffle, lora=args.lora, batch_size=args.batch_size,
                            lr=args.lr, lora_lr=args.lora_lr, minutes=args.minutes, max_steps=0, epochs=10_000,
                            eval_every=args.eval_every, val_samples=min(64, 4 * args.limit) if args.limit else 64,
                            threads=args.threads, resume=args.resume)
    t = time.perf_counter()
    res = eval_caption(model=str(out), data=args.data, split="val", limit=args.limit, beam=args.beam,
                       out=str(out / "eval-caption-val.json"), grid=str(out / "caption_grid.png"))
    eval_s = time.perf_counter() - t

    print(f"\nFlickr8k val ({res['n_images']} images, beam {args.beam}, tokenizer {res['tokenizer']})")
    print(f"{'metric':<9} {'value':>7}  goal")
    for k in METRICS:
        v = res[k]
        goal = f">= {GOALS[k]:.2f} {'met' if v is not None and v >= GOALS[k] else 'NOT met'}" if k in GOALS else ""
        print(f"{k:<9} {'n/a' if v is None else f'{v:.4f}':>7}  {goal}")
    results = {"metrics": {k: res[k] for k in METRICS}, "n_images": res["n_images"], "beam": args.beam,
               "goals": GOALS, "train": summary, "eval_seconds": round(eval_s, 1),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json_out",)},
               "examples": [{k: p[k] for k in ("image", "caption", "references")} for p in res["predictions"][:5]]}
    path = Path(args.json_out) if args.json_out else out / "caption_results.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    print(json.dumps({"metrics": results["metrics"], "n_images": res["n_images"]}))
    return results


if __name__ == "__main__":
    main()
