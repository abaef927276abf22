"""Time to first token from the SmolLM2-135M-Instruct GGUF: polymodal.load() vs transformers.

polymodal dequantises the GGUF once and caches it as a polymodal folder
(``POLYMODAL_CACHE``), so it is timed twice: a first load into an empty cache
and a cached load. transformers dequantises the GGUF on every load
(``from_pretrained(dir, gguf_file=name)``). "First token" = load + tokenise +
one greedy step on a short prompt, all in a fresh measurement of this process.

    .venv/bin/python bench/load_time.py [--threads 2] [--no-transformers]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

PROMPT = "The capital of France is"


def ours_first_token(cache_dir: str):
    import polymodal

    os.environ["POLYMODAL_CACHE"] = cache_dir
    t0 = time.perf_counter()
    model, tok = polymodal.load(dtype=torch.float32)
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        ids = torch.tensor([tok.encode(PROMPT)])
        first = int(model(ids, last_only=True)[0, -1].argmax())
    return t_load, time.perf_counter() - t0, tok.decode([first])


def hf_first_token(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        first = int(model(ids).logits[0, -1].argmax())
    return t_load, time.perf_counter() - t0, tok.decode([first])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from polymodal.interop import default_model_path

    gguf = default_model_path()
    print(f"{gguf.name}, {args.threads} threads (machine shared: timings are noisy)")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="polymodal-cache-") as cache:
        rows["polymodal first load"] = ours_first_token(cache)
        rows["polymodal cached"] = ours_first_token(cache)
    if not args.no_transformers:
        rows["transformers gguf"] = hf_first_token(gguf)
    ref = rows.get("transformers gguf")
    print(f"{'':24s} {'load s':>8s} {'first token s':>14s} {'vs transformers':>16s}  token")
    for name, (t_load, t_first, text) in rows.items():
        ratio = f"{ref[1] / t_first:15.2f}x" if ref else ""
        print(f"{name:24s} {t_load:8.2f} {t_first:14.2f} {ratio:>16s}  {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
