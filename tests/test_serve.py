"""The OpenAI-compatible server, driven by the official ``openai`` client.

Most tests serve a tiny random LLaMA-style GPT with a character tokenizer (saved as a
polymodal folder and loaded back through ``ServedModel.load``), a tiny random CLIP and a
tiny random text encoder; one module-scoped test serves the real SmolLM2-135M-Instruct.
The tiny GPT runs in float64: continuous batching must give a request the same greedy
tokens alone or in a batch, and fp64 keeps BLAS's batch-size-dependent rounding (last bits
of fp32 GEMMs differ between M=1 and M=16) far below any logit gap, so the test checks the
scheduler and the cache rather than BLAS.
"""
from __future__ import annotations

import asyncio
import base64
import io
import string
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from polymodal.models.registry import build_model, save_model  # noqa: E402
from polymodal.serve.app import create_app  # noqa: E402
from polymodal.serve.cache import SlotKVCache  # noqa: E402
from polymodal.serve.server import ServerThread  # noqa: E402
from polymodal.serve.models import ServedModel  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CONTEXT = 64


def _tiny_gpt_folder(root):
    from polymodal.models.gpt import GPTConfig
    from polymodal.tokenizers import train_char_tokenizer

    text = string.ascii_letters + string.digits + string.punctuation + " \n"
    tok = train_char_tokenizer(text, special_tokens=["<eos>"])
    tok = type(tok).from_tokenizers(tok.backend, eos="<eos>", chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    # init_std 0.5: a peaked next-token distribution, like a trained model's (random 0.02 init gives
    # near-uniform logits, whose argmax would hinge on rounding).
    cfg = GPTConfig.from_preset("nano-llama", vocab_size=tok.vocab_size, block_size=CONTEXT, init_std=0.5,
                                eos_token_id=tok.eos_id)
    model = build_model(cfg)
    save_model(model, root / "tiny-gpt", tokenizer=tok)
    return root / "tiny-gpt"


def _tiny_clip():
    from polymodal.models.clip import CLIPConfig
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_lowercase + " ", special_tokens=["<bos>", "<eos>"])
    tok = type(tok).from_tokenizers(tok.backend, bos="<bos>", eos="<eos>")
    torch.manual_seed(0)
    cfg = CLIPConfig.from_preset("clip-nano")
    cfg.text.vocab_size = tok.vocab_size
    cfg.text.eos_token_id = tok.eos_id
    return ServedModel.from_model("tiny-clip", build_model(cfg).eval(), tok)


def _tiny_encoder():
    from polymodal.models.encoder import EncoderConfig
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_lowercase + " ")
    torch.manual_seed(0)
    cfg = EncoderConfig.from_preset("tiny-bert", vocab_size=tok.vocab_size)
    return ServedModel.from_model("tiny-minilm", build_model(cfg).eval(), tok)


