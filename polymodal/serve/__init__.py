"""Serving: an OpenAI-compatible HTTP API with continuous batching, and a web playground.

* ``cache.SlotKVCache``: a KV cache whose rows join and leave between decode steps;
* ``scheduler.Scheduler``: the thread that owns a generative model and batches requests
  (Orca-style iteration-level scheduling, Yu et al., 2022);
* ``app.create_app``: the FastAPI app, assembled from ``routes/`` (``generation``: chat and
  completions; ``embeddings``; ``info``: models, health, metrics; ``playground``) and
  ``middleware`` (Host/Origin checks, CORS, API key, request log);
* ``models.ServedModel``: a loaded model and the kind of requests it answers;
* ``server.ServerThread`` runs a server in a background thread (tests, notebooks); the
  ``polymodal serve`` command is ``polymodal.commands.serve``.

FastAPI and uvicorn are imported lazily by ``create_app`` / ``ServerThread`` users only.
"""
from .cache import SlotKVCache

__all__ = ["SlotKVCache", "create_app", "ServerThread", "ServedModel"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "ServerThread":
        from .server import ServerThread
        return ServerThread
    if name == "ServedModel":
        from .models import ServedModel
        return ServedModel
    raise AttributeError(name)
