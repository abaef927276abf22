"""``polymodal serve``: models behind an OpenAI-compatible HTTP API, with a web playground at /."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

INSTALL = "pip install 'fastapi>=0.110' 'uvicorn>=0.29'"


def _request_printer(record: dict) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def serve_cmd(model: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, max_batch_size: int = 32, max_queue: int = 256,
              timeout: float = 600.0, max_context: int = 2048, device: str = "cpu", dtype: str | None = None,
              image_dir: str | None = None, max_body_mb: float = 16.0, max_image_mb: float = 8.0,
              quantize: Literal["none", "int8", "int4"] = "none", prefix_cache_tokens: int = 2048,
              served_model_name: list[str] | None = None, chat_template: str | None = None,
              cors_origin: list[str] | None = None, log_requests: bool = True, log_content: bool = False) -> None:
    """Serve models over an OpenAI-compatible HTTP API with a web playground at /.

    Args:
        model: models to serve, each PATH or NAME=PATH (polymodal folder, Hugging Face folder, .gguf, training run folder or an alias from 'polymodal list'); repeat --model or list several after one; none = SmolLM2-135M-Instruct
        host: interface to bind (127.0.0.1 = this machine only; 0.0.0.0 = every interface, any Host name)
        port: TCP port (1-65535)
        api_key: require 'Authorization: Bearer KEY' on /v1 and /playground routes (default: $POLYMODAL_API_KEY, else no key)
        max_batch_size: most sequences decoded together per model
        max_queue: most requests waiting for a batch row; more get HTTP 429
        timeout: seconds a request may take (queue + generation) before HTTP 408
        max_context: longest prompt + completion served, in tokens (also bounds the KV cache memory)
        device: cpu, cuda, ... or auto
        dtype: float32, bfloat16, float16 (default: as stored)
        image_dir: folder of images for the playground's CLIP image search
        max_body_mb: largest request body accepted (HTTP 413 above)
        max_image_mb: largest decoded image accepted (HTTP 413 above)
        quantize: weight-only quantisation of generative models (polymodal.inference.quantize)
        prefix_cache_tokens: prompt tokens kept for reuse by prompts that start the same way, e.g. the chat template's system prompt (0 = off)
        served_model_name: the API name of each --model, in order (instead of NAME= or the folder name)
        chat_template: a Jinja2 chat template file used instead of the generative models' own
        cors_origin: web origins allowed to call the API from a browser (e.g. https://app.example, or '*'); other cross-origin requests get 403
        log_requests: print one JSON line per request (id, model, tokens, latency; never the text)
        log_content: also put prompts and replies into the request log
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"serving needs fastapi and uvicorn ({e.name} is not installed): {INSTALL}") from None
    from ..serve.app import create_app
    from ..serve.models import load_served
    from ..serve.server import bind, serve_forever
    from ..serve.state import LOOPBACK_HOSTS

    template = None
    if chat_template is not None:
        if not Path(chat_template).is_file():
            raise FileNotFoundError(f"--chat-template {chat_template}: no such file")
        template = Path(chat_template).read_text(encoding="utf-8")
    sock = bind(host, port)  # before loading: a busy port fails at once, and nothing is announced
    port = sock.getsockname()[1]  # --port 0: the free port the system chose
    served = load_served(model or [None], served_model_name, template, device=device, dtype=dtype,
                         context=max_context, quantize=quantize)
    for sm in served:
        print(f"polymodal serve: {sm.name} ({sm.kind})", flush=True)
    wildcard = host in ("0.0.0.0", "::", "")
    app = create_app(served, api_key=api_key or os.environ.get("POLYMODAL_API_KEY") or None,
                     max_batch_size=max_batch_size, max_queue=max_queue, timeout=timeout,
                     max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                     image_dir=image_dir, prefix_cache_tokens=prefix_cache_tokens, cors_origins=cors_origin or (),
                     allowed_hosts=None if wildcard else tuple({*LOOPBACK_HOSTS, host.lower()}),
                     request_log=_request_printer if log_requests else None, log_content=log_content)
    shown = "localhost" if wildcard else (f"[{host}]" if ":" in host else host)
    print(f"polymodal serve: http://{shown}:{port}/ (playground), http://{shown}:{port}/v1 (API)", flush=True)
    try:
        serve_forever(app, sock)
    except KeyboardInterrupt:
        print("polymodal serve: stopped", file=sys.stderr)
