"""The OpenAI-compatible HTTP API (FastAPI) and the web playground.

Endpoints follow the OpenAI REST reference (https://platform.openai.com/docs/api-reference):
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or
server-sent events with ``stream: true``), ``POST /v1/embeddings``; plus ``GET /health``,
``GET /metrics`` (Prometheus text) and the playground at ``/`` (static files shipped in
``polymodal/serve/static``; ``/playground/search`` ranks the images of ``image_dir`` by CLIP
similarity to a text).

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / invalid parameter / prompt longer than the context
(``context_length_exceeded``) / image for a text-only model, 401 bad API key,
404 unknown model or route, 408 timeout, 413 body or image too large,
429 queue full, 500 internal. Bodies are parsed by hand (not by FastAPI's
signature binding) so that each of these is detected and reported in that shape.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate.sampler import SamplingParams
from .metrics import Metrics
from .models import ServedModel
from .scheduler import GenRequest, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


# -- errors ------------------------------------------------------------------------------------

class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             501: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- request schemas ----------------------------------------------------------------------------

class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Base):
    url: str
    detail: str | None = None


class ContentPart(_Base):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Base):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class EmbeddingRequest(_Base):
    model: str
    input: Union[str, list[Union[str, ContentPart]], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class SearchRequest(_Base):
    model: str | None = None
    query: str = Field(min_length=1)
    top_k: int = Field(8, ge=1, le=100)


def _parse(schema: type[BaseModel], data: Any):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith("function")) or None
        raise ApiError(400, f"invalid parameter {param}: {err.get('msg')}", param=param,
                       code="invalid_value" if err.get("type") != "missing" else "missing_required_parameter")


# -- the app ------------------------------------------------------------------------------------

def create_app(models: list[ServedModel], *, api_key: str | None = None, max_batch_size: int = 32,
               max_queue: int = 256, timeout: float = 600.0, max_body_bytes: int = 16 << 20,
               max_image_bytes: int = 8 << 20, image_dir: str | None = None,
               prefix_cache_tokens: int = 2048) -> FastAPI:
    """A FastAPI app serving ``models``; generative ones get a ``Scheduler`` each (started here).

    ``prefix_cache_tokens``: prompt tokens whose K/V each scheduler keeps for reuse by later
    prompts with the same beginning (``cache.PrefixCache``; 0 = off)."""
    metrics = Metrics()
    by_name: dict[str, ServedModel] = {}
    for sm in models:
        if sm.name in by_name:
            raise ValueError(f"two served models are named {sm.name!r}; use --model NAME=PATH")
        by_name[sm.name] = sm
        if sm.kind == "generate" and sm.scheduler is None:
            sm.scheduler = Scheduler(sm.model, sm.tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                                     context=sm.context, metrics=metrics, name=sm.name,
                                     prefix_cache_tokens=prefix_cache_tokens)

    app = FastAPI(title="polymodal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.metrics = by_name, metrics
    search_index: dict[str, Any] = {}

    @app.on_event("shutdown")
    async def _shutdown():
        for sm in by_name.values():
            if sm.scheduler is not None:
                sm.scheduler.close()

    # -- cross-cutting: auth, counting, error shapes ------------------------------------------
    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith("/v1/") or api_key and path.startswith("/playground/"):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                resp = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key").response()
                metrics.inc("polymodal_requests_total", endpoint=path, code=401)
                return resp
        try:
            resp = await call_next(request)
        except ApiError as e:  # raised outside a route (should not happen, but keep the shape)
            resp = e.response()
        endpoint = path if path.startswith(("/v1/", "/health", "/metrics", "/playground/")) else "other"
        metrics.inc("polymodal_requests_total", endpoint=endpoint, code=resp.status_code)
        return resp

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in err.get("loc", ())) or None
        return ApiError(400, f"invalid parameter {param}: {err.get('msg')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    async def read_json(request: Request) -> Any:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
            raise ApiError(413, f"request body of {int(cl)} bytes exceeds the limit of {max_body_bytes} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def get_model(name: str, kinds: tuple[str, ...], what: str) -> ServedModel:
        sm = by_name.get(name)
        if sm is None:
            raise ApiError(404, f"the model {name!r} does not exist; served models: {sorted(by_name)}",
                           param="model", code="model_not_found")
        if sm.kind not in kinds:
            raise ApiError(400, f"the model {name!r} is a {sm.kind} model and cannot be used for {what}",
                           param="model", code="invalid_model")
        return sm

    def decode_image(url: str, param: str):
        from PIL import Image

        if not url.startswith("data:"):
            raise ApiError(400, "only data: URLs are accepted for images (the server does not fetch URLs)",
                           param=param, code="invalid_image_url")
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "image data URLs must be base64 encoded", param=param, code="invalid_image_url")
        if len(payload) * 3 // 4 > max_image_bytes:
            raise ApiError(413, f"image exceeds the limit of {max_image_bytes} bytes", param=param,
                           code="image_too_large")
        try:
            raw = base64.b64decode(payload, validate=True)
            im = Image.open(io.BytesIO(raw))
            if im.width * im.height > 64_000_000:  # decompression bombs: tiny files, huge bitmaps
                raise ApiError(413, f"image of {im.width}x{im.height} pixels is too large", param=param,
                               code="image_too_large")
            return im.convert("RGB")
        except ApiError:
            raise
        except (binascii.Error, ValueError, OSError) as e:
            raise ApiError(400, f"could not decode the image: {e}", param=param, code="invalid_image") from None

    # -- generation ---------------------------------------------------------------------------
    def make_request(sm: ServedModel, prompt: list[int], body, max_tokens: int | None, logprobs: int | None,
                     default_max: int | None) -> GenRequest:
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
                          logprobs=logprobs, timeout=timeout)

    def submit(sm: ServedModel, req: GenRequest) -> asyncio.Queue:
        try:
            return sm.scheduler.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n", code="invalid_value") from None

    def record_latency(sm: ServedModel, req: GenRequest, n_tokens: int) -> None:
        now = time.monotonic()
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

    def stream_response(sm: ServedModel, req: GenRequest, chat: bool, include_usage: bool) -> StreamingResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage=None):
            d = {"id": rid, "object": obj, "created": created, "model": sm.name, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return sse(d)

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
                    out = []
                    for ev in evs:
                        if ev[0] == "token":
                            lp = None
                            if ev[3] is not None:
                                lp = (chat_logprobs if chat else completion_logprobs)(sm, [(ev[3], ev[2])])
                            if not ev[2] and lp is None:
                                continue
                            c = {"index": ev[1], "logprobs": lp, "finish_reason": None}
                            c.update({"delta": {"content": ev[2]}} if chat else {"text": ev[2]})
                            out.append(chunk([c]))
                        elif ev[0] == "done":
                            done += 1
                            n_tok += ev[3]
                            c = {"index": ev[1], "logprobs": None, "finish_reason": ev[2]}
                            c.update({"delta": {}} if chat else {"text": ""})
                            out.append(chunk([c]))
                        else:
                            out.append(sse(ApiError(ev[1], ev[2], code="timeout" if ev[1] == 408 else None).body()))
                            yield "".join(out)
                            return
                    if out:
                        yield "".join(out)
                record_latency(sm, req, n_tok)
                if include_usage:
                    p = len(req.prompt)
                    yield chunk([], {"prompt_tokens": p, "completion_tokens": n_tok, "total_tokens": p + n_tok})
                yield "data: [DONE]\n\n"
            finally:  # client gone (the generator is closed/cancelled) or finished: free the rows
                if done < req.n:
                    req.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(ChatRequest, await read_json(request))
        sm = get_model(body.model, ("generate",), "chat completions")
        messages, images = [], []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                parts = []
                for j, part in enumerate(m.content):
                    if part.type == "image_url":
                        if not sm.vision:
                            raise ApiError(400, f"the model {sm.name!r} is text-only and does not accept images; "
                                                "serve a vision-language model for image inputs",
                                           param=f"messages.{i}.content.{j}", code="images_not_supported")
                        images.append(decode_image(part.image_url.url if part.image_url else "",
                                                   f"messages.{i}.content.{j}"))
                        parts.append(sm.model.config.image_token)  # expanded to placeholder ids below
                    else:
                        parts.append(part.text or "")
                messages.append({"role": m.role, "content": "".join(parts)})
            else:
                messages.append({"role": m.role, "content": m.content or ""})
        try:
            text = sm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, f"the model {sm.name!r} cannot chat: {e}", param="messages", code="no_chat_template")
        if sm.vision:
            if text.count(sm.model.config.image_token) != len(images):
                raise ApiError(400, f"the text must not contain the image placeholder "
                                    f"{sm.model.config.image_token!r} itself", param="messages", code="invalid_value")
            prompt = sm.model.prompt_ids(sm.tokenizer, text)
        else:
            prompt = sm.tokenizer.encode(text, add_special_tokens=False)
        lp = (body.top_logprobs or 0) if body.logprobs else None
        req = make_request(sm, prompt, body, body.max_completion_tokens or body.max_tokens, lp, None)
        if images:
            req.pixel_values = await asyncio.to_thread(sm.pixel_values, images)
        submit(sm, req)
        if body.stream:
            return stream_response(sm, req, True, bool(body.stream_options and body.stream_options.include_usage))
        texts, reasons, infos, n_tok = await collect(request, req)
        record_latency(sm, req, n_tok)
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": sm.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                         "logprobs": chat_logprobs(sm, infos[i]) if body.logprobs else None,
                         "finish_reason": reasons[i]} for i in range(req.n)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_tok, "total_tokens": len(prompt) + n_tok},
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionRequest, await read_json(request))
        sm = get_model(body.model, ("generate",), "completions")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request is supported; send several requests (they are "
                                    "batched by the server)", param="prompt", code="invalid_value")
            p = p[0]
        if isinstance(p, str):
            prompt = sm.tokenizer.encode(p, add_special_tokens=True)
            if not prompt and sm.tokenizer.bos_id is not None:
                prompt = [sm.tokenizer.bos_id]
        else:
            prompt = list(p)
            vocab = getattr(sm.model.config, "decoder", sm.model.config).vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})",
                               param="prompt", code="invalid_value")
        req = make_request(sm, prompt, body, body.max_tokens, body.logprobs, 16)  # OpenAI's default: 16
        submit(sm, req)
        if body.stream:
            return stream_response(sm, req, False, bool(body.stream_options and body.stream_options.include_usage))
        texts, reasons, infos, n_tok = await collect(request, req)
        record_latency(sm, req, n_tok)
        prefix = p if body.echo and isinstance(p, str) else ""
        return {
            "id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": sm.name,
            "choices": [{"index": i, "text": prefix + texts[i],
                         "logprobs": completion_logprobs(sm, infos[i]) if body.logprobs is not None else None,
                         "finish_reason": reasons[i]} for i in range(req.n)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_tok, "total_tokens": len(prompt) + n_tok},
        }

    # -- embeddings ---------------------------------------------------------------------------
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = _parse(EmbeddingRequest, await read_json(request))
        sm = get_model(body.model, ("embed", "clip"), "embeddings")
        items = body.input if isinstance(body.input, list) else [body.input]
        if not items:
            raise ApiError(400, "input is empty", param="input", code="invalid_value")
        if all(isinstance(x, int) for x in items):
            items = [items]
        texts, images = [], []  # (position, value)
        for i, x in enumerate(items):
            if isinstance(x, list):
                texts.append((i, sm.tokenizer.decode(x)))
            elif isinstance(x, ContentPart) and x.type == "image_url" or isinstance(x, str) and x.startswith("data:image/"):
                if sm.kind != "clip":
                    raise ApiError(400, f"the model {sm.name!r} embeds text only; serve a CLIP model for images",
                                   param=f"input.{i}", code="images_not_supported")
                url = x if isinstance(x, str) else (x.image_url.url if x.image_url else "")
                images.append((i, decode_image(url, f"input.{i}")))
            elif isinstance(x, ContentPart):
                texts.append((i, x.text or ""))
            else:
                texts.append((i, x))
        out: list = [None] * len(items)
        n_tok = 0
        if texts:
            z, n_tok = await asyncio.to_thread(sm.embed_texts, [t for _, t in texts])
            for (i, _), e in zip(texts, z):
                out[i] = e
        if images:
            z = await asyncio.to_thread(sm.embed_images, [im for _, im in images])
            for (i, _), e in zip(images, z):
                out[i] = e
        data = []
        for i, e in enumerate(out):
            if body.dimensions is not None:
                if body.dimensions > e.numel():
                    raise ApiError(400, f"dimensions={body.dimensions} exceeds the model's {e.numel()}",
                                   param="dimensions", code="invalid_value")
                e = e[:body.dimensions]
                e = e / e.norm().clamp(min=1e-12)
            emb = (base64.b64encode(e.numpy().astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                   else e.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": sm.name,
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    # -- misc ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [sm.info() for sm in by_name.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model_info(name: str):
        return get_model(name, ("generate", "embed", "clip"), "anything").info()

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [{"id": sm.name, "kind": sm.kind,
                                            "queue": sm.scheduler.queue_depth if sm.scheduler else 0,
                                            "running": len(sm.scheduler.rows) if sm.scheduler else 0}
                                           for sm in by_name.values()]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- playground ---------------------------------------------------------------------------
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(path)

    @app.get("/playground/config")
    async def playground_config():
        return {"models": [sm.info() for sm in by_name.values()], "image_dir": bool(image_dir)}

    def _image_files() -> list[Path]:
        root = Path(image_dir)
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:2000]

    @app.post("/playground/search")
    async def search(request: Request):
        body = _parse(SearchRequest, await read_json(request))
        clips = [sm for sm in by_name.values() if sm.kind == "clip"]
        if not clips:
            raise ApiError(400, "no CLIP model is served: image-text search needs one", code="no_clip_model")
        sm = get_model(body.model, ("clip",), "image search") if body.model else clips[0]
        if not image_dir:
            raise ApiError(400, "the server was started without --image-dir", code="no_image_dir")
        if sm.name not in search_index:  # embed the folder once per model
            files = _image_files()

            def build():
                embs = [sm.embed_images(files[s:s + 32]) for s in range(0, len(files), 32)]
                import torch
                return files, (torch.cat(embs) if embs else torch.zeros(0, 1))
            search_index[sm.name] = await asyncio.to_thread(build)
        files, embs = search_index[sm.name]
        z, _ = await asyncio.to_thread(sm.embed_texts, [body.query])
        scores = (embs @ z[0]).tolist() if len(files) else []
        order = sorted(range(len(files)), key=lambda i: -scores[i])[:body.top_k]
        root = Path(image_dir)
        return {"results": [{"file": str(files[i].relative_to(root)), "score": scores[i]} for i in order]}

    @app.get("/playground/images/{name:path}")
    async def image_file(name: str):
        if not image_dir:
            raise ApiError(404, "no image folder is served", code="not_found")
        root = Path(image_dir).resolve()
        path = (root / name).resolve()
        if root not in path.parents or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise ApiError(404, f"no image {name!r}", code="not_found")
        return FileResponse(path)

    return app
