"""Runs every side-by-side benchmark in sequence (``make bench``) and keeps each log.

Each script prints its own table with ratios against the reference library
measured in the same run. Benchmarks are timing-sensitive: run them on an
otherwise idle machine. ``--quick`` passes each script its smallest settings.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, full args, quick args)
BENCHES = [
    ("train_throughput.py", ["--dtypes", "fp32"], ["--steps", "3", "--warmup", "1", "--dtypes", "fp32"]),
    ("decode.py", ["--dtypes", "fp32"], ["--quick"]),
    # compile costs minutes per shape on CPU; run `smollm2_decode.py --compile both` by hand for those rows
    ("smollm2_decode.py", ["--modes", "fp32,int8,int4", "--compile", "off", "--no-llamacpp"], ["--quick", "--no-llamacpp"]),
    ("load_time.py", [], ["--no-transformers"]),
    ("embeddings.py", [], ["--n", "128", "--repeats", "1", "--no-bf16", "--no-sequential"]),
    ("clip_vision.py", ["--dtypes", "fp32"], ["--batch", "4", "--repeats", "1", "--dtypes", "fp32"]),
    ("fewshot_sst2.py", ["--n-eval", "100"], ["--n-eval", "16", "--k", "0", "1"]),
    ("serve.py", ["--backend", "polymodal", "transformers", "--clients", "1", "8", "32", "--requests", "4",
                  "--max-tokens", "64", "--duration", "45", "--max-time", "900"], ["--quick"]),
]
# the task-quality runs of docs/results.md (training under a time budget: hours in all; `--results`)
RESULTS = [
    ("finetune_results.py", [], ["--minutes", "0.3", "--max-train", "256"]),
    ("vision_results.py", ["--minutes", "15", "--threads", "1"], ["--minutes", "0.2", "--vit-epochs", "2"]),
    ("vqa_results.py", ["--minutes", "12", "--daquar-minutes", "3", "--threads", "1"],
     ["--minutes", "0.1", "--daquar-minutes", "0.1"]),
    ("caption_results.py", ["--minutes", "25", "--threads", "1"], ["--minutes", "0.1", "--limit", "4"]),
    ("seq2seq_results.py", ["translate", "--minutes", "40"], ["translate", "--minutes", "0.2", "--limit", "64",
                                                            "--val-limit", "8"]),
    ("seq2seq_results.py", ["summarize", "--minutes", "15"], ["summarize", "--minutes", "0.2", "--limit", "32",
                                                            "--val-limit", "4"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smallest settings (a smoke test, not a measurement)")
    ap.add_argument("--only", nargs="*", help="script names to run")
    ap.add_argument("--logs", default="runs/bench", help="folder for one log per benchmark")
    ap.add_argument("--results", action="store_true", help="run docs/results.md's training runs instead (hours)")
    args = ap.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for script, full, quick in (RESULTS if args.results else BENCHES):
        if args.only and script not in args.only and script.removesuffix(".py") not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        name = "_".join([script.removesuffix(".py"), *[a for a in full[:1] if not a.startswith("-")]])
        with open(logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                print(line, end="")
                log.write(line)
            rc = proc.wait()
        print(f"=== {script}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