def _png(size=(16, 16), color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = _tiny_gpt_folder(tmp_path_factory.mktemp("serve"))
    gpt = ServedModel.load(f"tiny={folder}", dtype=None, context=CONTEXT)
    gpt.model.double()
    app = create_app([gpt, _tiny_clip(), _tiny_encoder()], max_batch_size=16, max_queue=64, timeout=60,
                     max_body_bytes=256 << 10, max_image_bytes=16 << 10)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, content, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def _ok(client):
    """The server still answers a normal request after an error."""
    r = _chat(client, "still there?", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


# -- the slot cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("compact_min", [32, 2])
def test_slot_cache_rows_join_leave_match_alone(compact_min):
    """Rows prefilled alone and decoded together (joining, leaving, compaction and growth) give
    the logits of each sequence decoded on its own, to fp64 rounding. ``compact_min`` 2: dead
    columns are also dropped early, whenever they are a quarter of the width."""
    from polymodal.models.gpt import GPTConfig

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_preset("nano-llama", block_size=40)).double().eval()
    seqs = [torch.randint(0, 65, (n,)).tolist() for n in (5, 11, 3)]

    def alone(seq, steps):
        c = model.new_cache(1)
        out = [model(torch.tensor([seq]), cache=c, last_only=True)[0, -1]]
        for t in range(steps):
            out.append(model(torch.tensor([[t % 65]]), cache=c, last_only=True)[0, -1])
        return out

    with torch.no_grad():
        cache = SlotKVCache(2, 3, 2, 16, limit=40, dtype=torch.float64, initial=8, compact_min=compact_min)
        compactions = 0
        got = {0: [], 1: [], 2: []}
        order = []
        for step in range(14):
            if step in (0, 2, 3):  # a row joins
                i = (0, 2, 3).index(step)
                c = model.new_cache(1, max_len=len(seqs[i]))
                got[i].append(model(torch.tensor([seqs[i]]), cache=c, last_only=True)[0, -1])
                cache.add(c.k, c.v, len(seqs[i]))
                order.append(i)
            if step == 6:  # the longest row leaves (its slots were the oldest); the last row moves into its place
                r = order.index(1)
                moved = cache.remove(r)
                if moved is not None:  # the last row now sits at r
                    order[r] = order[moved]
                order.pop()
            before = min(cache.starts)
            cache.ensure(1)
            compactions += before > 0 and min(cache.starts) == 0
            feed = torch.tensor([[(len(got[i]) - 1) % 65] for i in order])
            logits = model(feed, cache=cache, last_only=True)[:, -1]
            for r, i in enumerate(order):
                got[i].append(logits[r])
        for i in range(3):
            ref = alone(seqs[i], len(got[i]) - 1)
            for a, b in zip(got[i], ref):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert cache.max_len <= 40
        assert compactions >= 1  # dead columns were dropped (early with compact_min 2, at capacity with 32)


def test_stop_prefix_released_at_eos(server):
    """Text withheld because it could start a stop string is sent when the sequence ends
    (EOS or max_tokens) without that stop string, and cut exactly at one that completes."""
    from polymodal.generate.sampler import SamplingParams
    from polymodal.serve.scheduler import GenRequest, _Row

    sm = server.server.config.app.state.models["tiny"]
    sched, tok = sm.scheduler, sm.tokenizer

    def run(text, stop, end_with_eos):
        req = GenRequest(prompt=[0], max_tokens=100, params=SamplingParams(temperature=0), stop=stop)
        row = _Row(req, 0, tok, sched.eos)
        ids = tok.encode(text) + ([tok.eos_id] if end_with_eos else [])
        events = []
        for t in ids:
            if row.finished is None:
                events += sched._accept(row, t, torch.zeros(tok.vocab_size))
        pieces = [e[2] for e in events if e[0] == "token"]
        return pieces, [e[2] for e in events if e[0] == "done"]

    pieces, done = run("hello XY", ["XYZ"], True)
    assert "".join(pieces) == "hello XY" and done == ["stop"]
    assert "".join(pieces[:-1]) == "hello "  # "X", "XY" were held back until the end
    pieces, done = run("ab XYZ cd", ["XYZ"], False)
    assert "".join(pieces) == "ab " and done == ["stop"]
    pieces, done = run("one two", ["ne", "o t"], False)  # the earliest of several stops, across pieces
    assert "".join(pieces) == "o" and done == ["stop"]


def test_prefix_cache_lookup_store_evict():
    """The longest shared prefix wins, one token is always left to prefill, an entry that a new
    prompt extends is replaced by it, and the least recently used entries leave past the budget."""
    from polymodal.serve.cache import PrefixCache

    def kv(n):
        return [torch.full((1, 1, n, 2), float(n))], [torch.full((1, 1, n, 2), -float(n))]

    pc = PrefixCache(budget=20, min_reuse=2)
    pc.store([1, 2, 3, 4], *kv(4))
    pc.store([1, 2, 9], *kv(3))
    n, k, _ = pc.lookup([1, 2, 3, 7, 7])
    assert n == 3 and float(k[0][0, 0, 0, 0]) == 4  # from [1, 2, 3, 4], not [1, 2, 9]
    assert pc.lookup([1, 2, 3, 4])[0] == 3  # the last token is prefilled again for its logits
    assert pc.lookup([5, 6, 7])[0] == 0 and pc.lookup([1, 8, 8])[0] == 0  # nothing / below min_reuse
    pc.store([1, 2, 3, 4, 5, 6], *kv(6))  # extends [1, 2, 3, 4]: that entry goes
    assert set(pc.entries) == {(1, 2, 9), (1, 2, 3, 4, 5, 6)} and pc.tokens == 9
    pc.lookup([1, 2, 9, 9])  # [1, 2, 9] is now the most recently used
    pc.store([7, 7, 7, 7, 7, 7, 7, 7], *kv(8))
    pc.store([8] * 8, *kv(8))  # 25 tokens > 20: the least recently used entry leaves
    assert set(pc.entries) == {(1, 2, 9), (7,) * 8, (8,) * 8} and pc.tokens == 19
    pc.store([3] * 11, *kv(11))  # longer than half the budget: not kept
    assert (3,) * 11 not in pc.entries


def test_prefix_cache_reuse_keeps_greedy_text(server, client):
    """A prompt that shares its beginning with an earlier one prefills only the rest, and its
    greedy text is still polymodal.generate's on the whole prompt (no cache)."""
    from polymodal.generate import generate

    sm = server.server.config.app.state.models["tiny"]
    metrics = server.server.config.app.state.metrics

    def reused():
        return metrics.counters.get("polymodal_prefix_cache_tokens_total", {}).get('{model="tiny"}', 0)

    _chat(client, "a shared beginning, then one", max_tokens=4)
    before = reused()
    r = _chat(client, "a shared beginning, then two", max_tokens=10)
    prompt = sm.tokenizer.encode(sm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a shared beginning, then two"}]))
    assert reused() - before >= len(sm.tokenizer.encode("<user>a shared beginning, then "))
    ref = generate(sm.model, [prompt], max_new_tokens=10, do_sample=False, eos_token_id=sm.tokenizer.eos_id)[0]
    assert r.choices[0].message.content == sm.tokenizer.decode(ref)


def test_grouped_prefill_with_prefix_hits_matches_alone(server):
    """Requests admitted together share one padded prefill forward, with prefix-cache hits of
    different lengths (a whole repeated prompt, a long and a short shared beginning, none):
    each gets polymodal.generate's greedy text for its prompt alone."""
    from polymodal.generate import generate
    from polymodal.generate.sampler import SamplingParams
    from polymodal.serve.metrics import Metrics
    from polymodal.serve.scheduler import GenRequest, Scheduler

    sm = server.server.config.app.state.models["tiny"]
    tok = sm.tokenizer
    metrics = Metrics()
    sched = Scheduler(sm.model, tok, max_batch_size=8, context=CONTEXT, metrics=metrics, name="t")
    sched.close()  # driven by hand below, one iteration at a time

    class Sink:  # stands in for the event loop and the request's asyncio.Queue
        def __init__(self):
            self.events = []

        def call_soon_threadsafe(self, fn, *args):
            fn(*args)

        def put_nowait(self, e):
            self.events.append(e)

    def chat(text):
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))

    def submit(prompt):
        sink = Sink()
        req = GenRequest(prompt=prompt, max_tokens=12, params=SamplingParams(temperature=0), loop=sink, events=sink)
        sched.waiting.put(req)
        return sink

    def run():
        while sched.rows or not sched.waiting.empty():
            sched._iteration()

    first = chat("the same start, alpha")
    submit(first)
    run()  # alone: fills the prefix cache
    prompts = [first, chat("the same start, beta!"), chat("other"), tok.encode("no template here"), chat("q")]
    sinks = [submit(p) for p in prompts]
    run()
    hist = metrics.hists["polymodal_prefill_batch_size"]['{model="t"}']
    assert hist[2] == 2 and hist[1] == 1 + len(prompts)  # two forwards: 1 prompt, then all 5 together
    assert metrics.counters["polymodal_prefix_cache_tokens_total"]['{model="t"}'] >= len(first) - 1 + 16
    for p, sink in zip(prompts, sinks):
        ref = generate(sm.model, [p], max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id)[0]
        assert "".join(e[2] for e in sink.events if e[0] == "token") == tok.decode(ref)
        assert [e for e in sink.events if e[0] == "done"][0][3] == len(ref)


