"""GGUF import: our numpy dequantisers against the ``gguf`` package's reference, tiny GGUF files
written with ``gguf.GGUFWriter`` loading to the same logits as the weights they hold, the
llama.cpp Q/K RoPE permutation, the GGUF tokenizer, the cache, and errors naming the file."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import polymodal  # noqa: E402
from polymodal.interop import gguf as pg  # noqa: E402
from polymodal.io import CheckpointError  # noqa: E402
from polymodal.models import GPT, GPTConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------ dequantisers
def _random_blocks(qtype, n_blocks, rng):
    """Random raw blocks with finite fp16 scale fields (K-quants, which gguf cannot quantise)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(-0.1, 0.1, size=(n_blocks, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == T.Q4_K:
        raw[:, 0:4] = scale(2)  # d, dmin
    elif qtype == T.Q6_K:
        raw[:, 208:210] = scale(1)  # d
    return raw


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.BF16, T.F16])
def test_dequantise_matches_gguf_reference_quantised(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(q, qtype).astype(np.float32)
    ours = pg.dequantize(q, int(qtype), x.size).reshape(x.shape)
    np.testing.assert_array_equal(ours, ref)
    # and the quantisation error is what the format allows (sanity that both are not wrong alike)
    assert np.abs(ours - x).max() < {T.Q8_0: 0.03, T.Q4_0: 0.5, T.Q4_1: 0.5, T.BF16: 0.02, T.F16: 0.002}[qtype]


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1])
def test_dequantise_matches_gguf_reference_random_blocks(qtype):
    rng = np.random.default_rng(1)
    raw = _random_blocks(qtype, 40, rng)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
        raw[:, 0:2] = rng.uniform(-0.1, 0.1, size=(40, 1)).astype(np.float16).view(np.uint8)
        if qtype == T.Q4_1:
            raw[:, 2:4] = rng.uniform(-0.1, 0.1, size=(40, 1)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32)
    ours = pg.dequantize(raw, int(qtype), 40 * block)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_q4_k_against_a_scalar_loop():
    """An independent, literal transcription of ggml's dequantize_row_q4_K for one block."""
    rng = np.random.default_rng(2)
    raw = _random_blocks(T.Q4_K, 3, rng)
    ours = pg.dequant_q4_k(raw)
    for b in range(3):
        blk = raw[b]
        d = float(blk[0:2].view(np.float16)[0])
        dmin = float(blk[2:4].view(np.float16)[0])
        sc, q = blk[4:16], blk[16:]
        y, qi, is_ = [], 0, 0

        def scale_min(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

        for _ in range(4):
            s1, m1 = scale_min(is_)
            s2, m2 = scale_min(is_ + 1)
            y += [d * s1 * (q[qi + l] & 0xF) - dmin * m1 for l in range(32)]
            y += [d * s2 * (q[qi + l] >> 4) - dmin * m2 for l in range(32)]
            qi, is_ = qi + 32, is_ + 2
        np.testing.assert_allclose(ours[b], np.array(y, dtype=np.float32), rtol=1e-6, atol=1e-7)


def test_dequantise_errors():
    with pytest.raises(CheckpointError, match="Q8_1"):  # a type gguf.quants cannot dequantise either
        pg.dequantize(np.zeros(36, np.uint8), int(T.Q8_1), 32, what="f.gguf: tensor 'x'")
    with pytest.raises(CheckpointError, match="truncated"):
        pg.dequantize(np.zeros(33, np.uint8), int(T.Q8_0), 32, what="f.gguf: tensor 'x'")


def test_rope_permutation_roundtrip_and_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    p = pg.permute_rope(w, 2)
    torch.testing.assert_close(pg.unpermute_rope(p, 2), w)
    # llama.cpp interleaves the two rotate-half halves of each head: rows 0,4,1,5,2,6,3,7
    assert p[:8, 0].tolist() == w[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()


# -------------------------------------------------------------------------------- tiny GGUF files
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _tokens():
    alphabet = list(_bytes_to_unicode().values())
    return SPECIALS + alphabet + ["Ġt", "he", "Ġthe", "ll"]


def _tiny_model(tie=True, seed=0, qkv_bias=False):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("nano-llama", vocab_size=len(_tokens()), tie_embeddings=tie, rope_theta=5000.0,
                                norm_eps=1e-5, bos_token_id=1, eos_token_id=2, qkv_bias=qkv_bias)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.half().float())  # F16-representable, so F16 tensors hold the same values
    return m


def write_gguf(path, model, *, qtypes=None, arch="llama", drop=(), reshape=None, extra=None, permute=True):
    """Writes ``model`` as llama.cpp would: GGUF names, Q/K rows permuted for interleaved RoPE."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    q, kv, hid = c.n_head * c.hd, c.kv_heads * c.hd, c.hidden
    tensors = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["ln_f.weight"]}
    if not c.tie_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        b, o = f"blk.{i}.", f"blocks.{i}."
        wq, wk, wv = sd[o + "attn.qkv.weight"].split([q, kv, kv])
        if permute:
            wq, wk = pg.permute_rope(wq, c.n_head), pg.permute_rope(wk, c.kv_heads)
        gate, up = sd[o + "mlp.fc.weight"].split([hid, hid])
        tensors.update({b + "attn_norm.weight": sd[o + "norm1.weight"], b + "ffn_norm.weight": sd[o + "norm2.weight"],
                        b + "attn_q.weight": wq, b + "attn_k.weight": wk, b + "attn_v.weight": wv,
                        b + "attn_output.weight": sd[o + "attn.proj.weight"], b + "ffn_gate.weight": gate,
                        b + "ffn_up.weight": up, b + "ffn_down.weight": sd[o + "mlp.proj.weight"]})
        if c.qkv_bias:  # Qwen2: q/k/v biases (never permuted: llama.cpp keeps Qwen2 in rotate-half layout)
            bq, bk, bv = sd[o + "attn.qkv.bias"].split([q, kv, kv])
            tensors.update({b + "attn_q.bias": bq, b + "attn_k.bias": bk, b + "attn_v.bias": bv})
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(hid)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.hd)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    toks = _tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(toks)
    w.add_token_types([3 if t in SPECIALS else 1 for t in toks])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, t in tensors.items():
        if name in drop:
            continue
        a = t.numpy()
        if reshape and name in reshape:
            a = a[: reshape[name]]
        qt = (qtypes or {}).get(name, T.F32 if a.ndim == 1 else T.F16)
        if qt == T.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qt == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(a.astype(np.float32), qt)
            except NotImplementedError:  # a type gguf cannot write (e.g. Q8_1): zero blocks
                data = np.zeros(gguf.quants.quant_shape_to_byte_shape(a.shape, qt), np.uint8)
            w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = torch.tensor([[5, 70, 200, 3, 9, 150, 11, 260]])


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_logits_equal_the_weights(tmp_path, tie):
    model = _tiny_model(tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    loaded, tok = polymodal.load(path)
    assert loaded.config.tie_embeddings == tie
    assert loaded.config.n_kv_head == 2 and loaded.config.rope_theta == 5000.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), atol=1e-5, rtol=0)


def test_tiny_gguf_quantised_tensors(tmp_path):
    """Q8_0 / Q4_0 / Q4_1 / BF16 tensors load to the reference dequantisation of the same blocks."""
    model = _tiny_model(tie=False)
    qtypes = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.ffn_gate.weight": T.Q4_1,
              "blk.1.attn_k.weight": T.Q8_0, "blk.1.ffn_down.weight": T.BF16, "output.weight": T.Q4_1}
    path = write_gguf(tmp_path / "q.gguf", model, qtypes=qtypes)
    loaded, _ = polymodal.load(path)
    f = pg.GGUFFile(path)
    for name, qt in qtypes.items():
        t = f.tensors[name]
        ref = gguf.quants.dequantize(np.asarray(t.data), qt).reshape(f.shape(name))
        torch.testing.assert_close(f.tensor(name), torch.from_numpy(ref.astype(np.float32)), atol=0, rtol=0)
    # the quantised model is close to the original but not equal
    with torch.no_grad():
        diff = (loaded(IDS) - model(IDS)).abs().max().item()
    assert 0 < diff < 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path, arch):
    """transformers' own GGUF loader (its reverse permutation) gives our logits: checks the
    RoPE un-permutation against an independent implementation, not only against our permute."""
    transformers = pytest.importorskip("transformers")
    qwen = arch == "qwen2"
    model = _tiny_model(tie=False, qkv_bias=qwen)
    write_gguf(tmp_path / "t.gguf", model, arch=arch, permute=not qwen)
    ours, _ = polymodal.load(tmp_path / "t.gguf")
    assert ours.config.qkv_bias == qwen
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), model(IDS), atol=1e-5, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="t.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=0)


def test_tiny_gguf_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model())
    _, tok = polymodal.load(path)
    toks = _tokens()
    assert tok.vocab_size == len(toks) and tok.bos_id == 1 and tok.eos_id == 2
    assert [toks[i] for i in tok.encode(" the hello")] == ["Ġthe", "Ġ", "he", "ll", "o"]
    assert [toks[i] for i in tok.encode("the")] == ["t", "he"]
    assert tok.encode("<|im_end|>") == [2]  # control tokens stay whole
    assert [toks[i] for i in tok.encode("a12")] == ["a", "1", "2"]  # "smollm" pre-tokenizer: digits split
    text = "héllo wörld ✓ 123"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cache_is_written_and_reused(tmp_path):
    model = _tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", model)
    m1, _ = polymodal.load(path)
    folder = pg.cache_dir_for(path)
    assert folder.parent == tmp_path / "cache"
    assert json.loads((folder / "config.json").read_text())["family"] == "gpt"
    assert (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".tmp-*"))  # written atomically, nothing left behind
    # a cached load reads no GGUF: prove it by making the GGUF reader unusable
    import gguf as g

    orig = g.GGUFReader
    g.GGUFReader = None
    try:
        m2, tok2 = polymodal.load(path)
    finally:
        g.GGUFReader = orig
    assert tok2 is not None
    with torch.no_grad():
        torch.testing.assert_close(m2(IDS), m1(IDS), atol=0, rtol=0)
    # a changed file (new mtime/size) gets a new cache entry
    time.sleep(0.01)
    write_gguf(path, _tiny_model(seed=1))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert pg.cache_dir_for(path) != folder
    m3, _ = polymodal.load(path)
    with torch.no_grad():
        assert not torch.equal(m3(IDS), m1(IDS))


# -------------------------------------------------------------------------------------- errors
def test_truncated_gguf_names_file_and_tensor(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        polymodal.load(path)
    assert str(path) in str(e.value)
    path.write_bytes(data[:100])  # cut inside the metadata
    with pytest.raises(CheckpointError, match="tiny.gguf"):
        polymodal.load(path)


def test_corrupted_gguf(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model())
    data = bytearray(path.read_bytes())
    bad = bytes(b"GGUX" + data[4:])
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match="tiny.gguf"):
        polymodal.load(path)
    data[8:16] = (10 ** 12).to_bytes(8, "little")  # absurd tensor count
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tiny.gguf"):
        polymodal.load(path)


def test_unknown_quant_type_names_tensor(tmp_path):
    path = write_gguf(tmp_path / "q8_1.gguf", _tiny_model(), qtypes={"blk.1.ffn_up.weight": T.Q8_1})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight.*Q8_1") as e:
        polymodal.load(path)
    assert str(path) in str(e.value)


def test_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", _tiny_model(), drop={"blk.1.ffn_down.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*blk\.1\.ffn_down\.weight") as e:
        polymodal.load(path)
    assert str(path) in str(e.value)


def test_wrong_shape(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", _tiny_model(), reshape={"blk.0.attn_k.weight": 16})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_k\.weight.*shape") as e:
        polymodal.load(path)
    assert str(path) in str(e.value)


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", _tiny_model(), arch="mamba")
    with pytest.raises(CheckpointError, match="mamba"):
        polymodal.load(path)


# ------------------------------------------------------------------------------------------ chat
def test_chat_cmd_reads_piped_stdin(tmp_path, monkeypatch, capsys):
    """`polymodal chat` with piped input: multi-turn history, /reset, /exit; stops at <|im_end|>."""
    import io

    from polymodal.commands.chat import chat_cmd
    from polymodal.generate.chat import ChatSession

    path = write_gguf(tmp_path / "tiny.gguf", _tiny_model())
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe the\n/reset\nagain\n/exit\nnever read\n"))
    history = chat_cmd(model=str(path), temperature=0.0, max_new_tokens=5, device="cpu", system="be brief")
    roles = [m["role"] for m in history]
    assert roles == ["system", "user", "assistant", "user", "assistant", "system", "user", "assistant"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["hello", "the the", "again"]
    out = capsys.readouterr().out
    replies = [m["content"] for m in history if m["role"] == "assistant"]
    pos = 0
    for r in replies:  # every reply was streamed to stdout, in order
        pos = out.index(r, pos) + len(r)
    assert out.endswith("\n")
    # multi-turn: the second prompt holds the first exchange, rendered by the model's template
    model, tok = polymodal.load(path)
    s = ChatSession(model, tok, temperature=0.0, max_new_tokens=3)
    first = s.reply("hello")
    s.messages.append({"role": "user", "content": "more"})
    text = tok.decode(s.prompt_ids(), skip_special_tokens=False)
    assert text.startswith(f"<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n{first.strip()}<|im_end|>")
    assert tok.token_to_id("<|im_end|>") in s.stop_ids
