"""Decode throughput: polymodal ``generate`` vs Hugging Face ``GPT2LMHeadModel.generate``.

Both run greedy decoding on the SAME random GPT-2-124M-shaped weights (ours exported to a
Hugging Face folder with ``polymodal.interop.export_hf``; a hand-written state-dict
conversion is the fallback), with a prompt of --prompt-len tokens and --new-tokens new ones,
EOS disabled so every run decodes the same number of tokens. The tokens of both are
checked to be identical in float32 before timing. Reported: new tokens/s (batch * new /
wall time of the whole generate call, prefill included), median of --repeats runs, and the
ratio ours / transformers measured in the same process.

What bounds the ratio: at 124M parameters a decode step is GEMV-bound (all weights are read
once per step by both libraries; ``--profile`` shows ~90% of our step in addmm/mm, the lm_head
alone ~25%), so eager-mode gains come from HF's per-step overhead only; a tiny model
(``--set n_layer=2 n_embd=64 n_head=4 vocab_size=256``) isolates that overhead. On CPUs
without native bf16, a bf16 GEMV with nn.Linear's (out, in) weight is ~1.6x slower than
HF Conv1D's (in, out) layout, which favours HF in bf16 (see polymodal.inference for prepacked,
quantised and compiled decoding).

    .venv/bin/python bench/decode.py                      # full: fp32+bf16, batch 1 and 8
    .venv/bin/python bench/decode.py --quick              # tiny shapes, seconds
    .venv/bin/python bench/decode.py --dtypes fp32 --batches 1 --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymodal import GPT, GPTConfig  # noqa: E402
from polymodal.generate import generate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT-2 names -> Hugging Face GPT2LMHeadModel names (Conv1D stores W^T)."""
    sd, out = model.state_dict(), {}
    out["transformer.wte.weight"] = sd["wte.weight"]
    out["transformer.wpe.weight"] = sd["wpe.weight"]
    for i in range(model.config.n_layer):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, hf, conv in [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                               ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                               ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
            w = sd[p + ours + ".weight"]
            out[q + hf + ".weight"] = w.t().contiguous() if conv else w
            out[q + hf + ".bias"] = sd[p + ours + ".bias"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out["lm_head.weight"] = sd["wte.weight"]
    return out


def build_hf(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        from polymodal.interop.hf import export_hf

        with tempfile.TemporaryDirectory() as d:
            export_hf(model, d, model_type="gpt2")
            hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
        how = "polymodal.interop.export_hf"
    except Exception as e:  # the interop exporter is the preferred path; the manual map still benches
        c = model.config
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                        layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256),
                             ).eval()
        hf.load_state_dict(to_hf_state_dict(model), strict=False)
        hf.tie_weights()
        how = f"manual state-dict map (export_hf unavailable: {type(e).__name__}: {e})"
    return hf.eval(), how


def time_call(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2-layer model, 8+16 tokens, 1 repeat")
    ap.add_argument("--no-hf", action="store_true", help="time polymodal only")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="config overrides, e.g. --set n_layer=2 n_embd=64 n_head=4 vocab_size=256 "
                         "(a tiny model measures per-step framework overhead)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of our decode")
    args = ap.parse_args(argv)
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if args.quick:
        overrides = dict(n_layer=2, **overrides)
        args.prompt_len, args.new_tokens, args.repeats = 8, 16, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset, **overrides)).eval()
    hf, how = (None, "") if args.no_hf else build_hf(model)
    print(f"model: {args.preset} {overrides or ''} ({model.num_params() / 1e6:.1f}M params), prompt {args.prompt_len}"
          f" + {args.new_tokens} new tokens, greedy, {args.threads} threads, median of {args.repeats}; "
          f"HF weights via {how or '-'}")
    g = torch.Generator().manual_seed(1)
    print(f"{'dtype':<6}{'batch':>6}{'ours tok/s':>12}{'hf tok/s':>10}{'ratio':>8}  tokens equal")
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        m = model.to(dtype)
        h = hf.to(dtype) if hf is not None else None
        for b in args.batches:
            ids = torch.randint(0, model.config.vocab_size, (b, args.prompt_len), generator=g)
            n = args.new_tokens

            def ours():
                return generate(m, ids, max_new_tokens=n, do_sample=False, eos_token_id=[])

            def theirs():
                with torch.inference_mode():
                    return h.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)

            ours()  # warm-up (allocator, kernels)
            t_ours, out_ours = time_call(ours, args.repeats)
            line = f"{dname:<6}{b:>6}{b * n / t_ours:>12.1f}"
            if h is not None:
                theirs()
                t_hf, out_hf = time_call(theirs, args.repeats)
                same = out_hf[:, args.prompt_len:].tolist() == out_ours
                line += f"{b * n / t_hf:>10.1f}{t_hf / t_ours:>8.2f}  {same}"
            print(line, flush=True)
            if args.profile:
                from torch.profiler import profile

                with profile() as prof:
                    ours()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
