"""The request scheduler: one thread owns the model and runs continuous batching.

Each loop iteration (Orca, Yu et al., 2022, "iteration-level scheduling"):
1. drop rows whose request was cancelled (client gone) or timed out;
2. admit waiting requests while rows are free: prefill each prompt alone (a
   one-row ``KVCache``), sample its first token from the prefill logits (that is
   the time to first token), and copy its K/V into the shared ``SlotKVCache``;
3. one decode step for every running row: feed each row's last token, get
   (n, V) logits, pick each row's next token with the ONE sampler
   (``generate.sampler.LogitsProcessor``, per-request parameters and RNG);
4. finished rows (EOS, stop string, max_tokens, context) leave the batch.

Prefilling alone makes a request's prompt logits independent of the traffic,
and the slot cache's always-masked decode path makes the decode step
row-independent, so greedy output does not depend on what else is running
(tested in tests/test_serve.py).

The thread talks to the asyncio side through ``loop.call_soon_threadsafe`` onto
a per-request ``asyncio.Queue``: events are ``("token", choice, text, info)``,
``("done", choice, finish_reason, n_tokens)`` and ``("error", status, message)``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from typing import Any

import torch

from ..generate.decode import _find_stop, _stop_overlap
from ..generate.sampler import LogitsProcessor, SamplingParams
from ..tokenizers import StreamDecoder
from .cache import SlotKVCache


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    n: int = 1
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None = off, k >= 0 = chosen token + top-k alternatives
    timeout: float = 600.0
    pixel_values: Any = None  # (1, M, C, H, W) images of a vision-language prompt
    # filled in by the scheduler
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    created: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done_choices: int = 0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def deadline(self) -> float:
        return self.created + self.timeout


class _Row:
    """One running sequence (one choice of one request)."""

    def __init__(self, req: GenRequest, choice: int, tokenizer, eos: set[int]):
        self.req, self.choice = req, choice
        self.proc = LogitsProcessor(req.params)
        self.state: dict | None = None
        self.gen = None
        if req.params.do_sample:
            self.gen = torch.Generator()
            if req.seed is not None:
                self.gen.manual_seed(req.seed + choice)
            else:
                self.gen.seed()
        self.tokens: list[int] = []
        self.last = -1
        self.decoder = StreamDecoder(tokenizer)
        self.text, self.sent = "", 0
        self.eos = eos
        self.finished: str | None = None


class Scheduler:
    """Owns ``model``; ``submit`` requests from any thread (usually the event loop)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_queue: int = 256,
                 context: int | None = None, metrics=None, name: str = "model"):
        self.model, self.tok, self.name = model, tokenizer, name
        cfg = model.config
        self.context = min(context or cfg.block_size, cfg.block_size)
        c = getattr(cfg, "decoder", cfg)  # a VLM's cache is its decoder's
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        p = next(model.parameters())
        self.cache = SlotKVCache(c.n_layer, max_batch_size, c.kv_heads, c.hd, self.context, p.dtype, p.device,
                                 initial=min(256, self.context))
        self.device = p.device
        eos = {tokenizer.eos_id} if getattr(tokenizer, "eos_id", None) is not None else set()
        if cfg.eos_token_id is not None:
            eos.add(int(cfg.eos_token_id))
        self.eos = eos
        self.waiting: queue.Queue[GenRequest] = queue.Queue()
        self.rows: list[_Row] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"polymodal-scheduler-{name}", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------
    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        if req.n > self.max_batch_size:
            raise ValueError(f"n={req.n} exceeds the server's max batch size ({self.max_batch_size})")
        req.loop, req.events = loop, asyncio.Queue()
        self.waiting.put(req)
        self._gauge()
        self._wake.set()
        return req.events

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    # -- helpers -----------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set_gauge("polymodal_queue_depth", self.waiting.qsize(), model=self.name)
            self.metrics.set_gauge("polymodal_running_sequences", len(self.rows), model=self.name)

    @staticmethod
    def _emit(req: GenRequest, *events) -> None:
        def put():
            for e in events:
                req.events.put_nowait(e)
        try:
            req.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is gone (server shutting down)
            req.cancelled = True

    def _logprob_info(self, logits: torch.Tensor, tok: int, k: int) -> dict[str, Any]:
        lp = torch.log_softmax(logits.float(), -1)
        info: dict[str, Any] = {"token_id": tok, "logprob": float(lp[tok]), "top": []}
        if k > 0:
            vals, idx = lp.topk(k)
            info["top"] = [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
        return info

    def _safe_accept(self, row: _Row, tok: int, logits: torch.Tensor) -> None:
        """``_accept``, failing only this row's request if its text cannot be decoded (e.g. a
        model whose vocabulary is larger than its tokenizer's emitted an id the tokenizer lacks)."""
        try:
            self._accept(row, tok, logits)
        except Exception as e:
            row.finished = "error"
            row.req.cancelled = True
            self._emit(row.req, ("error", 500, f"generation failed: {type(e).__name__}: {e}"))

    def _accept(self, row: _Row, tok: int, logits: torch.Tensor) -> None:
        """Records a sampled token: emits its new text (and logprobs), and finishes the row on
        EOS, a stop string, max_tokens or the end of the context."""
        req = row.req
        events = []
        info = None
        stop_at = -1
        if tok in row.eos:
            row.finished = "stop"  # the EOS token itself is not part of the completion
        else:
            row.tokens.append(tok)
            row.last = tok
            row.text += row.decoder.push(tok)
            if req.logprobs is not None:
                info = self._logprob_info(logits, tok, req.logprobs)
            if req.stop:
                stop_at = _find_stop(row.text, req.stop)
                if stop_at >= 0:
                    row.finished = "stop"
            if row.finished is None and len(row.tokens) >= req.max_tokens:
                row.finished = "length"
            if row.finished is None and len(req.prompt) + len(row.tokens) >= self.context:
                row.finished = "length"  # the next token would not fit the context
        if row.finished is not None and stop_at < 0:
            # the end: release text held back (an incomplete UTF-8 character, a possible stop prefix)
            row.text += row.decoder.flush()
            stop_at = _find_stop(row.text, req.stop) if req.stop else -1
            end = stop_at if stop_at >= 0 else len(row.text)
        elif stop_at >= 0:
            end = stop_at
        else:
            end = len(row.text) - (_stop_overlap(row.text, req.stop) if req.stop else 0)
        piece = row.text[row.sent:end] if end > row.sent else ""
        row.sent = max(row.sent, end)
        if info is not None or piece:
            events.append(("token", row.choice, piece, info))
        if row.finished is not None:
            events.append(("done", row.choice, row.finished, len(row.tokens)))
            if self.metrics is not None:
                self.metrics.inc("polymodal_generation_tokens_total", len(row.tokens), model=self.name)
        if events:
            self._emit(req, *events)

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                for row in self.rows:
                    self._emit(row.req, ("error", 500, f"generation failed: {type(e).__name__}: {e}"))
                while self.cache.n:
                    self.cache.remove(self.cache.n - 1)
                self.rows = []
            if not self.rows and self.waiting.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _drop(self, i: int) -> None:
        moved = self.cache.remove(i)
        if moved is not None:
            self.rows[i] = self.rows[moved]
        self.rows.pop()

    def _iteration(self) -> None:
        now = time.monotonic()
        # 1. cancelled / timed out rows leave
        for i in range(len(self.rows) - 1, -1, -1):
            req = self.rows[i].req
            if req.cancelled or now > req.deadline:
                if not req.cancelled:
                    req.cancelled = True
                    self._emit(req, ("error", 408, f"request timed out after {req.timeout:g} s"))
                self._drop(i)
        # 2. admit
        while not self.waiting.empty():
            req = self.waiting.queue[0]
            if req.cancelled or now > req.deadline:
                self.waiting.get_nowait()
                if not req.cancelled:
                    req.cancelled = True
                    self._emit(req, ("error", 408, f"request timed out after {req.timeout:g} s in the queue"))
                continue
            if len(self.rows) + req.n > self.max_batch_size:
                break
            self.waiting.get_nowait()
            try:
                self._prefill(req)
            except Exception as e:  # this request fails alone; the running batch carries on
                req.cancelled = True
                self._emit(req, ("error", 500, f"prefill failed: {type(e).__name__}: {e}"))
                # any of its rows already in the batch leave at the next iteration (cancelled)
        self._gauge()
        # 3. decode
        if self.rows:
            self._decode()

    def _prefill(self, req: GenRequest) -> None:
        t0 = time.monotonic()
        length = len(req.prompt)
        c = self.model.new_cache(1, max_len=length)
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        extra = {"pixel_values": req.pixel_values} if req.pixel_values is not None else {}
        logits = self.model(ids, cache=c, last_only=True, **extra)[0, -1]
        if self.metrics is not None:
            self.metrics.observe("polymodal_prefill_seconds", time.monotonic() - t0, model=self.name)
            self.metrics.inc("polymodal_prompt_tokens_total", length, model=self.name)
        for choice in range(req.n):
            row = _Row(req, choice, self.tok, self.eos)
            row.state = row.proc.new_state([req.prompt], logits.shape[-1], self.device)
            tok = int(row.proc.next_token(logits[None], row.state, row.gen)[0])
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
            self._observe(row, tok)
            self._safe_accept(row, tok, logits)
            if row.finished is None:
                self.cache.add(c.k, c.v, length)
                self.rows.append(row)

    @staticmethod
    def _observe(row: _Row, tok: int) -> None:
        if row.state is not None and (row.state["seen"] is not None or row.state["counts"] is not None):
            row.proc.observe(row.state, torch.tensor([tok]))

    def _decode(self) -> None:
        t0 = time.monotonic()
        self.cache.ensure(1)
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=self.cache, last_only=True)[:, -1]
        n = len(self.rows)
        # Rows with plain greedy decoding share one argmax; the rest go through their own processor.
        plain = [i for i, r in enumerate(self.rows) if not r.req.params.do_sample and r.state["seen"] is None
                 and r.state["counts"] is None]
        toks: list[int] = [0] * n
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            for i, t in zip(plain, logits.index_select(0, idx).float().argmax(-1).tolist()):
                toks[i] = t
        plain_set = set(plain)
        for i, r in enumerate(self.rows):
            if i in plain_set:
                continue
            toks[i] = int(r.proc.next_token(logits[i:i + 1], r.state, r.gen)[0])
        for i, r in enumerate(self.rows):
            self._observe(r, toks[i])
            self._safe_accept(r, toks[i], logits[i])
        for i in range(n - 1, -1, -1):
            if self.rows[i].finished is not None:
                self._drop(i)
        if self.metrics is not None:
            self.metrics.observe("polymodal_decode_step_seconds", time.monotonic() - t0, model=self.name)
            self.metrics.observe("polymodal_batch_size", n, model=self.name)
