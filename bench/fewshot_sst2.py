"""SST-2 k-shot in-context classification by label likelihood (GPT-3, Brown et al. 2020, sec. 2.4).

Runs SmolLM2-135M-Instruct (or ``--model``) with k = 0, 1, 4, 8 balanced, seeded demonstrations
from the train split on the first ``--n-eval`` validation sentences, and prints accuracy per k next
to the majority-class baseline, plus the wall time.

    .venv/bin/python bench/fewshot_sst2.py                 # n_eval = 200
    .venv/bin/python bench/fewshot_sst2.py --n-eval 100 --k 0 4
"""
from __future__ import annotations

import argparse
import time

import torch

from polymodal.commands.fewshot import fewshot_cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n-eval", type=int, default=200, help="validation sentences (first n of the split)")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 4, 8], help="numbers of demonstrations")
    ap.add_argument("--seed", type=int, default=0, help="seed for drawing the demonstrations")
    ap.add_argument("--model", default=None, help="checkpoint path (default SmolLM2-135M-Instruct)")
    ap.add_argument("--data-dir", default=None, help="folder with SST-2 train/val (default shared data)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--normalize", default="none", choices=["none", "token", "char"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    fewshot_cmd("sst2", a.k, a.n_eval, a.model, a.seed, a.data_dir, a.batch_size, a.normalize)
    print(f"wall time {time.perf_counter() - t0:.1f}s (CPU threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
