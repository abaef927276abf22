"""What every route of one server shares: the served models, the metrics, the limits, and
the helpers that read a request (body size and content type, model lookup, data-URL images)."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from typing import Any, Callable

from fastapi import Request

from .errors import ApiError
from .metrics import Metrics
from .models import ServedModel
from .scheduler import Scheduler

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class ServerOptions:
    api_key: str | None = None
    max_batch_size: int = 32
    max_queue: int = 256
    timeout: float = 600.0
    max_body_bytes: int = 16 << 20
    max_image_bytes: int = 8 << 20
    image_dir: str | None = None
    prefix_cache_tokens: int = 2048
    # Browser requests from another origin are refused unless their Origin is listed ("*" = any).
    cors_origins: tuple[str, ...] = ()
    # Host header names accepted (DNS rebinding); None = any (a server bound to all interfaces).
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    request_log: Callable[[dict], None] | None = None  # one record per request (see middleware)
    log_content: bool = False  # put prompts and replies into the request log records


class ServerState:
    def __init__(self, models: list[ServedModel], options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.models: dict[str, ServedModel] = {}
        self.search_index: dict[str, Any] = {}  # CLIP model name -> (files, embeddings, skipped)
        for sm in models:
            if sm.name in self.models:
                raise ValueError(f"two served models are named {sm.name!r}; use --model NAME=PATH")
            self.models[sm.name] = sm
            if sm.kind == "generate" and sm.scheduler is None:
                sm.scheduler = Scheduler(sm.model, sm.tokenizer, max_batch_size=options.max_batch_size,
                                         max_queue=options.max_queue, context=sm.context, metrics=self.metrics,
                                         name=sm.name, prefix_cache_tokens=options.prefix_cache_tokens)

    def close(self) -> None:
        for sm in self.models.values():
            if sm.scheduler is not None:
                sm.scheduler.close()

    def get_model(self, name: str, kinds: tuple[str, ...], what: str) -> ServedModel:
        sm = self.models.get(name)
        if sm is None:
            raise ApiError(404, f"the model {name!r} does not exist; served models: {sorted(self.models)}",
                           param="model", code="model_not_found")
        if sm.kind not in kinds:
            raise ApiError(400, f"the model {name!r} is a {sm.kind} model and cannot be used for {what}",
                           param="model", code="invalid_model")
        return sm

    async def read_json(self, request: Request) -> Any:
        """The body as JSON: ``Content-Type: application/json`` only (a cross-site form or
        ``text/plain`` post is never parsed), at most ``max_body_bytes``."""
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                f"(got {ctype or 'no content type'!r})", code="unsupported_media_type")
        limit = self.options.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"request body of {int(cl)} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if self.options.log_content and isinstance(data, dict):
            note(request, request={k: data[k] for k in ("messages", "prompt", "input", "query") if k in data})
        return data

    def decode_image(self, url: str, param: str):
        """A ``data:image/...;base64,`` URL -> RGB PIL image (the server never fetches URLs)."""
        from PIL import Image

        if not url.startswith("data:"):
            raise ApiError(400, "only data: URLs are accepted for images (the server does not fetch URLs)",
                           param=param, code="invalid_image_url")
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "image data URLs must be base64 encoded", param=param, code="invalid_image_url")
        limit = self.options.max_image_bytes
        if len(payload) * 3 // 4 > limit:
            raise ApiError(413, f"image exceeds the limit of {limit} bytes", param=param, code="image_too_large")
        try:
            im = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
            if im.width * im.height > 64_000_000:  # decompression bombs: tiny files, huge bitmaps
                raise ApiError(413, f"image of {im.width}x{im.height} pixels is too large", param=param,
                               code="image_too_large")
            return im.convert("RGB")
        except ApiError:
            raise
        except (binascii.Error, ValueError, OSError) as e:
            raise ApiError(400, f"could not decode the image: {e}", param=param, code="invalid_image") from None


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def note(http_request: Request, **fields) -> None:
    """Adds fields (model, token counts, content with --log-content) to this request's log record."""
    rec = getattr(http_request.state, "log", None)
    if rec is not None:
        rec.update(fields)
