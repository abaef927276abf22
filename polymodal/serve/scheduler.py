"""The request scheduler: one thread owns the model and runs continuous batching.

Each loop iteration (Orca, Yu et al., 2022, "iteration-level scheduling"):
1. drop rows whose request was cancelled (client gone) or timed out;
2. admit waiting requests while rows are free, and prefill the admitted prompts
   together in one left-padded forward (a fresh ``KVCache`` of their own; the part
   of a prompt it shares with a recent one, e.g. the chat template's system prompt,
   is copied from ``PrefixCache`` instead of recomputed), sample each first token
   from the prefill logits (that is the time to first token), and copy each
   prompt's K/V into the shared ``SlotKVCache``;
3. one decode step for every running row: feed each row's last token, get
   (n, V) logits, pick each row's next token with the ONE sampler
   (``generate.sampler.LogitsProcessor``, per-request parameters and RNG);
4. finished rows (EOS, stop string, max_tokens, context) leave the batch.

Padding is masked and positions count real tokens only, in the prefill and in the
slot cache's always-masked decode path, so a row's logits do not depend on what
else is running, up to the last bits of batched matmuls (BLAS rounds differently
for different batch sizes); the test that greedy text is the same alone and in a
batch therefore runs its tiny model in float64 (tests/test_serve.py).

The thread talks to the asyncio side through ``loop.call_soon_threadsafe`` onto
a per-request ``asyncio.Queue``: events are ``("token", choice, text, info)``,
``("done", choice, finish_reason, n_tokens)`` and ``("error", status, message)``.
The events of one decode step (one per running row) go over in ONE callback, so
the event loop is woken once per step, not once per token.
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
from .cache import PrefixCache, SlotKVCache


class QueueFull(Exception):
    pass


def _find_stop_from(text: str, stop: list[str], seen: int) -> int:
    """``_find_stop`` when ``text[:seen]`` is known to hold no stop string: only a match ending
    after ``seen`` is possible, so the search starts ``len(s) - 1`` characters before it."""
    hits = [i for i in (text.find(s, max(0, seen - len(s) + 1)) for s in stop) if i >= 0]
    return min(hits) if hits else -1


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
                self.gen.manual_seed((req.seed + choice) % 2 ** 64)  # choice i of seed s: seed s + i, 64-bit
            else:
                self.gen.seed()
        self.tokens: list[int] = []
        self.last = -1
        self.decoder = StreamDecoder(tokenizer)
        self.text, self.sent = "", 0
        self.eos = eos
        self.finished: str | None = None
        # plain greedy (no sampling, no penalties): the batch's shared argmax picks its token
        self.plain = not req.params.do_sample


class Scheduler:
    """Owns ``model``; ``submit`` requests from any thread (usually the event loop)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, max_queue: int = 256,
                 context: int | None = None, metrics=None, name: str = "model", prefix_cache_tokens: int = 2048,
                 prefill_budget: int = 2048):
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
        self.prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.prefill_budget = prefill_budget
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
        Scheduler._deliver([(req, list(events))])

    @staticmethod
    def _deliver(batch: list[tuple[GenRequest, list]]) -> None:
        """Hands (request, events) pairs to their event loops: one wake-up per loop."""
        by_loop: dict[int, list] = {}
        for req, events in batch:
            by_loop.setdefault(id(req.loop), []).append((req, events))

        def put(items):
            for req, events in items:
                for e in events:
                    req.events.put_nowait(e)
        for items in by_loop.values():
            try:
                items[0][0].loop.call_soon_threadsafe(put, items)
            except RuntimeError:  # the event loop is gone (server shutting down)
                for req, _ in items:
                    req.cancelled = True

    def _logprob_info(self, logits: torch.Tensor, tok: int, k: int) -> dict[str, Any]:
        lp = torch.log_softmax(logits.float(), -1)
        info: dict[str, Any] = {"token_id": tok, "logprob": float(lp[tok]), "top": []}
        if k > 0:
            vals, idx = lp.topk(k)
            info["top"] = [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
        return info

    def _safe_accept(self, row: _Row, tok: int, logits: torch.Tensor, out: list) -> None:
        """``_accept``, appending (request, events) to ``out``; fails only this row's request if
        its text cannot be decoded (e.g. a model whose vocabulary is larger than its tokenizer's
        emitted an id the tokenizer lacks)."""
        try:
            events = self._accept(row, tok, logits)
        except Exception as e:
            row.finished = "error"
            row.req.cancelled = True
            events = [("error", 500, f"generation failed: {type(e).__name__}: {e}")]
        if events:
            out.append((row.req, events))

    def _accept(self, row: _Row, tok: int, logits: torch.Tensor) -> list:
        """Records a sampled token and returns the events it makes (new text and logprobs, the
        end): the row finishes on EOS, a stop string, max_tokens or the end of the context."""
        req = row.req
        events = []
        info = None
        stop_at = -1
        seen = len(row.text)
        if tok in row.eos:
            row.finished = "stop"  # the EOS token itself is not part of the completion
        else:
            row.tokens.append(tok)
            row.last = tok
            row.text += row.decoder.push(tok)
            if req.logprobs is not None:
                info = self._logprob_info(logits, tok, req.logprobs)
            if req.stop:
                # a stop string not in the text before must end in the new piece: search only the tail
                stop_at = _find_stop_from(row.text, req.stop, seen)
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
        return events

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                self._deliver([(row.req, [("error", 500, f"generation failed: {type(e).__name__}: {e}")])
                               for row in self.rows])
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
        # 2. admit: every request that fits, prefilled together
        admitted, n_rows = [], len(self.rows)
        while not self.waiting.empty():
            req = self.waiting.queue[0]
            if req.cancelled or now > req.deadline:
                self.waiting.get_nowait()
                if not req.cancelled:
                    req.cancelled = True
                    self._emit(req, ("error", 408, f"request timed out after {req.timeout:g} s in the queue"))
                continue
            if n_rows + req.n > self.max_batch_size:
                break
            admitted.append(self.waiting.get_nowait())
            n_rows += req.n
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        self._gauge()
        # 3. decode
        if self.rows:
            self._decode()

    def _prefill_groups(self, reqs: list[GenRequest]) -> list[list[GenRequest]]:
        """Requests that arrived together are prefilled in one padded forward: one pass over the
        weights instead of one per prompt (a short prompt's prefill costs about as much as a
        decode step). A request with images goes alone (its own image tensors); a group is capped
        at ``prefill_budget`` padded tokens to bound the stall of the running rows."""
        groups, cur, longest = [], [], 0
        for req in reqs:
            if req.pixel_values is not None:
                groups.append([req])
                continue
            longest2 = max(longest, len(req.prompt))
            if cur and longest2 * (len(cur) + 1) > self.prefill_budget:
                groups.append(cur)
                cur, longest2 = [], len(req.prompt)
            cur.append(req)
            longest = longest2
        return groups + ([cur] if cur else [])

    def _prefill(self, group: list[GenRequest]) -> None:
        try:
            prefilled = self._prefill_forward(group)
        except Exception as e:
            if len(group) > 1:  # find the request at fault: each alone, so the others still start
                for req in group:
                    self._prefill([req])
                return
            group[0].cancelled = True
            self._emit(group[0], ("error", 500, f"prefill failed: {type(e).__name__}: {e}"))
            return
        out: list = []
        for req, (logits, k, v) in zip(group, prefilled):
            try:
                self._start_rows(req, logits, k, v, out)
            except Exception as e:  # this request fails alone; the running batch carries on
                req.cancelled = True  # any of its rows already in the batch leave at the next iteration
                out.append((req, [("error", 500, f"prefill failed: {type(e).__name__}: {e}")]))
        self._deliver(out)  # now, not after later prefills: this is the time to first token

    def _prefill_forward(self, group: list[GenRequest]) -> list[tuple[torch.Tensor, list, list]]:
        """One forward over the group's prompts -> per request (last logits, per-layer K, V of
        shape (1, Hkv, len(prompt), D)).

        The part of a prompt found in the prefix cache is copied, not computed. Layout of the
        group's cache: row i's cached prefix (s_i tokens) ends at slot S = max s_i, and its new
        tokens (u_i) end at S + T, T = max u_i; the slots between are padding, masked out with
        ``key_valid``, and positions count only real tokens, so each row gets the logits it
        gets alone (up to BLAS rounding)."""
        t0 = time.monotonic()
        hits = []
        for req in group:  # images make K/V depend on more than the token ids: no reuse, not kept
            use = self.prefix is not None and req.pixel_values is None
            hits.append(self.prefix.lookup(req.prompt) if use else (0, None, None))
        s_max = max(h[0] for h in hits)
        t_max = max(len(r.prompt) - h[0] for r, h in zip(group, hits))
        c = self.model.new_cache(len(group), max_len=s_max + t_max)
        ids = torch.zeros(len(group), t_max, dtype=torch.long)
        mask = torch.zeros(len(group), t_max, dtype=torch.long)
        for i, (req, (s, k, v)) in enumerate(zip(group, hits)):
            if s:
                for dst, src in zip(c.k + c.v, k + v):
                    dst[i, :, s_max - s:s_max] = src[0, :, :s]
                c.key_valid[i, s_max - s:s_max] = True
            u = len(req.prompt) - s
            ids[i, t_max - u:] = torch.tensor(req.prompt[s:])
            mask[i, t_max - u:] = 1
        c.pos = s_max
        c.has_padding = any(h[0] != s_max for h in hits)
        padded = bool((mask == 0).any())
        extra = {"pixel_values": group[0].pixel_values} if group[0].pixel_values is not None else {}
        logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device) if padded else None,
                            cache=c, last_only=True, **extra)[:, -1]
        out, end = [], s_max + t_max
        for i, (req, (s, _, _)) in enumerate(zip(group, hits)):
            u = len(req.prompt) - s
            if len(group) == 1:  # the cache is this prompt's alone, slots [0, end): no copy
                k, v = c.k, c.v
            else:  # a compact copy of the row's real slots (a view would keep the group's cache alive)
                def rows(ts):
                    return [torch.cat([t[i:i + 1, :, s_max - s:s_max], t[i:i + 1, :, end - u:end]], dim=2)
                            for t in ts]
                k, v = rows(c.k), rows(c.v)
            if self.prefix is not None and req.pixel_values is None:
                self.prefix.store(req.prompt, k, v)  # nothing writes to these tensors again
            out.append((logits[i], k, v))
            if self.metrics is not None:
                self.metrics.inc("polymodal_prompt_tokens_total", len(req.prompt), model=self.name)
                self.metrics.inc("polymodal_prefix_cache_tokens_total", s, model=self.name)
        if self.metrics is not None:
            self.metrics.observe("polymodal_prefill_seconds", time.monotonic() - t0, model=self.name)
            self.metrics.observe("polymodal_prefill_batch_size", len(group), model=self.name)
        return out

    def _start_rows(self, req: GenRequest, logits: torch.Tensor, k: list, v: list, out: list) -> None:
        """The request's first token(s) from its prefill logits; its unfinished rows join the batch."""
        length = len(req.prompt)
        for choice in range(req.n):
            row = _Row(req, choice, self.tok, self.eos)
            row.state = row.proc.new_state([req.prompt], logits.shape[-1], self.device)
            row.plain = row.plain and row.state["seen"] is None and row.state["counts"] is None
            tok = int(row.proc.next_token(logits[None], row.state, row.gen)[0])
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
            self._observe(row, tok)
            self._safe_accept(row, tok, logits, out)
            if row.finished is None:
                self.cache.add(k, v, length)
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
        # Plain greedy rows take the batch's one argmax (over all rows: cheaper than selecting
        # rows first, which copies their logits); the rest go through their own processor.
        toks: list[int] = logits.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            if not r.plain:
                toks[i] = int(r.proc.next_token(logits[i:i + 1], r.state, r.gen)[0])
        out: list = []
        for i, r in enumerate(self.rows):
            self._observe(r, toks[i])
            self._safe_accept(r, toks[i], logits[i], out)
        self._deliver(out)
        for i in range(n - 1, -1, -1):
            if self.rows[i].finished is not None:
                self._drop(i)
        if self.metrics is not None:
            self.metrics.observe("polymodal_decode_step_seconds", time.monotonic() - t0, model=self.name)
            self.metrics.observe("polymodal_batch_size", n, model=self.name)
