"""Serving benchmark: throughput and latency under concurrent streaming chat load, polymodal vs transformers.

Each server runs in its own process on a free loopback port; this process is the load
generator: ``C`` concurrent clients each send streaming chat requests back to back,
bounded by ``--requests`` per client AND ``--duration`` seconds per level, and the whole
run by ``--max-time`` seconds (levels that would start after it are skipped). Reported per
concurrency level:

* throughput: completion tokens of all finished requests / wall time of the level;
* TTFT p50/p99: request sent -> first content chunk;
* per-token latency p50/p99: time between consecutive content chunks (TPOT/ITL).

Every request's prompt is unique (one of 8 questions plus a request number), so a server's
prefix cache can reuse the chat template's system prompt, as with real traffic, but never a
whole repeated prompt.

Backends (``--backend``, one or both; the same load, one server at a time):

* ``polymodal``: ``polymodal serve`` (continuous batching over a slot KV cache);
* ``transformers``: the plain server a user would write with transformers on the same
  weights (``from_pretrained(folder, gguf_file=...)``: transformers' own GGUF loader, the same
  dequantised Q4_1 tensors polymodal loads): FastAPI + one worker thread that takes whatever
  requests are queued (up to ``--hf-batch``), left-pads them and runs ``model.generate`` on the
  batch with a streamer that forwards each row's new text (static batching: a request that
  arrives meanwhile waits for the whole batch to end). ``--hf-batch 1`` = one request at a time.

With both, the ratios polymodal/transformers are printed per level (> 1 = polymodal better).

    .venv/bin/python bench/serve.py --quick                                  # smoke: 1 and 8 clients, tiny bounds
    .venv/bin/python bench/serve.py --backend polymodal transformers         # 1, 8, 32 clients, both servers

Goals (2 CPU cores, SmolLM2-135M-Instruct): >= 400 tok/s aggregate at 32 clients,
TTFT p99 <= 2 s at 8 clients. Numbers are noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms.",
    "List five uses of a paperclip and explain each.",
    "Describe the water cycle in detail.",
    "Write a poem about the sea.",
    "What are the benefits of regular exercise?",
    "Explain what a neural network is to a child.",
    "Tell me about the history of the bicycle.",
]

REQUEST_IDS = itertools.count()  # makes every prompt of the run unique


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, q: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d.get("choices", []):
                if c.get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    if not times:
        return {"error": "empty"}
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens or len(times)}


async def run_level(url: str, model: str, clients: int, requests: int, duration: float, max_tokens: int,
                    grace: float = 120.0) -> dict:
    """``clients`` loops of up to ``requests`` requests each; none starts after ``duration`` s, and
    requests still running ``grace`` s after that are abandoned (counted as errors)."""
    results: list[dict] = []
    t_start = time.perf_counter()
    stop_at = t_start + duration

    async def client_loop(i: int):
        async with httpx.AsyncClient(timeout=httpx.Timeout(duration + grace)) as c:
            for k in range(requests):
                if time.perf_counter() > stop_at:
                    break
                q = f"{QUESTIONS[(i + k) % len(QUESTIONS)]} (request {next(REQUEST_IDS)})"
                try:
                    results.append(await one_request(c, url, model, q, max_tokens))
                except httpx.HTTPError as e:
                    results.append({"error": type(e).__name__})

    tasks = [asyncio.ensure_future(client_loop(i)) for i in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=duration + grace)
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - t_start
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(ok), "errors": len(results) - len(ok) + len(pending),
            "tokens": toks, "wall_s": wall, "tok_s": toks / wall, "ttft_p50": pct([r["ttft"] for r in ok], 50),
            "ttft_p99": pct([r["ttft"] for r in ok], 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


# -- the transformers baseline: a plain server loop -----------------------------------------------

TRANSFORMERS_SERVER = r'''
"""A plain transformers chat server: FastAPI + one worker thread running model.generate on
whatever requests are queued (static batching, left padding), streaming each row's text."""
import asyncio, json, queue, sys, threading
from pathlib import Path
import torch, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

path, port, max_batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
kw = {"gguf_file": path.name} if path.is_file() else {}
folder = path.parent if path.is_file() else path
tok = AutoTokenizer.from_pretrained(folder, padding_side="left", **kw)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
name = path.stem
pending = queue.Queue()


class Job:
    def __init__(self, ids, max_tokens, loop):
        self.ids, self.max_tokens, self.loop = ids, max_tokens, loop
        self.events = asyncio.Queue()
        self.out, self.sent, self.done = [], "", False

    def push(self, *ev):
        self.loop.call_soon_threadsafe(self.events.put_nowait, ev)


class RowStreamer(BaseStreamer):
    """generate() calls put() with the prompt batch first, then each step's (B,) new tokens."""
    def __init__(self, jobs):
        self.jobs, self.prompt_seen = jobs, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, t in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if t == tok.eos_token_id:
                finish(job)
                continue
            job.out.append(t)
            text = tok.decode(job.out, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(job.sent):
                job.push("token", text[len(job.sent):])
                job.sent = text
            if len(job.out) >= job.max_tokens:
                finish(job)

    def end(self):
        for job in self.jobs:
            if not job.done:
                finish(job)


def finish(job):
    job.done = True
    job.push("done", len(job.out))


def worker():
    torch.set_grad_enabled(False)
    while True:
        jobs = [pending.get()]
        while len(jobs) < max_batch:  # whatever else is already waiting joins this batch
            try:
                jobs.append(pending.get_nowait())
            except queue.Empty:
                break
        batch = tok.pad({"input_ids": [j.ids for j in jobs]}, return_tensors="pt")
        streamer = RowStreamer(jobs)
        try:
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=max(j.max_tokens for j in jobs), do_sample=False,
                               streamer=streamer, pad_token_id=tok.pad_token_id)
        except Exception as e:  # never leave a client waiting
            print(f"generate failed: {e}", file=sys.stderr, flush=True)
            streamer.end()