# -- the API with the official client -------------------------------------------------------------

def test_models_health_metrics(server, client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"tiny", "tiny-clip", "tiny-minilm"}
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    _chat(client, "hello", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE polymodal_requests_total counter" in text
    assert 'polymodal_time_to_first_token_seconds_count{model="tiny"}' in text
    assert "polymodal_generation_tokens_total" in text and "polymodal_batch_size_bucket" in text


def test_chat_sync_matches_generate(client, server):
    """Non-streaming greedy chat equals polymodal.generate on the same prompt (the served
    tokens are the library's tokens)."""
    from polymodal.generate import generate

    r = _chat(client, "Hi there", max_tokens=10)
    app = server.server.config.app
    sm = app.state.models["tiny"]
    prompt = sm.tokenizer.encode(sm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]))
    ref = generate(sm.model, [prompt], max_new_tokens=10, do_sample=False, eos_token_id=sm.tokenizer.eos_id)[0]
    assert r.choices[0].message.content == sm.tokenizer.decode(ref)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref)
    assert r.choices[0].finish_reason == ("length" if len(ref) == 10 else "stop")


def test_streaming_equals_non_streaming(client):
    full = _chat(client, "stream me", max_tokens=15).choices[0].message.content
    pieces = []
    for ev in _chat(client, "stream me", max_tokens=15, stream=True, stream_options={"include_usage": True}):
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
    assert "".join(pieces) == full and len(pieces) > 1


