"""What runs around every route: the Host and Origin checks (cross-site request forgery and DNS
rebinding), CORS for the origins given with ``--cors-origin``, the API key, the request counter,
the one-line JSON request log, and the error handlers that keep OpenAI's error shape.

A browser attaches ``Origin`` to every cross-origin request (and to same-origin POSTs), so a
request whose Origin is neither this server nor a listed origin is refused before it reaches a
route: a web page the user visits cannot make their browser generate text on a local server.
Bodies must also be ``application/json`` (``ServerState.read_json``), which a plain HTML form or
a "simple" ``text/plain`` fetch cannot send without a CORS preflight.
"""
from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .state import ServerOptions, ServerState

LOGGED = ("/v1/", "/playground/search")


def host_name(host_header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def check_origin(request: Request, opts: ServerOptions) -> tuple[ApiError | None, str | None]:
    """(refusal or None, the origin to name in Access-Control-Allow-Origin or None)."""
    host = request.headers.get("host", "")
    if host and opts.allowed_hosts is not None and host_name(host) not in opts.allowed_hosts:
        return ApiError(403, f"Host {host!r} is not served here (this server answers to "
                             f"{', '.join(opts.allowed_hosts)}); bind --host 0.0.0.0 to answer any name",
                        code="host_not_allowed"), None
    origin = request.headers.get("origin")
    if origin is None or origin in (f"http://{host}", f"https://{host}"):
        return None, None  # not a browser, or the playground itself (same origin)
    if origin in opts.cors_origins or "*" in opts.cors_origins:
        return None, origin
    return ApiError(403, f"cross-origin request from {origin!r} refused; start the server with "
                         f"--cors-origin {origin} to allow that site", code="cross_origin_refused"), None


def _cors_headers(origin: str | None) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}


def _preflight(request: Request, origin: str) -> Response:
    asked = request.headers.get("access-control-request-headers", "authorization, content-type")
    return Response(status_code=204, headers={**_cors_headers(origin), "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                              "Access-Control-Allow-Headers": asked, "Access-Control-Max-Age": "600"})


def emit_log(state: ServerState, record: dict) -> None:
    """Writes one request's record (once): id, method, path, status, model, tokens, latency."""
    log = state.options.request_log
    if log is None or record.get("_emitted"):
        return
    record["_emitted"] = True
    record["latency_s"] = round(time.monotonic() - record["_t0"], 4)
    log({k: v for k, v in record.items() if not k.startswith("_") and k != "deferred"})


def install_middleware(app: FastAPI, state: ServerState) -> None:
    opts, metrics = state.options, state.metrics

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        record = {"id": "req-" + uuid.uuid4().hex[:16], "method": request.method, "path": path,
                  "_t0": time.monotonic()}
        request.state.log = record
        refusal, cors_origin = check_origin(request, opts)
        if refusal is None and cors_origin and request.method == "OPTIONS" \
                and "access-control-request-method" in request.headers:
            return _preflight(request, cors_origin)
        if refusal is None and opts.api_key and path.startswith(("/v1/", "/playground/")) \
                and request.headers.get("authorization", "") != f"Bearer {opts.api_key}":
            refusal = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
        if refusal is not None:
            resp = refusal.response()
        else:
            try:
                resp = await call_next(request)
            except ApiError as e:  # raised outside a route (should not happen, but keep the shape)
                resp = e.response()
        resp.headers.update({**_cors_headers(cors_origin), "X-Request-Id": record["id"]})
        endpoint = path if path.startswith(("/v1/", "/health", "/metrics", "/playground/")) else "other"
        metrics.inc("polymodal_requests_total", endpoint=endpoint, code=resp.status_code)
        record["status"] = resp.status_code
        if path.startswith(LOGGED) and not record.get("deferred"):
            emit_log(state, record)
        return resp


def install_error_handlers(app: FastAPI) -> None:
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