threading.Thread(target=worker, daemon=True).start()
app = FastAPI()


@app.get("/health")
def health():
    return {"status": "ok"}


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": name, "object": "model"}]}


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    job = Job(list(ids), int(body.get("max_tokens") or 16), asyncio.get_running_loop())
    pending.put(job)

    def sse(obj):
        return "data: " + json.dumps(obj) + "\n\n"

    async def events():
        while True:
            ev = await job.events.get()
            if ev[0] == "token":
                yield sse({"choices": [{"index": 0, "delta": {"content": ev[1]}, "finish_reason": None}]})
            else:
                yield sse({"choices": [], "usage": {"prompt_tokens": len(job.ids), "completion_tokens": ev[1]}})
                yield "data: [DONE]\n\n"
                return

    return StreamingResponse(events(), media_type="text/event-stream")


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def start(cmd: list[str], port: int, log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_up(url, proc)
    except Exception:
        proc.kill()
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    return proc, url


def server_command(backend: str, args, port: int, tmp: Path) -> list[str]:
    if backend == "polymodal":
        cmd = [sys.executable, "-m", "polymodal.cli", "serve", "--port", str(port), "--max-batch-size",
               str(max(args.clients)), "--max-context", "1024", *args.serve_args.split()]
        return cmd + (["--model", args.model] if args.model else [])
    from polymodal.interop import checkpoint_kind, convert, default_model_path

    path = Path(args.model) if args.model else default_model_path()
    if checkpoint_kind(path) == "polymodal":  # transformers cannot read it: export the same weights
        path = convert(path, tmp / "hf", to="hf")
    (tmp / "transformers_server.py").write_text(TRANSFORMERS_SERVER)
    return [sys.executable, str(tmp / "transformers_server.py"), str(path), str(port),
            str(args.hf_batch or max(args.clients))]


def bench(url: str, model: str, args, deadline: float) -> list[dict]:
    # one unmeasured request first: the first forward of a fresh process pays one-off costs
    warm = asyncio.run(run_level(url, model, 1, 1, 60.0, 8))
    if warm["errors"]:
        raise RuntimeError(f"the warm-up request failed: {warm}")
    rows = []
    for c in args.clients:
        left = deadline - time.perf_counter()
        if left < 5:
            print(f"  {c:>3} clients: skipped (--max-time reached)", flush=True)
            continue
        r = asyncio.run(run_level(url, model, c, args.requests, min(args.duration, left), args.max_tokens,
                                  grace=min(120.0, max(10.0, left))))
        rows.append(r)
        print(f"  {c:>3} clients: {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s  "
              f"per-token p50 {1000 * r['itl_p50']:.1f} ms p99 {1000 * r['itl_p99']:.1f} ms  "
              f"({r['requests']} requests, {r['tokens']} tokens, {r['errors']} errors, {r['wall_s']:.1f} s)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", nargs="+", choices=["polymodal", "transformers"], default=["polymodal"],
                    help="servers to measure, one after the other (both: ratios are printed)")
    ap.add_argument("--model", default=None, help="model path (default SmolLM2-135M-Instruct's GGUF)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level (upper bound)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level after which clients stop")
    ap.add_argument("--max-time", type=float, default=900.0,
                    help="seconds for the whole run (levels after it are skipped; server start-up included)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each server (default: torch's)")
    ap.add_argument("--serve-args", default="", help="extra flags for polymodal serve, e.g. '--quantize int4'")
    ap.add_argument("--hf-batch", type=int, default=None,
                    help="transformers server: most queued requests per generate() (default: most clients; 1 = "
                         "one request at a time)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 and 8 clients, 1 request each, 16 tokens")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.duration, args.max_tokens = [1, 8], 1, 20.0, 16
    deadline = time.perf_counter() + args.max_time
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    out: dict[str, list[dict]] = {}
    for backend in dict.fromkeys(args.backend):
        if deadline - time.perf_counter() < 30:
            print(f"{backend}: skipped (--max-time reached)", flush=True)
            continue
        port = free_port()
        cmd = server_command(backend, args, port, tmp)
        print(f"{backend}: {' '.join(cmd[1:])}", flush=True)
        proc, url = start(cmd, port, tmp / f"{backend}.log", env)
        try:
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            out[backend] = bench(url, name, args, deadline)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if "polymodal" in out and "transformers" in out:
        print("polymodal / transformers (> 1 = polymodal better):")
        ref = {r["clients"]: r for r in out["transformers"]}
        for a in out["polymodal"]:
            b = ref.get(a["clients"])
            if b is None or not b["tok_s"]:
                continue
            print(f"  {a['clients']:>3} clients: throughput x{a['tok_s'] / b['tok_s']:.2f}, "
                  f"TTFT p99 x{b['ttft_p99'] / a['ttft_p99']:.2f}, per-token p50 x{b['itl_p50'] / a['itl_p50']:.2f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
