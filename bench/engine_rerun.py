"""Issue 12's closing check: the four headline results rerun through the one Trainer with their old
budgets, one after the other on a quiet machine (each alone), with the load average printed.

    .venv/bin/python bench/engine_rerun.py --data ../shared/data --out runs/results/engine [--only quickstart sst2 vqa vit]

| run | command | old number (docs/results.md) |
| quickstart | polymodal quickstart --minutes 10 | val.txt 1.562 nats/char |
| sst2 | polymodal finetune --task sst2 ... --minutes 24 (2 threads) | 93.00% |
| vqa | bench/vqa_results.py --minutes 12 --archs visualbert --datasets easy_vqa | 85.15% |
| vit | bench/vision_results.py --minutes 15 (train-vit on CIFAR-10) | 55.0% |
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(data: Path, out: Path) -> dict[str, list[str]]:
    py, cli = sys.executable, [sys.executable, "-m", "polymodal.cli"]
    return {
        "quickstart": [*cli, "quickstart", "--minutes", "10", "--data", str(data / "tiny_shakespeare"),
                       "--out", str(out / "quickstart")],
        "sst2": [*cli, "finetune", "--task", "sst2", "--data", str(data / "sst2"), "--epochs", "1", "--lr", "1e-4",
                 "--batch-size", "32", "--max-length", "66", "--eval-every", "300", "--minutes", "24", "--threads", "2",
                 "--out", str(out / "sst2"), "--overwrite", "--no-progress"],
        "vqa": [py, str(ROOT / "bench/vqa_results.py"), "--minutes", "12", "--threads", "2", "--archs", "visualbert",
                "--datasets", "easy_vqa", "--out", str(out / "vqa")],
        "vit": [py, str(ROOT / "bench/vision_results.py"), "--minutes", "15", "--threads", "2",
                "--cifar", str(data / "cifar10"), "--vit-out", str(out / "vit"), "--clip", str(out / "no-clip"),
                "--json", str(out / "vit.json")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "results" / "engine"))
    ap.add_argument("--only", nargs="+", default=["quickstart", "sst2", "vqa", "vit"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "engine_rerun.jsonl"
    for name in a.only:
        cmd = commands(Path(a.data), out)[name]
        print(f"== {name}: {' '.join(cmd)}\n   load average before: {os.getloadavg()}", flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
        rec = {"run": name, "cmd": cmd, "rc": r.returncode, "seconds": round(time.time() - t0, 1),
               "load_after": os.getloadavg(), "stdout_tail": r.stdout[-3000:], "stderr_tail": r.stderr[-1500:]}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"   rc {r.returncode} in {rec['seconds']} s; load average after: {rec['load_after']}\n"
              f"{r.stdout[-1500:]}", flush=True)


if __name__ == "__main__":
    main()