def test_async_client_and_completions(server):
    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r1, r2 = await asyncio.gather(
            ac.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0),
            ac.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, logprobs=2),
        )
        stream = await ac.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0, stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        await ac.close()
        return r1, r2, text

    r1, r2, text = asyncio.run(main())
    assert r1.choices[0].text == r2.choices[0].text == text
    lp = r2.choices[0].logprobs
    assert len(lp.tokens) == r2.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    # the chosen greedy token is the most likely one
    for tok, top, v in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert max(top.values()) == pytest.approx(v)


def test_sampling_seed_n_stop(client):
    a = _chat(client, "seeded", temperature=1.0, top_p=0.9, seed=7, n=3, max_tokens=10)
    b = _chat(client, "seeded", temperature=1.0, top_p=0.9, seed=7, n=3, max_tokens=10)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3
    full = _chat(client, "stop test", max_tokens=20).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    r = _chat(client, "stop test", max_tokens=20, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    lp = _chat(client, "lp", max_tokens=5, logprobs=True, top_logprobs=3).choices[0].logprobs
    assert len(lp.content) == 5 and len(lp.content[0].top_logprobs) == 3


def test_concurrent_streams_same_as_alone(server, client):
    """16 simultaneous streaming requests (continuous batching: they join a running batch at
    different steps) each give the greedy text they give alone."""
    prompts = [f"question {i}: {'x' * (i % 5)}" for i in range(16)]
    alone = [_chat(client, p, max_tokens=24).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}
    clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) for _ in range(16)]
    barrier = threading.Barrier(16)

    def worker(i):
        out = []
        barrier.wait(30)  # all 16 requests go out together
        for ev in _chat(clients[i], prompts[i], max_tokens=24, stream=True):
            if ev.choices and ev.choices[0].delta.content:
                out.append(ev.choices[0].delta.content)
        results[i] = "".join(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(16)] == alone
    metrics = httpx.get(server.url + "/metrics").text
    # they really were batched: some decode step ran more than 4 rows at once
    le4 = [ln for ln in metrics.splitlines() if ln.startswith('polymodal_batch_size_bucket{model="tiny",le="4"}')]
    count = [ln for ln in metrics.splitlines() if ln.startswith('polymodal_batch_size_count{model="tiny"}')]
    assert int(le4[0].split()[-1]) < int(count[0].split()[-1])


def test_client_disconnect_cancels(server, client):
    """A streaming client that goes away frees its batch row before the completion is done."""
    sched = server.server.config.app.state.models["tiny"].scheduler
    metrics = server.server.config.app.state.metrics
    real = sched.model

    class Slow:  # 30 ms per forward: ~40 tokens take > 1 s, so finishing first cannot pass the test
        config = real.config

        def __call__(self, *a, **kw):
            time.sleep(0.03)
            return real(*a, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    def generated():
        return metrics.counters.get("polymodal_generation_tokens_total", {}).get('{model="tiny"}', 0)

    before = generated()
    sched.model = Slow()
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "long"}], "max_tokens": 40, "stream": True,
                "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and "content" in line:
                    break
        for _ in range(100):
            if not sched.rows:
                break
            time.sleep(0.02)
        assert not sched.rows
        assert generated() == before  # the row left unfinished: no "done", no tokens counted
    finally:
        sched.model = real
    _ok(client)


def test_embeddings_clip_text_and_image(client):
    r = client.embeddings.create(model="tiny-clip", input=["a red square", "blue"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 64
    e = torch.tensor(r.data[0].embedding)
    assert abs(float(e.norm()) - 1) < 1e-4
    img = client.embeddings.create(model="tiny-clip", input=[_png()])
    assert len(img.data[0].embedding) == 64


def test_embeddings_text_encoder(server, client):
    """/v1/embeddings of a text encoder = SentenceEncoder.encode (mean pooling, L2-normalised),
    in the input order; base64 encoding carries the same floats."""
    import numpy as np

    texts = ["hello world", "a", "the quick brown fox"]
    r = client.embeddings.create(model="tiny-minilm", input=texts)
    got = torch.tensor([d.embedding for d in r.data])
    ref = server.server.config.app.state.models["tiny-minilm"].encoder.encode(texts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    b = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny-minilm", "input": texts,
                                                          "encoding_format": "base64"}).json()
    dec = np.frombuffer(base64.b64decode(b["data"][1]["embedding"]), dtype="<f4")
    assert np.allclose(dec, got[1].numpy()) and r.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-minilm", input=[_png()])
    assert e.value.body["code"] == "images_not_supported"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input=["x"])  # a generative model does not embed


