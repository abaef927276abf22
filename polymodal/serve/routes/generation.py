"""``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events with
``stream: true``), run by each generative model's ``Scheduler``.

A request becomes a ``GenRequest`` whose events (``token``, ``done``, ``error``) arrive on an
asyncio queue; :func:`collect` waits for every choice, :func:`stream_response` forwards them
as SSE chunks in OpenAI's ``chat.completion.chunk`` / ``text_completion`` shapes.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ...generate.sampler import SamplingParams
from ..errors import ApiError, parse_body
from ..middleware import emit_log
from ..models import ServedModel
from ..scheduler import GenRequest, QueueFull
from ..schemas import ChatRequest, CompletionRequest, refuse_unsupported
from ..state import ServerState, note, server_state

router = APIRouter()


def make_request(state: ServerState, sm: ServedModel, prompt: list[int], body, max_tokens: int | None,
                 logprobs: int | None, default_max: int | None) -> GenRequest:
    ctx = sm.context
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if len(prompt) >= ctx:
        raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but the prompt has "
                            f"{len(prompt)} tokens; shorten it", param="messages", code="context_length_exceeded")
    room = ctx - len(prompt)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {len(prompt)} "
                            f"tokens and max_tokens={max_tokens} asks for {len(prompt) + max_tokens}; lower "
                            "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
    mt = max_tokens if max_tokens is not None else min(room, default_max or room)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop", code="invalid_value")
    try:
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    return GenRequest(prompt=prompt, max_tokens=mt, params=params, n=body.n, stop=stop, seed=body.seed,
                      logprobs=logprobs, timeout=state.options.timeout)


def submit(sm: ServedModel, req: GenRequest) -> None:
    try:
        sm.scheduler.submit(req, asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise ApiError(400, str(e), param="n", code="invalid_value") from None


def record_latency(state: ServerState, sm: ServedModel, req: GenRequest, n_tokens: int) -> None:
    now, metrics = time.monotonic(), state.metrics
    metrics.observe("polymodal_request_latency_seconds", now - req.created, model=sm.name)
    if req.first_token_at is not None:
        metrics.observe("polymodal_time_to_first_token_seconds", req.first_token_at - req.created, model=sm.name)
        if n_tokens > 1:
            metrics.observe("polymodal_time_per_output_token_seconds",
                            (now - req.first_token_at) / (n_tokens - 1), model=sm.name)


async def collect(request: Request, req: GenRequest) -> tuple[list[str], list[str], list[list], int]:
    """Waits for every choice of a non-streaming request; cancels it if the client leaves."""
    texts, reasons, infos = [""] * req.n, [""] * req.n, [[] for _ in range(req.n)]
    n_tok, done = 0, 0
    try:
        while done < req.n:
            try:
                ev = await asyncio.wait_for(req.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    raise ApiError(499, "client disconnected")
                continue
            if ev[0] == "token":
                texts[ev[1]] += ev[2]
                if ev[3] is not None:
                    infos[ev[1]].append((ev[3], ev[2]))
            elif ev[0] == "done":
                reasons[ev[1]] = ev[2]
                n_tok += ev[3]
                done += 1
            else:
                raise ApiError(ev[1], ev[2], code="timeout" if ev[1] == 408 else None)
    finally:
        if done < req.n:
            req.cancel()
    return texts, reasons, infos, n_tok


def token_str(sm: ServedModel, tid: int) -> str:
    return sm.tokenizer.decode([tid], skip_special_tokens=False)


def chat_logprobs(sm: ServedModel, items: list) -> dict:
    content = []
    for info, _ in items:
        t = token_str(sm, info["token_id"])
        content.append({"token": t, "logprob": info["logprob"], "bytes": list(t.encode()),
                        "top_logprobs": [{"token": token_str(sm, i), "logprob": lp,
                                          "bytes": list(token_str(sm, i).encode())} for i, lp in info["top"]]})
    return {"content": content}


def completion_logprobs(sm: ServedModel, items: list) -> dict:
    toks, lps, tops, offs, off = [], [], [], [], 0
    for info, piece in items:
        toks.append(token_str(sm, info["token_id"]))
        lps.append(info["logprob"])
        tops.append({token_str(sm, i): lp for i, lp in info["top"]})
        offs.append(off)
        off += len(piece)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_chunks(sm: ServedModel, evs: list, chat: bool, chunk) -> tuple[list[str], int, int, ApiError | None]:
    """SSE chunks for a batch of scheduler events: (chunks, choices finished, tokens, error)."""
    out, done, n_tok = [], 0, 0
    for ev in evs:
        if ev[0] == "token":
            lp = None if ev[3] is None else (chat_logprobs if chat else completion_logprobs)(sm, [(ev[3], ev[2])])
            if not ev[2] and lp is None:
                continue
            c = {"index": ev[1], "logprobs": lp, "finish_reason": None}
            c.update({"delta": {"content": ev[2]}} if chat else {"text": ev[2]})
            out.append(chunk([c]))
        elif ev[0] == "done":
            done, n_tok = done + 1, n_tok + ev[3]
            c = {"index": ev[1], "logprobs": None, "finish_reason": ev[2]}
            c.update({"delta": {}} if chat else {"text": ""})
            out.append(chunk([c]))
        else:
            return out, done, n_tok, ApiError(ev[1], ev[2], code="timeout" if ev[1] == 408 else None)
    return out, done, n_tok, None


def stream_response(request: Request, sm: ServedModel, req: GenRequest, chat: bool,
                    include_usage: bool) -> StreamingResponse:
    state, record = server_state(request), request.state.log
    record["deferred"] = True  # logged when the stream ends, with its token count
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        d = {"id": rid, "object": obj, "created": created, "model": sm.name, "choices": choices}
        return sse(d if usage is None else {**d, "usage": usage})

    texts = [""] * req.n  # the reply, kept only for --log-content

    async def events():
        done, n_tok = 0, 0
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(req.n)])
            while done < req.n:
                # Every event already queued goes out in one write (e.g. the last token and
                # the finish of a step arrive together).
                evs = [await req.events.get()]
                while not req.events.empty():
                    evs.append(req.events.get_nowait())
                out, d, t, err = _event_chunks(sm, evs, chat, chunk)
                if state.options.log_content:
                    for ev in evs:
                        texts[ev[1]] += ev[2] if ev[0] == "token" else ""
                done, n_tok = done + d, n_tok + t
                if err is not None:
                    record["status"] = err.status
                    yield "".join(out) + sse(err.body())
                    return
                if out:
                    yield "".join(out)
            record_latency(state, sm, req, n_tok)
            if include_usage:
                p = len(req.prompt)
                yield chunk([], {"prompt_tokens": p, "completion_tokens": n_tok, "total_tokens": p + n_tok})
            log_stream(n_tok)  # before the last write: the client may hang up as soon as it has [DONE]
            yield "data: [DONE]\n\n"
        finally:  # client gone (the generator is closed/cancelled) or finished: free the rows
            if done < req.n:
                req.cancel()
                record["cancelled"] = True
            log_stream(n_tok)

    def log_stream(n_tok: int) -> None:
        record.update(completion_tokens=n_tok, **({"reply": texts} if state.options.log_content else {}))
        emit_log(state, record)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chat_prompt(state: ServerState, sm: ServedModel, body: ChatRequest) -> tuple[list[int], list]:
    """The chat template applied to the messages -> (prompt ids, decoded images in order)."""
    messages, images = [], []
    for i, m in enumerate(body.messages):
        if not isinstance(m.content, list):
            messages.append({"role": m.role, "content": m.content or ""})
            continue
        parts = []
        for j, part in enumerate(m.content):
            if part.type != "image_url":
                parts.append(part.text or "")
                continue
            if not sm.vision:
                raise ApiError(400, f"the model {sm.name!r} is text-only and does not accept images; "
                                    "serve a vision-language model for image inputs",
                               param=f"messages.{i}.content.{j}", code="images_not_supported")
            images.append(state.decode_image(part.image_url.url if part.image_url else "", f"messages.{i}.content.{j}"))
            parts.append(sm.model.config.image_token)  # expanded to placeholder ids by VLM.prompt_ids
        messages.append({"role": m.role, "content": "".join(parts)})
    try:
        text = sm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, f"the model {sm.name!r} cannot chat: {e}", param="messages", code="no_chat_template")
    if not sm.vision:
        return sm.tokenizer.encode(text, add_special_tokens=False), images
    if text.count(sm.model.config.image_token) != len(images):
        raise ApiError(400, f"the text must not contain the image placeholder {sm.model.config.image_token!r} "
                            "itself", param="messages", code="invalid_value")
    return sm.model.prompt_ids(sm.tokenizer, text), images


def _usage(prompt: list[int], n_tok: int) -> dict:
    return {"prompt_tokens": len(prompt), "completion_tokens": n_tok, "total_tokens": len(prompt) + n_tok}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = server_state(request)
    body = parse_body(ChatRequest, await state.read_json(request))
    refuse_unsupported(body)
    sm = state.get_model(body.model, ("generate",), "chat completions")
    prompt, images = _chat_prompt(state, sm, body)
    note(request, model=sm.name, prompt_tokens=len(prompt))
    lp = (body.top_logprobs or 0) if body.logprobs else None
    req = make_request(state, sm, prompt, body, body.max_completion_tokens or body.max_tokens, lp, None)
    if images:
        req.pixel_values = await asyncio.to_thread(sm.pixel_values, images)
    submit(sm, req)
    if body.stream:
        return stream_response(request, sm, req, True, bool(body.stream_options and body.stream_options.include_usage))
    texts, reasons, infos, n_tok = await collect(request, req)
    record_latency(state, sm, req, n_tok)
    note(request, completion_tokens=n_tok, **({"reply": texts} if state.options.log_content else {}))
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
        "model": sm.name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                     "logprobs": chat_logprobs(sm, infos[i]) if body.logprobs else None,
                     "finish_reason": reasons[i]} for i in range(req.n)],
        "usage": _usage(prompt, n_tok),
    }


def _completion_prompt(sm: ServedModel, p) -> list[int]:
    if isinstance(p, str):
        prompt = sm.tokenizer.encode(p, add_special_tokens=True)
        return prompt or ([sm.tokenizer.bos_id] if sm.tokenizer.bos_id is not None else [])
    vocab = getattr(sm.model.config, "decoder", sm.model.config).vocab_size
    if any(t < 0 or t >= vocab for t in p):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    return list(p)


@router.post("/v1/completions")
async def completions(request: Request):
    state = server_state(request)
    body = parse_body(CompletionRequest, await state.read_json(request))
    refuse_unsupported(body)
    sm = state.get_model(body.model, ("generate",), "completions")
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise ApiError(400, "one prompt per request is supported; send several requests (they are "
                                "batched by the server)", param="prompt", code="invalid_value")
        p = p[0]
    prompt = _completion_prompt(sm, p)
    note(request, model=sm.name, prompt_tokens=len(prompt))
    req = make_request(state, sm, prompt, body, body.max_tokens, body.logprobs, 16)  # OpenAI's default: 16
    submit(sm, req)
    if body.stream:
        return stream_response(request, sm, req, False, bool(body.stream_options and body.stream_options.include_usage))
    texts, reasons, infos, n_tok = await collect(request, req)
    record_latency(state, sm, req, n_tok)
    note(request, completion_tokens=n_tok, **({"reply": texts} if state.options.log_content else {}))
    prefix = p if body.echo and isinstance(p, str) else ""
    return {
        "id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
        "model": sm.name,
        "choices": [{"index": i, "text": prefix + texts[i],
                     "logprobs": completion_logprobs(sm, infos[i]) if body.logprobs is not None else None,
                     "finish_reason": reasons[i]} for i in range(req.n)],
        "usage": _usage(prompt, n_tok),
    }
