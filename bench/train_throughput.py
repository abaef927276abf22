"""Training throughput: polymodal GPT vs Hugging Face ``GPT2LMHeadModel`` at the same config.

One training step = forward + next-token cross-entropy + backward + AdamW step, on the same
random batch, same dtype policy (fp32, or bf16 autocast with fp32 weights), same optimizer
(torch AdamW, foreach), random init. Reports the median step time over ``--steps`` timed steps
after ``--warmup`` untimed ones, tokens/s, MFU (PaLM appendix B: (6N + 12 L T d) tokens/s / peak,
peak from ``polymodal.train.loop.default_peak_flops`` or ``--peak-flops``), and the ratio
polymodal / HF (> 1 means polymodal is faster). The two models alternate step by step so that
background load (a shared machine) affects both equally.

    .venv/bin/python bench/train_throughput.py                  # ~17M params, vocab 8192, fp32 + bf16
    .venv/bin/python bench/train_throughput.py --quick          # a smaller model, fewer steps
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from polymodal.models.gpt import GPT, GPTConfig

    ours = GPT(GPTConfig.from_preset("gpt2", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                     vocab_size=args.vocab, block_size=args.seq, dropout=0.0))
    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu_new", tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = args.hf_attn
    hf = GPT2LMHeadModel(hf_cfg).train()
    return ours, hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="4 layers x 256, seq 128, batch 4, 3 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_layer, args.n_head, args.n_embd, args.seq, args.batch, args.steps = 4, 4, 256, 128, 4, 3
    torch.set_num_threads(args.threads)
    from polymodal.models.gpt import lm_loss
    from polymodal.train.loop import default_peak_flops, flops_per_token

    torch.manual_seed(0)
    ours, hf = build(args)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    fpt = flops_per_token(ours, args.seq)
    tokens = args.batch * args.seq
    print(f"config: n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch} threads={args.threads}; params polymodal {n_ours / 1e6:.2f}M, "
          f"HF {n_hf / 1e6:.2f}M; {fpt / 1e6:.1f} MFLOP/token")
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    print(f"{'dtype':<6}{'model':<11}{'step ms':>10}{'tokens/s':>11}{'MFU':>8}")
    for dt in args.dtypes:
        peak = args.peak_flops or default_peak_flops(torch.device("cpu"), dt)
        models = {"polymodal": ours, "hf": hf}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) for k, m in models.items()}
        fwd = {"polymodal": lambda m: m(x), "hf": lambda m: m(input_ids=x).logits}
        times = {k: [] for k in models}
        for i in range(args.warmup + args.steps):
            for k, m in models.items():  # interleaved: load spikes hit both
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16"):
                    loss = lm_loss(fwd[k](m), y)
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t)
        tps = {}
        for k in models:
            med = statistics.median(times[k])
            tps[k] = tokens / med
            print(f"{dt:<6}{k:<11}{med * 1e3:>10.1f}{tps[k]:>11,.0f}{fpt * tps[k] / peak:>8.1%}")
        print(f"{dt:<6}ratio polymodal/HF tokens/s: {tps['polymodal'] / tps['hf']:.2f}x  (peak {peak:.2g} FLOP/s)")


if __name__ == "__main__":
    main()
