"""The OpenAI-compatible HTTP API (FastAPI) and the web playground.

Endpoints follow the OpenAI REST reference (https://platform.openai.com/docs/api-reference):
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or
server-sent events with ``stream: true``), ``POST /v1/embeddings``; plus ``GET /health``,
``GET /metrics`` (Prometheus text) and the playground at ``/``. Each family of endpoints is a
module of ``polymodal/serve/routes``; what runs around them (Host/Origin checks, CORS, API key,
request log) is ``middleware.py``.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / invalid or unsupported parameter / prompt longer than the context
(``context_length_exceeded``) / image for a text-only model, 401 bad API key, 403 a foreign
Origin or Host, 404 unknown model or route, 408 timeout, 413 body or image too large,
415 a body that is not ``application/json``, 429 queue full, 500 internal. Bodies are parsed
by hand (not by FastAPI's signature binding) so that each of these is detected and reported
in that shape.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI

from .errors import ApiError
from .middleware import install_error_handlers, install_middleware
from .models import ServedModel
from .routes import ROUTERS
from .state import LOOPBACK_HOSTS, ServerOptions, ServerState

__all__ = ["create_app", "ApiError", "ServerOptions"]


def create_app(models: list[ServedModel], *, api_key: str | None = None, max_batch_size: int = 32,
               max_queue: int = 256, timeout: float = 600.0, max_body_bytes: int = 16 << 20,
               max_image_bytes: int = 8 << 20, image_dir: str | None = None, prefix_cache_tokens: int = 2048,
               cors_origins: list[str] | tuple[str, ...] = (),
               allowed_hosts: list[str] | tuple[str, ...] | None = LOOPBACK_HOSTS,
               request_log: Callable[[dict], None] | None = None, log_content: bool = False) -> FastAPI:
    """A FastAPI app serving ``models``; generative ones get a ``Scheduler`` each (started here).

    ``prefix_cache_tokens``: prompt tokens whose K/V each scheduler keeps for reuse by later
    prompts with the same beginning (``cache.PrefixCache``; 0 = off). ``cors_origins``: web
    origins (``https://site.example``, or ``*``) whose pages may call the API; any other
    cross-origin browser request is refused. ``allowed_hosts``: Host header names answered
    (None = any). ``request_log``: called with one dict per request (id, model, tokens, latency;
    the prompts and replies only with ``log_content``)."""
    opts = ServerOptions(api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue, timeout=timeout,
                         max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes, image_dir=image_dir,
                         prefix_cache_tokens=prefix_cache_tokens, cors_origins=tuple(cors_origins),
                         allowed_hosts=None if allowed_hosts is None else tuple(h.lower() for h in allowed_hosts),
                         request_log=request_log, log_content=log_content)
    state = ServerState(models, opts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(title="polymodal", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state
    app.state.models, app.state.metrics = state.models, state.metrics
    install_middleware(app, state)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
