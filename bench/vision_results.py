"""The vision numbers of docs/results.md in one run: CIFAR-10 and Flickr8k, each beside its chance level.

1. ``train-vit`` on ../shared/data/cifar10 (1,000 training images, 100 val) for ``--minutes``,
   from scratch; val accuracy of the best evaluation and of the last one (the best is chosen on
   the same 100 images, so it is the optimistic number).
2. Linear probes (``linear-probe``): logistic regression on the frozen features of the CLIP image
   tower (``--clip``, produced by ``polymodal train-clip``) and of the ViT just trained.
3. CLIP zero-shot accuracy on the same val images (prompt ensembling).
4. Flickr8k val retrieval with the CLIP checkpoint: R@1/5/10 both ways and mean ranks; chance
   for text->image is K/N (N images), for image->text 1 - C(M - 5, K) / C(M, K) (M captions,
   5 of them relevant).

    .venv/bin/python bench/vision_results.py --minutes 15 --threads 1       # the reported run
    .venv/bin/python bench/vision_results.py --minutes 0.2 --vit-epochs 2   # smoke test
A missing CLIP checkpoint skips its rows (with a note) instead of failing the ViT part.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default=str(ROOT.parent / "shared/data/cifar10"))
    ap.add_argument("--flickr", default=str(ROOT.parent / "shared/data/flickr8k"))
    ap.add_argument("--clip", default=str(ROOT / "runs/results/clip"), help="a train-clip run or model folder")
    ap.add_argument("--vit-out", default=str(ROOT / "runs/results/vit"), help="train-vit run folder")
    ap.add_argument("--skip-train", action="store_true",
                    help="reuse <vit-out>/model (and the train-vit numbers of the previous --json) instead of training")
    ap.add_argument("--minutes", type=float, default=15.0, help="train-vit time budget")
    ap.add_argument("--vit-epochs", type=int, default=300, help="train-vit epochs (the budget usually ends it first)")
    ap.add_argument("--preset", default="vit-tiny-cifar-conv")
    # The recipe of the reported run: a narrower ViT than the preset (more epochs fit in the budget),
    # mean pooling, no dropout (the augmentation regularises). See polymodal/commands/vit.py.
    ap.add_argument("--vit-args", default='{"n_embd": 128, "n_layer": 6, "n_head": 4, "intermediate_size": 256, '
                                          '"pool": "mean", "dropout": 0.0}',
                    help="JSON of extra train_vit keyword arguments")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "runs/results/vision_results.json"))
    args = ap.parse_args()

    import torch

    from polymodal.commands.clip import eval_retrieval, zero_shot
    from polymodal.commands.vit import linear_probe, train_vit

    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "torch": torch.__version__}
    vit_dir = Path(args.vit_out)
    t0 = time.perf_counter()
    if args.skip_train:
        prev = Path(args.json)
        if not prev.is_file() or "vit" not in json.loads(prev.read_text()):
            raise SystemExit(f"--skip-train needs the train-vit numbers of a previous run in {prev}")
        res["vit"] = json.loads(prev.read_text())["vit"]
    else:
        res["vit"] = train_vit(data=args.cifar, out=str(vit_dir), preset=args.preset, minutes=args.minutes,
                               epochs=args.vit_epochs, threads=args.threads, progress=False, overwrite=True,
                               **json.loads(args.vit_args))
    res["vit"].pop("config", None)
    res["vit_probe"] = linear_probe(str(vit_dir), args.cifar, threads=args.threads)
    clip = Path(args.clip)
    if (clip / "config.json").is_file():  # a train-clip run folder (its model/) or a model folder
        res["clip_probe"] = linear_probe(str(clip), args.cifar, threads=args.threads)
        zs = zero_shot(str(clip), args.cifar, split="val")
        res["clip_zero_shot"] = {k: zs[k] for k in ("accuracy", "chance", "n_images", "n_templates")}
        res["retrieval"] = eval_retrieval(str(clip), args.flickr, "val")
    else:
        print(f"note: no CLIP checkpoint at {clip}: run 'polymodal train-clip --out {clip}' for the CLIP rows")
    for k in ("vit_probe", "clip_probe"):
        if k in res:
            res[k].pop("classes", None)
    res["seconds"] = round(time.perf_counter() - t0, 1)

    v = res["vit"]
    rows = [("CIFAR-10 val, ViT from scratch (best eval)", v["best_val_accuracy"], v["chance"],
             f"{v['n_train']} train imgs, {v['epochs']:g} epochs, {v['seconds'] / 60:.1f} min, flip TTA {v['flip_tta']}"),
            ("CIFAR-10 val, ViT from scratch (last eval)", v["final_val_accuracy"], v["chance"], ""),
            ("CIFAR-10 val, linear probe on that ViT", res["vit_probe"]["accuracy"], res["vit_probe"]["chance"],
             f"C={res['vit_probe']['C']:g}")]
    if "clip_probe" in res:
        p = res["clip_probe"]
        rows.append(("CIFAR-10 val, linear probe on CLIP image tower", p["accuracy"], p["chance"],
                     f"{p['feature_dim']}-d, C={p['C']:g}"))
        z = res["clip_zero_shot"]
        rows.append(("CIFAR-10 val, CLIP zero-shot", z["accuracy"], z["chance"], f"{z['n_templates']} templates"))
        m = res["retrieval"]
        n_img, n_txt = int(m["n_images"]), int(m["n_texts"])
        for d, label in (("t2i", "text->image"), ("i2t", "image->text")):
            for k in (1, 5, 10):
                rows.append((f"Flickr8k val {label} R@{k}", m[f"{d}_R@{k}"], m[f"chance_{d}_R@{k}"],
                             f"{n_img} images / {n_txt} captions" if k == 1 else ""))
        rows.append(("Flickr8k val text->image mean rank", None, None,
                     f"{m['t2i_mean_rank']:.2f} (chance {(n_img + 1) / 2:.1f})"))
        rows.append(("Flickr8k val image->text mean rank", None, None, f"{m['i2t_mean_rank']:.2f}"))
    print(f"\n{'':<50}{'ours':>8}{'chance':>9}  notes")
    for name, ours, chance, note in rows:
        print(f"{name:<50}{_pct(ours):>8}{_pct(chance):>9}  {note}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
