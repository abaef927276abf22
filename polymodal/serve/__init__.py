"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web playground.

* ``cache.SlotKVCache``: a KV cache whose rows join and leave between decode steps;
* ``scheduler.Scheduler``: the thread that owns a generative model and batches requests
  (Orca-style iteration-level scheduling, Yu et al., 2022);
* ``app.create_app``: the FastAPI app (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/v1/embeddings``, ``/health``, ``/metrics``, playground at ``/``);
* ``commands.serve_cmd``: ``polymodal serve``; ``commands.ServerThread`` runs a server
  in a background thread (tests, notebooks).

FastAPI and uvicorn are imported lazily by ``create_app`` / ``serve_cmd`` users only.
"""
from .cache import SlotKVCache

__all__ = ["SlotKVCache", "create_app", "serve_cmd", "ServerThread", "ServedModel"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("serve_cmd", "ServerThread"):
        from . import commands
        return getattr(commands, name)
    if name == "ServedModel":
        from .models import ServedModel
        return ServedModel
    raise AttributeError(name)
