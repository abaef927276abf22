"""VQA results: VisualBERT and ViLBERT trained from scratch with ``train-vqa``, and the generative
VLM (``train-vlm --stage 2`` on a fresh image tower, scored by ``eval-vqa``), on easy-VQA and
DAQUAR under a wall-clock budget each, val accuracy beside the most-frequent-answer baseline.

Accuracy is exact match of the normalised answer (both sets have one answer per question);
the baseline always predicts the commonest training answer. Each run keeps its best
checkpoint and curves under ``--out/<data>-<arch>/``; the table goes to stdout and JSON.

    .venv/bin/python bench/vqa_results.py --minutes 45 --threads 2        # the docs/results.md numbers
    .venv/bin/python bench/vqa_results.py --minutes 0.1 --daquar-minutes 0.1 --out /tmp/vqa_smoke  # smoke test

The goal of issue 6 is easy-VQA val accuracy >= 98% within 45 minutes on 2 CPU cores. The
defaults of ``train-vqa`` (64 px input, a 4-stage ResNet stem giving 4x4 visual tokens of 128
features, width 128, AdamW 1e-3 with 200 warm-up steps and a cosine fitted to the budget) are
the easy-VQA recipe; easy-VQA adds flips (its questions never mention left or right).
DAQUAR's 308 training questions on 36 indoor photos are far too few to learn from scratch,
so its row is there to compare with the baseline, with dropout and a short budget.

The generative VLM ("vlm" rows) writes the answer as text with SmolLM2-135M-Instruct's real
weights truncated to their first 4 blocks (``--decoder smollm2:4``: Gromov et al., 2024; a step
costs ~4/30 of the full decoder's) with LoRA on attention and MLPs, fed by a fresh 64 px
conv-stem ViT (``vit-nano-conv64``, trained with the projector) through a 4x4 pixel shuffle:
the whole 4x4 patch grid becomes one image token. The prompt is BOS + question + image, without
the chat template and its default system turn (~12 tokens instead of ~55), so the image token
is the position that predicts the answer's first token (LLaVA also puts the image after the
question in half of its training prompts). With the image before the question, a 5.5-minute
1-thread pilot stalled at 66% (language priors only: the same answers with shuffled images).
Budget: ``--vlm-minutes`` (the lead's 1-thread runs: 15); the accuracy is ``eval-vqa``'s greedy
answers over the whole val split, normalised exact match.

    .venv/bin/python bench/vqa_results.py --archs vlm --vlm-minutes 15 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# per data set and per model: train-vqa keyword arguments on top of its defaults
SETTINGS = {
    "easy_vqa": dict(flip=True, eval_every=250),
    "daquar": dict(flip=False, eval_every=25, batch_size=32, dropout=0.1, weight_decay=0.1, warmup=50),
}
# ViLBERT: 1 text + 1 vision block, then 2 co-attention layers (each a cross-attending block per
# stream), about the compute of VisualBERT's 3 joint blocks
ARCH = {"visualbert": {}, "vilbert": dict(layers=2)}
# generative VLM: train_vlm stage-2 keyword arguments (a fresh tower, no --init), per data set on top
VLM = dict(stage=2, vision="vit-nano-conv64", decoder="smollm2:4", pixel_shuffle=4, lora=16, lora_mlp=True,
           vqa_prompt="{question}<image>", vqa_chat=False, batch_size=32, lr=1e-3, warmup=50)
VLM_SETTINGS = {
    "easy_vqa": dict(crop_scale=1.0, flip=True, eval_every=100, val_samples=512),  # shapes stay whole
    "daquar": dict(crop_scale=0.5, flip=False, eval_every=25, val_samples=20),
}


def run(data: str, arch: str, minutes: float, threads: int, out: Path, progress: bool) -> dict:
    if arch == "vlm":
        return run_vlm(data, minutes, threads, out, progress)
    from polymodal.commands.vqa import train_vqa
    from polymodal.models.registry import load_model

    # max_steps=0 and unbounded epochs: the wall-clock budget ends the run (and its cosine)
    s = train_vqa(data=str(DATA / data), out=str(out / f"{data}-{arch}"), arch=arch, minutes=minutes, max_steps=0,
                  epochs=10_000, threads=threads, progress=progress, overwrite=True, **SETTINGS[data], **ARCH[arch])
    params = sum(p.numel() for p in load_model(s["model"]).parameters())
    return {"data": data, "arch": arch, "val_accuracy": s["best"], "baseline_accuracy": s["baseline_accuracy"],
            "baseline_answer": s["baseline_answer"], "train_seconds": s["elapsed_s"], "steps": s["step"],
            "best_step": s["best_step"], "params": params, "threads": threads, "n_val": s["n_val"],
            "checkpoint": s["model"]}


def run_vlm(data: str, minutes: float, threads: int, out: Path, progress: bool) -> dict:
    """train-vlm stage 2 from a fresh tower, then eval-vqa (greedy answers) on the whole val split."""
    from polymodal.commands.vlm import train_vlm
    from polymodal.commands.vqa import eval_vqa

    run_dir = out / f"{data}-vlm"
    s = train_vlm(data=str(DATA / data), out=str(run_dir), minutes=minutes, max_steps=0, epochs=10_000,
                  threads=threads, progress=progress, overwrite=True, **VLM, **VLM_SETTINGS[data])
    e = eval_vqa(model=str(run_dir), data=str(DATA / data), split="val", json_out=str(run_dir / "eval-vqa.json"),
                 predictions=str(run_dir / "val_predictions.jsonl"), progress=progress)
    curve = [(r["step"], r["val_accuracy"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())
             if "val_accuracy" in r]
    return {"data": data, "arch": "vlm", "val_accuracy": e["accuracy"], "baseline_accuracy": e["baseline_accuracy"],
            "baseline_answer": e["baseline_answer"], "train_seconds": s["elapsed_s"], "steps": s["step"],
            "best_step": s["best_step"], "params": s["trainable_params"], "threads": threads, "n_val": e["n"],
            "val_answer_accuracy_curve": curve, "checkpoint": s["model"]}


def table(rows: list[dict]) -> str:
    lines = [f"{'data':<9} {'model':<10} {'val acc':>8} {'baseline':>9} {'train s':>8} {'steps':>7} {'params':>8}"]
    # params: the trained ones (the VLM's frozen SmolLM2 blocks and embeddings are not counted)
    for r in rows:
        lines.append(f"{r['data']:<9} {r['arch']:<10} {100 * r['val_accuracy']:7.2f}% {100 * r['baseline_accuracy']:8.2f}% "
                     f"{r['train_seconds']:8.0f} {r['steps']:7d} {r['params'] / 1e6:7.2f}M")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=45.0, help="training budget per easy-VQA run")
    ap.add_argument("--daquar-minutes", type=float, default=5.0, help="training budget per DAQUAR run")
    ap.add_argument("--vlm-minutes", type=float, default=None,
                    help="budget of the VLM's easy-VQA run (default: --minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", nargs="+", default=["visualbert", "vilbert", "vlm"],
                    choices=["visualbert", "vilbert", "vlm"])
    ap.add_argument("--datasets", nargs="+", default=["easy_vqa", "daquar"], choices=sorted(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "vqa_bench"))
    ap.add_argument("--json-out", default=None, help="default: <out>/vqa_results.json")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args(argv)

    out = Path(args.out)
    rows = []
    for data in args.datasets:
        if not (DATA / data).is_dir():
            print(f"skipping {data}: {DATA / data} not found", file=sys.stderr)
            continue
        for arch in args.archs:
            minutes = args.minutes if data == "easy_vqa" else args.daquar_minutes
            if arch == "vlm" and data == "easy_vqa" and args.vlm_minutes is not None:
                minutes = args.vlm_minutes
            print(f"== {data} / {arch}: {minutes} min on {args.threads} thread(s)", flush=True)
            rows.append(run(data, arch, minutes, args.threads, out, args.progress))
    if not rows:
        print("no data set found", file=sys.stderr)
        return 1
    print(table(rows))
    path = Path(args.json_out) if args.json_out else out / "vqa_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"minutes": args.minutes, "daquar_minutes": args.daquar_minutes,
                                "vlm_minutes": args.vlm_minutes,
                                "threads": args.threads, "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
