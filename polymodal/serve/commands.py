"""``polymodal serve`` and ``ServerThread`` (a server on a background thread)."""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Literal


def serve_cmd(model: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, max_batch_size: int = 32, max_queue: int = 256,
              timeout: float = 600.0, max_context: int = 2048, device: str = "cpu", dtype: str | None = None,
              image_dir: str | None = None, max_body_mb: float = 16.0, max_image_mb: float = 8.0,
              quantize: Literal["none", "int8", "int4"] = "none", prefix_cache_tokens: int = 2048) -> None:
    """Serve models over an OpenAI-compatible HTTP API with a web playground at /.

    Args:
        model: models to serve, each PATH or NAME=PATH (polymodal folder, Hugging Face folder or .gguf); repeat --model or list several after one; none = SmolLM2-135M-Instruct
        host: interface to bind (127.0.0.1 = this machine only)
        port: TCP port
        api_key: require 'Authorization: Bearer KEY' on /v1 routes (default: $POLYMODAL_API_KEY, else no key)
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
    """
    import uvicorn

    from .app import create_app
    from .models import ServedModel

    api_key = api_key or os.environ.get("POLYMODAL_API_KEY") or None
    specs = model or [None]
    served = [ServedModel.load(s, device=device, dtype=dtype, context=max_context, quantize=quantize)
              for s in specs]
    for sm in served:
        print(f"polymodal serve: {sm.name} ({sm.kind})", flush=True)
    app = create_app(served, api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue, timeout=timeout,
                     max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                     image_dir=image_dir, prefix_cache_tokens=prefix_cache_tokens)
    print(f"polymodal serve: http://{host}:{port}/ (playground), http://{host}:{port}/v1 (API)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


class ServerThread:
    """Runs ``app`` with uvicorn on a free loopback port in a daemon thread.

    ``with ServerThread(app) as srv: ...`` gives ``srv.url`` (``http://127.0.0.1:PORT``);
    the port is bound before the thread starts, so there is no race for it.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > wait:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
