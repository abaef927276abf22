"""SmolLM2-135M-Instruct greedy decoding speed: polymodal vs transformers (vs llama.cpp).

Every contender decodes the same prompt (repeated ``batch`` times, so no padding)
for exactly ``--new-tokens`` greedy tokens, end to end (prefill included), with
the same number of threads. Contenders run interleaved, ``--repeats`` times, and
the median tok/s (batch x new tokens / seconds) is reported, with ratios against
transformers (fp32 and bf16) and llama.cpp measured in the same run.

    .venv/bin/python bench/smollm2_decode.py                  # full run (minutes)
    .venv/bin/python bench/smollm2_decode.py --quick          # batch 1, bf16 + int4, 32 tokens
    .venv/bin/python bench/smollm2_decode.py --random-weights # no checkpoint: random SmolLM2-shaped model
    .venv/bin/python bench/smollm2_decode.py --modes bf16,int4,int4-kernel --batch 1 2 4 8 --compile off
                                                              # where the dense copy beats the int4 kernel

"int4"/"int8" take the per-shape kernel choice (polymodal.inference.quant.DENSE_ROWS: the kernel
below a row threshold, a dense bf16 copy from there on); "int4-kernel"/"int8-kernel" force the
kernel at every shape, to measure that threshold. ``--dense-rows`` overrides it.

llama.cpp is timed when ``llama_cpp`` imports (optional extra ``bench-llamacpp``; build line in
docs/inference.md). Compile times are printed separately and not counted in tok/s.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from polymodal.inference import greedy_decode, prepare_for_decoding, set_quant_impl

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"


def load_ours(random_weights: bool):
    if random_weights:
        from polymodal.models.gpt import GPT, GPTConfig

        torch.manual_seed(0)
        return GPT(GPTConfig.from_preset("smollm2-135m")).eval(), None
    import polymodal

    model, tok = polymodal.load(dtype=torch.float32)
    return model.eval(), tok


def time_ours(fd, ids, n_new, cache_dtype=None):
    t0 = time.perf_counter()
    out, _ = greedy_decode(fd, ids, n_new, cache_dtype=cache_dtype)
    return out, time.perf_counter() - t0


def hf_model(our_model, tmp: Path, dtype):
    """transformers' LlamaForCausalLM on the same weights, via a Hugging Face folder we export."""
    from transformers import AutoModelForCausalLM

    from polymodal.interop.hf import export_hf

    folder = tmp / "hf"
    if not folder.exists():
        export_hf(our_model, folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def time_hf(model, ids, n_new):
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, use_cache=True)
        dt = time.perf_counter() - t0
    return out[:, ids.shape[1]:], dt


def llamacpp_runner(threads: int):
    try:
        import llama_cpp
    except ImportError:
        return None
    from polymodal.interop import default_model_path

    llm = llama_cpp.Llama(model_path=str(default_model_path()), n_threads=threads, n_threads_batch=threads,
                          n_ctx=512, n_batch=512, verbose=False)

    def run(ids, n_new):
        toks = ids[0].tolist()  # llama.cpp's Python API decodes one sequence
        t0 = time.perf_counter()
        llm.reset()
        out = []
        for tok in llm.generate(toks, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n_new:
                break
        return torch.tensor([out]), time.perf_counter() - t0

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="fp32,bf16,int8,int4", help="our weight formats, comma separated")
    ap.add_argument("--dense-rows", type=int, default=None, help="override the rows at which int4/int8 take "
                    "the dense bf16 copy (0 = never)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--compile-scope", choices=["block", "step"], default="block")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--random-weights", action="store_true", help="random SmolLM2-shaped weights (no load)")
    ap.add_argument("--quick", action="store_true", help="batch 1, bf16+int4, 32 tokens, 1 repeat, no compile")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens, args.repeats, args.modes, args.compile = [1], 32, 1, "bf16,int4", "off"
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (machine shared: timings are noisy)", flush=True)

    base, tok = load_ours(args.random_weights)
    prompt = tok.encode(PROMPT) if tok is not None else list(range(100, 120))
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    contenders = {}  # name -> (batch -> runner(ids) -> (tokens, seconds))
    for mode in args.modes.split(","):
        for comp in compiles:
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            quant = mode.removesuffix("-kernel") if mode.startswith(("int8", "int4")) else "none"
            t0 = time.perf_counter()
            fd = prepare_for_decoding(copy.deepcopy(base), "cpu", dtype=dtype, quant=quant, compile=comp,
                                      compile_scope=args.compile_scope)
            if mode.endswith("-kernel"):
                set_quant_impl(fd, "fast")  # the kernel at every shape (no dense copy)
            elif args.dense_rows is not None:
                set_quant_impl(fd, "auto", dense_rows=args.dense_rows or None)
            name = f"ours {mode}" + (" +compile" if comp else "")
            print(f"prepared {name} in {time.perf_counter() - t0:.1f}s", flush=True)
            contenders[name] = lambda ids, fd=fd: time_ours(fd, ids, args.new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="polymodal-bench-"))
    if not args.no_transformers:
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            hf = hf_model(base, tmp, dtype)
            contenders[f"transformers {dname}"] = lambda ids, hf=hf: time_hf(hf, ids, args.new_tokens)
    lcpp = None if args.no_llamacpp or args.random_weights else llamacpp_runner(args.threads)
    if lcpp is not None:
        contenders["llama.cpp Q4_1"] = lambda ids: lcpp(ids, args.new_tokens)
    elif not args.no_llamacpp:
        print("llama.cpp: llama_cpp not importable (pip install -e '.[bench-llamacpp]'), skipped")

    for b in args.batch:
        ids = torch.tensor([prompt] * b)
        # Warm-up (and compilation) outside the timed runs.
        for name, run in contenders.items():
            if name.startswith("llama.cpp") and b > 1:
                continue
            t0 = time.perf_counter()
            run(ids[:, :])
            if "+compile" in name:
                print(f"batch {b}: {name} warm-up incl. compile {time.perf_counter() - t0:.1f}s", flush=True)
        times: dict[str, list[float]] = {n: [] for n in contenders}
        outs = {}
        for r in range(args.repeats):
            for name, run in contenders.items():
                if name.startswith("llama.cpp") and b > 1:
                    continue
                out, dt = run(ids)
                times[name].append(dt)
                outs[name] = out
        print(f"\n== batch {b}, prompt {len(prompt)} tokens, {args.new_tokens} new tokens ==")
        rates = {n: b * args.new_tokens / statistics.median(t) for n, t in times.items() if t}
        refs = [n for n in ("transformers fp32", "transformers bf16", "llama.cpp Q4_1") if n in rates]
        ref_tokens = outs.get("transformers fp32", outs.get("ours fp32"))
        print(f"{'contender':24s} {'tok/s':>8s} " + " ".join(f"{'x ' + r:>20s}" for r in refs) + "  greedy match")
        for name, rate in rates.items():
            ratios = " ".join(f"{rate / rates[r]:20.2f}" for r in refs)
            match = ""
            if ref_tokens is not None and name in outs:
                o, ref = outs[name][0], ref_tokens[0]
                n = int((o[: len(ref)] == ref[: len(o)]).long().cumprod(0).sum())
                match = f"{n}/{len(ref)}"
            print(f"{name:24s} {rate:8.1f} {ratios}  {match}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