# -- errors: OpenAI's shape and status, then the server keeps serving -------------------------------

def _err(resp, status, code=None):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code
    return e


def test_malformed_json(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"content-type": "application/json"})
    _err(r, 400, "invalid_json")
    _ok(client)


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    _ok(client)


def test_prompt_longer_than_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "y" * (CONTEXT + 10))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "short", max_tokens=CONTEXT)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    _ok(client)


def test_body_and_image_too_large(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "z" * (300 << 10)}]})
    _err(r, 413, "request_too_large")
    big = "data:image/png;base64," + base64.b64encode(b"\0" * (20 << 10)).decode()
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny-clip", "input": [big]})
    _err(r, 413, "image_too_large")
    _ok(client)


def test_invalid_parameters(server, client):
    for bad in ({"temperature": 5}, {"top_p": 0}, {"n": 0}, {"max_tokens": "many"}, {"messages": []},
                {"stop": ["a", "b", "c", "d", "e"]}):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **bad}
        e = _err(httpx.post(server.url + "/v1/chat/completions", json=body), 400)
        assert e["type"] == "invalid_request_error"
    e = _err(httpx.post(server.url + "/v1/chat/completions", json={"messages": []}), 400)
    assert e["param"] in ("model", "messages")
    _ok(client)


def test_image_to_text_only_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": _png()}}]}])
    assert e.value.body["code"] == "images_not_supported" and "text-only" in e.value.body["message"]
    _ok(client)


def test_queue_full_and_api_key(tmp_path):
    folder = _tiny_gpt_folder(tmp_path)
    sm = ServedModel.load(str(folder), context=CONTEXT)
    app = create_app([sm], api_key="secret", max_batch_size=1, max_queue=1)
    with ServerThread(app) as srv:
        r = httpx.get(srv.url + "/v1/models")
        _err(r, 401, "invalid_api_key")
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="secret", max_retries=0)
        assert c.models.list().data[0].id == "tiny-gpt"
        sched = sm.scheduler
        sched.max_queue = 0  # a full queue: every new request is refused
        try:
            with pytest.raises(openai.RateLimitError) as e:
                _chat_model(c, "tiny-gpt")
            assert e.value.body["code"] == "queue_full"
        finally:
            sched.max_queue = 1
        assert _chat_model(c, "tiny-gpt").choices[0].finish_reason in ("stop", "length")


def test_timeout(tmp_path):
    """A request that outlives the server's --timeout gets 408 in OpenAI's shape (non-streaming)
    or an error event (streaming); its rows are freed and the server still answers."""
    sm = ServedModel.load(str(_tiny_gpt_folder(tmp_path)), context=CONTEXT)
    app = create_app([sm], timeout=1e-4)
    with ServerThread(app) as srv:
        body = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "q"}], "max_tokens": 40}
        e = _err(httpx.post(srv.url + "/v1/chat/completions", json=body), 408)
        assert "timed out" in e["message"]
        lines = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
        assert any('"error"' in ln and "timed out" in ln for ln in lines)
        assert not sm.scheduler.rows and httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_vision_language_chat(tmp_path):
    """A served VLM answers chat messages with image_url parts: the served greedy text equals
    polymodal.generate on the same placeholder-expanded prompt and pixel values, and the
    playground config marks the model as vision-capable."""
    from PIL import Image

    from polymodal.generate import generate
    from polymodal.models.vlm import VLM, VLMConfig, _nano_decoder
    from polymodal.tokenizers import train_char_tokenizer

    # 64 characters + <unk> = the 65 ids below the placeholder id 65 of the nano VLM
    tok = train_char_tokenizer(string.ascii_letters + string.digits + " \n")
    tok = type(tok).from_tokenizers(tok.backend, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(decoder=_nano_decoder(init_std=0.5))).eval()
    sm = ServedModel.from_model("tiny-vlm", vlm, tok)
    with ServerThread(create_app([sm])) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert httpx.get(srv.url + "/playground/config").json()["models"][0]["vision"] is True
        outs = []
        for colour in ((250, 20, 20), (20, 20, 250)):
            url = _png((40, 40), colour)
            msg = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                {"type": "image_url", "image_url": {"url": url}}]}]
            r = c.chat.completions.create(model="tiny-vlm", messages=msg, max_tokens=12, temperature=0)
            text = tok.apply_chat_template([{"role": "user", "content": "what is this?<image>"}])
            ids = vlm.prompt_ids(tok, text)
            im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
            px = sm.image_processor([im])
            ref = generate(vlm, [ids], max_new_tokens=12, do_sample=False, model_kwargs={"pixel_values": px})[0]
            assert r.choices[0].message.content == tok.decode(ref)
            assert r.usage.prompt_tokens == len(ids) and ids.count(vlm.config.image_token_id) == 16
            outs.append(ref)
        assert outs[0] != outs[1]  # the answer depends on the image


