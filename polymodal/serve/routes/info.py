"""``GET /v1/models``, ``GET /v1/models/{name}``, ``GET /health`` and ``GET /metrics``
(Prometheus text format 0.0.4)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..state import server_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [sm.info() for sm in server_state(request).models.values()]}


@router.get("/v1/models/{name:path}")
async def get_model_info(name: str, request: Request):
    return server_state(request).get_model(name, ("generate", "embed", "clip"), "anything").info()


@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "models": [{"id": sm.name, "kind": sm.kind,
                                        "queue": sm.scheduler.queue_depth if sm.scheduler else 0,
                                        "running": len(sm.scheduler.rows) if sm.scheduler else 0}
                                       for sm in server_state(request).models.values()]}


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(server_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
