"""GGUF blocks straight into the quantised kernels (issue 13), no re-quantisation:

* GGUF exactness: a Q4_0 / Q4_1 / Q8_0 (and Q5_0 / Q5_1 / Q4_K / Q5_K) tensor repacked for the
  kernels dequantises bit for bit to ``gguf.quants.dequantize``, and survives a model-wide cast;
* the int4 kernel itself, run with fp32 activations and its fp32 table on the identity matrix,
  returns exactly the file's weights (its packing loses nothing; bf16 is the fast path's rounding);
* a tiny GGUF model, from a first load and from the cache, quantises from its own blocks where the
  layout allows (Int4Linear / Int8GroupLinear), re-quantises the rest, and notices a changed weight;
* every type the installed ``gguf`` package dequantises loads through ``polymodal.interop.gguf``.

Budget: a few seconds on 2 shared cores (tiny tensors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from test_gguf import IDS, _tiny_model, write_gguf  # noqa: E402

import polymodal  # noqa: E402
from polymodal.inference import Int4Linear, Int8GroupLinear, QuantLinear, layer_from_factors, quantize  # noqa: E402
from polymodal.inference.quant import _HAS_INT4_KERNEL  # noqa: E402
from polymodal.interop import gguf as pg  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))


QUANTISABLE = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1]  # types gguf.quants can write
K_QUANTS = [T.Q4_K, T.Q5_K]  # only read: random blocks with finite fp16 d / dmin


def _raw(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) blocks of one matrix."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTISABLE:
        # per-row offsets, so Q4_1 / Q5_1 mins are far from zero (a real test of m + 8 d)
        x = (rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.2, 0.2, (rows, 1))).astype(np.float32)
        return gguf.quants.quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    raw[:, 0:4] = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)  # d, dmin
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", QUANTISABLE + K_QUANTS, ids=lambda t: t.name)
def test_repacked_tensor_dequantises_bit_exactly(qtype):
    raw = _raw(qtype, 40, 512)
    ref = gguf.quants.dequantize(raw, qtype)  # (40, 512) float32
    layer = layer_from_factors(pg.block_factors(raw, int(qtype)))
    assert isinstance(layer, Int4Linear if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else Int8GroupLinear)
    assert layer.label == f"GGUF {qtype.name}" and layer.scales.dtype == torch.float32
    got = layer.dequantize().numpy()
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit for bit, signed zeros too
    layer.to(torch.bfloat16)  # a model-wide cast keeps the exact fp32 scales (and mins)
    assert layer.scales.dtype == torch.float32
    np.testing.assert_array_equal(layer.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    # the rows the logit refinement reads are the same values
    rows = torch.tensor([3, 0, 39])
    np.testing.assert_array_equal(layer.dequantize_rows(rows).numpy(), ref[[3, 0, 39]])


@pytest.mark.skipif(not _HAS_INT4_KERNEL, reason="aten._weight_int4pack_mm_for_cpu missing")
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_kernel_runs_on_the_file_weights(qtype):
    """Row j of (I W^T) is column j of the kernel's effective weight: with fp32 activations the
    table is fp32, so the tiled layout (nibble order, padding to 16 rows, Q8_0's two planes) must
    give the GGUF's values exactly; the bf16 fast path then differs only by its table's rounding."""
    raw = _raw(qtype, 40, 256)  # 40 rows: padded to 48 inside the kernel
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    layer = layer_from_factors(pg.block_factors(raw, int(qtype)))
    w_kernel = layer.forward_fast(torch.eye(256)).t()
    assert torch.equal(w_kernel, ref)
    w_bf16 = layer.forward_fast(torch.eye(256, dtype=torch.bfloat16)).t().float()
    assert ((w_bf16 - ref).abs().max() / ref.abs().max()).item() < 1e-2  # bf16 scales + bf16 output


def _float_weights(path) -> dict[str, torch.Tensor]:
    m, _ = polymodal.load(path)
    return {k: v.clone() for k, v in m.state_dict().items()}


QTYPES = {  # blk.0: one type per fused matrix (repacked); blk.1: q/k/v of mixed types (re-quantised)
    "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_0, "blk.0.attn_v.weight": T.Q4_0,
    "blk.0.ffn_gate.weight": T.Q4_1, "blk.0.ffn_up.weight": T.Q4_1, "blk.0.ffn_down.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.Q5_1,
    "blk.1.attn_q.weight": T.Q4_0, "blk.1.attn_k.weight": T.Q8_0,
    "token_embd.weight": T.Q8_0, "output.weight": T.Q4_1,
}
FROM_FILE = {"blocks.0.attn.qkv": ("Int4Linear", "GGUF Q4_0"), "blocks.0.mlp.fc": ("Int4Linear", "GGUF Q4_1"),
             "blocks.0.mlp.proj": ("Int8GroupLinear", "GGUF Q8_0"),
             "blocks.0.attn.proj": ("Int8GroupLinear", "GGUF Q5_1"), "lm_head": ("Int4Linear", "GGUF Q4_1")}


def test_tiny_gguf_quantises_from_its_own_blocks(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", _tiny_model(tie=False), qtypes=QTYPES)
    uncached, _ = pg.load_gguf(path, cache=False)  # no cache: the blocks stay in memory
    first, _ = polymodal.load(path)  # converts and caches; blocks from gguf_blocks.safetensors
    cached, _ = polymodal.load(path)  # reads the cache only
    assert uncached.quant_source.blocks is not None and cached.quant_source.path.name == pg.BLOCKS_FILE
    assert sorted(cached.quant_source.names()) == sorted(k + ".weight" for k in FROM_FILE)
    weights = _float_weights(path)
    with torch.no_grad():
        ref = first(IDS)
    for model in (uncached, first, cached):
        quantize(model, "int4", modes={"lm_head": "int8"})  # the file's Q4_1 output wins over "int8"
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        for name, (cls, label) in FROM_FILE.items():
            assert (type(layers[name]).__name__, layers[name].label) == (cls, label), name
            # the fused/permuted blocks dequantise exactly to the float load's weight
            assert torch.equal(layers[name].dequantize(), weights[name + ".weight"]), name
        assert layers["blocks.1.attn.qkv"].label == "min/max int4"  # mixed types: re-quantised
        assert layers["blocks.1.mlp.fc"].label == "min/max int4"  # F16 in the file: re-quantised
        with torch.no_grad():
            out = model(IDS)
        assert ((out - ref).abs().max() / ref.std()).item() < 0.5  # int4 re-quantised layers + bf16


def test_checkpoint_mode_and_changed_weights(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", _tiny_model(tie=False), qtypes=QTYPES)
    model, _ = polymodal.load(path)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] += 1.0  # e.g. fine-tuned after loading
    quantize(model, "checkpoint")  # only what the file stores quantised
    assert type(model.blocks[1].mlp.fc) is nn.Linear  # F16 in the file: stays float
    assert type(model.blocks[0].mlp.fc) is nn.Linear  # changed since loading: no longer the file's
    assert model.blocks[0].attn.qkv.label == "GGUF Q4_0"
    # a model cast before quantising (prepare_for_decoding does) still matches its blocks
    m2, _ = polymodal.load(path, dtype=torch.bfloat16)
    quantize(m2, "checkpoint")
    assert m2.blocks[0].mlp.fc.label == "GGUF Q4_1" and m2.blocks[0].mlp.fc.scales.dtype == torch.float32
    # without a source (or with source=None) everything is re-quantised from the float weights
    m3, _ = polymodal.load(path)
    quantize(m3, "int4", source=None)
    assert {m.label for m in m3.modules() if isinstance(m, Int4Linear)} == {"min/max int4"}


def _gguf_dequantisable() -> list:
    out = []
    for t in T:
        if t in (T.F32, T.F16, T.BF16) or t not in gguf.GGML_QUANT_SIZES or gguf.GGML_QUANT_SIZES[t][0] == 1:
            continue
        try:
            gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[t][1], np.uint8), t)
        except NotImplementedError:
            continue
        out.append(t)
    return out


@pytest.mark.parametrize("qtype", _gguf_dequantisable(), ids=lambda t: t.name)
def test_every_type_gguf_dequantises_loads(qtype):
    """Ours where we have vectorised code, gguf.quants for the rest (IQ*, TQ*, Q2_K, Q3_K, MXFP4...):
    the same values either way (random bytes: NaN/inf fp16 scales compare equal to themselves)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(3).integers(0, 256, size=(8, size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
        ours = pg.dequantize(raw, int(qtype), 8 * block)
    np.testing.assert_array_equal(ours, ref)


def test_tied_output_projection_uses_the_embedding_blocks(tmp_path):
    """SmolLM2's layout: no output.weight, a Q8_0 token_embd tied to the output projection."""
    path = write_gguf(tmp_path / "t.gguf", _tiny_model(tie=True), qtypes={"token_embd.weight": T.Q8_0})
    model, _ = polymodal.load(path)
    quantize(model, "checkpoint")
    assert isinstance(model.lm_head, Int8GroupLinear) and model.lm_head.label == "GGUF Q8_0"
    assert torch.equal(model.lm_head.dequantize(), model.wte.weight)  # the embedding keeps its float table


def test_damaged_blocks_file_falls_back_to_requantising(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", _tiny_model(tie=False), qtypes=QTYPES)
    polymodal.load(path)
    blocks = pg.cache_dir_for(path) / pg.BLOCKS_FILE
    blocks.write_bytes(blocks.read_bytes()[:100])
    model, _ = polymodal.load(path)  # the float weights are intact: the load itself succeeds
    with pytest.warns(UserWarning, match="blocks"):
        quantize(model, "int4")
    assert {m.label for m in model.modules() if isinstance(m, Int4Linear)} == {"min/max int4"}