def _chat_model(c, name):
    return c.chat.completions.create(model=name, messages=[{"role": "user", "content": "q"}], max_tokens=3,
                                     temperature=0)


def test_cli_registered():
    from polymodal.cli import COMMANDS, build_parser
    import importlib

    module, fn = COMMANDS["serve"]
    p = build_parser("serve", getattr(importlib.import_module(module), fn))
    a = p.parse_args(["--model", "a", "b", "--port", "9000"])
    assert a.model == ["a", "b"] and a.port == 9000 and a.host == "127.0.0.1"
    assert p.parse_args(["--model", "a", "--model", "b", "c"]).model == ["a", "b", "c"]
    assert p.parse_args([]).model is None


def test_cli_list_flag_replaces_default():
    """A list flag with a default: the first use replaces the default, repeats add to it."""
    from polymodal.cli import build_parser

    def cmd(k: list[int] = [0, 1, 4]):  # noqa: B006 - the default is only read
        """Example.

        Args:
            k: shots
        """

    p = build_parser("x", cmd)
    assert p.parse_args([]).k == [0, 1, 4]
    assert p.parse_args(["--k", "2"]).k == [2]
    assert p.parse_args(["--k", "2", "--k", "5", "6"]).k == [2, 5, 6]
    assert p.parse_args([]).k == [0, 1, 4]  # the default list was not modified


def test_serve_cli_two_models(tmp_path, monkeypatch):
    """`polymodal serve --model A --model B` serves both: /v1/models lists them and each answers."""
    from polymodal import cli

    folders = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        folders.append(_tiny_gpt_folder(tmp_path / name))
    started = {}

    def fake_serve(app, sock):  # the socket is bound before the models load; don't serve forever
        started.update(app=app, host=sock.getsockname()[0], port=sock.getsockname()[1])
        sock.close()

    monkeypatch.setattr("polymodal.serve.server.serve_forever", fake_serve)
    cli.run_command("serve", ["--model", f"first={folders[0]}", "--model", f"second={folders[1]}",
                              "--max-context", str(CONTEXT), "--port", "0"])
    assert started["port"] > 0 and started["host"] == "127.0.0.1"
    with ServerThread(started["app"]) as srv:
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["first", "second"]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        for name in ("first", "second"):
            assert _chat_model(c, name).choices[0].finish_reason in ("stop", "length")


# -- real weights ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_chat_concurrent_equals_alone():
    """SmolLM2-135M-Instruct (fp32, the default model): 3 concurrent greedy chats give the
    text each gives alone, and the text is the library's generate() output."""
    try:
        sm = ServedModel.load(None, context=512)
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    from polymodal.generate import generate

    app = create_app([sm], max_batch_size=8)
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        qs = ["Name a color.", "Say hi.", "What is the capital of France?"]
        kw = dict(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=10)
        alone = [c.chat.completions.create(messages=[{"role": "user", "content": q}], **kw).choices[0].message.content
                 for q in qs]
        out: dict[int, str] = {}

        def run(i):
            out[i] = c.chat.completions.create(messages=[{"role": "user", "content": qs[i]}], **kw).choices[0].message.content

        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(qs))]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        assert [out.get(i) for i in range(len(qs))] == alone
        prompt = sm.tokenizer.encode(sm.tokenizer.apply_chat_template([{"role": "user", "content": qs[2]}]))
        ref = generate(sm.model, [prompt], max_new_tokens=10, do_sample=False, eos_token_id=sm.tokenizer.eos_id)[0]
        assert alone[2] == sm.tokenizer.decode(ref)
        assert "Paris" in alone[2]
