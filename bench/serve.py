"""Serving benchmark: throughput and latency of ``polymodal serve`` under concurrent streaming chat load.

The server runs in its own process (``polymodal serve`` on a free loopback port); this
process is the load generator: ``C`` concurrent clients each send streaming chat
requests back to back, bounded by ``--requests`` per client AND ``--duration`` seconds
per level. Reported per concurrency level:

* throughput: completion tokens of all finished requests / wall time of the level;
* TTFT p50/p99: request sent -> first content chunk;
* per-token latency p50/p99: time between consecutive content chunks (TPOT/ITL).

``--reference`` runs the same load against a plain transformers server loop (one
request at a time, ``model.generate`` + ``TextIteratorStreamer``, the usual
"HF model behind FastAPI" set-up) on the same weights, and prints the ratios.

    .venv/bin/python bench/serve.py --quick              # 1 and 8 clients, short bounds
    .venv/bin/python bench/serve.py                      # 1, 8, 32 clients (a few minutes)
    .venv/bin/python bench/serve.py --reference          # + transformers loop, ratios

Goals (2 CPU cores, SmolLM2-135M-Instruct): >= 400 tok/s aggregate at 32 clients,
TTFT p99 <= 2 s at 8 clients. Numbers are noisy on a shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
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
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens or len(times),
            "end": time.perf_counter()}


async def run_level(url: str, model: str, clients: int, requests: int, duration: float, max_tokens: int) -> dict:
    results: list[dict] = []
    t_start = time.perf_counter()
    stop_at = t_start + duration

    async def client_loop(i: int):
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as c:
            for k in range(requests):
                if time.perf_counter() > stop_at:
                    break
                results.append(await one_request(c, url, model, QUESTIONS[(i + k) % len(QUESTIONS)], max_tokens))

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - t_start
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(ok), "errors": len(results) - len(ok), "tokens": toks,
            "wall_s": wall, "tok_s": toks / wall, "ttft_p50": pct([r["ttft"] for r in ok], 50),
            "ttft_p99": pct([r["ttft"] for r in ok], 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
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


# -- the reference: a plain transformers server loop ---------------------------------------------

REFERENCE_SERVER = r'''
import asyncio, json, sys, threading, time, uuid
import torch, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
folder, port = sys.argv[1], int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
lock = threading.Lock()  # one generate() at a time: the plain loop
app = FastAPI()
@app.get("/health")
def health():
    return {"status": "ok"}
@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    def work():
        try:
            with lock, torch.inference_mode():
                out = model.generate(ids, max_new_tokens=body["max_tokens"], do_sample=False, streamer=streamer)
            work.n = out.shape[1] - ids.shape[1]
        except Exception:
            streamer.end()  # never leave the client waiting
            raise
    threading.Thread(target=work, daemon=True).start()
    async def events():
        it = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, it, None)
            if piece is None:
                break
            if piece:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n"
        yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": getattr(work, "n", 0)}}) + "\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def start(cmd: list[str], port: int, log: Path) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_up(url, proc)
    except Exception:
        proc.kill()
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    return proc, url


def bench(url: str, model: str, levels: list[int], args) -> list[dict]:
    rows = []
    for c in levels:
        r = asyncio.run(run_level(url, model, c, args.requests, args.duration, args.max_tokens))
        rows.append(r)
        print(f"  {c:>3} clients: {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s  "
              f"per-token p50 {1000 * r['itl_p50']:.1f} ms p99 {1000 * r['itl_p99']:.1f} ms  "
              f"({r['requests']} requests, {r['tokens']} tokens, {r['errors']} errors, {r['wall_s']:.1f} s)",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path for polymodal serve (default SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level (upper bound)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level after which clients stop")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    ap.add_argument("--serve-args", default="", help="extra flags for polymodal serve, e.g. '--dtype bfloat16'")
    ap.add_argument("--reference", action="store_true", help="also run a plain transformers server loop")
    ap.add_argument("--quick", action="store_true", help="1 and 8 clients, 2 requests each, 20 s per level")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.duration = [1, 8], 2, 20.0
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    port = free_port()
    cmd = [sys.executable, "-m", "polymodal.cli", "serve", "--port", str(port), "--max-batch-size",
           str(max(args.clients)), "--max-context", "1024", *args.serve_args.split()]
    if args.model:
        cmd += ["--model", args.model]
    print("polymodal serve:", " ".join(cmd[3:]), flush=True)
    proc, url = start(cmd, port, tmp / "polymodal.log")
    try:
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        ours = bench(url, name, args.clients, args)
    finally:
        proc.terminate()
        proc.wait(30)
    out = {"polymodal": ours}
    if args.reference:
        from polymodal.interop import convert

        folder = tmp / "hf"
        convert(args.model, folder, to="hf")  # the same weights, as a Hugging Face folder
        (tmp / "ref_server.py").write_text(REFERENCE_SERVER)
        port = free_port()
        print("transformers server loop (one generate() at a time):", flush=True)
        proc, url = start([sys.executable, str(tmp / "ref_server.py"), str(folder), str(port)], port,
                          tmp / "reference.log")
        try:
            ref = bench(url, "ref", args.clients, args)
        finally:
            proc.terminate()
            proc.wait(30)
        out["transformers"] = ref
        for a, b in zip(ours, ref):
            print(f"  {a['clients']:>3} clients: throughput x{a['tok_s'] / b['tok_s']:.2f}, "
                  f"TTFT p99 x{b['ttft_p99'] / a['ttft_p99']:.2f} (polymodal vs transformers; > 1 = polymodal better)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
