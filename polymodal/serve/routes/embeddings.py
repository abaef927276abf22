"""``POST /v1/embeddings``: sentence embeddings of a text encoder, or CLIP text and image
embeddings (images as ``data:image/...`` URLs or ``image_url`` parts), L2-normalised; optional
``dimensions`` (truncated then renormalised) and ``encoding_format: base64`` (little-endian f32)."""
from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request

from ..errors import ApiError, parse_body
from ..models import ServedModel
from ..schemas import ContentPart, EmbeddingRequest
from ..state import ServerState, note, server_state

router = APIRouter()


def _split_inputs(state: ServerState, sm: ServedModel, items: list) -> tuple[list, list]:
    """(position, text) and (position, PIL image) pairs of the request's inputs."""
    texts, images = [], []
    for i, x in enumerate(items):
        if isinstance(x, list):
            texts.append((i, sm.tokenizer.decode(x)))
        elif isinstance(x, ContentPart) and x.type == "image_url" or isinstance(x, str) and x.startswith("data:image/"):
            if sm.kind != "clip":
                raise ApiError(400, f"the model {sm.name!r} embeds text only; serve a CLIP model for images",
                               param=f"input.{i}", code="images_not_supported")
            url = x if isinstance(x, str) else (x.image_url.url if x.image_url else "")
            images.append((i, state.decode_image(url, f"input.{i}")))
        elif isinstance(x, ContentPart):
            texts.append((i, x.text or ""))
        else:
            texts.append((i, x))
    return texts, images


def _encode(e, body: EmbeddingRequest):
    if body.dimensions is not None:
        if body.dimensions > e.numel():
            raise ApiError(400, f"dimensions={body.dimensions} exceeds the model's {e.numel()}",
                           param="dimensions", code="invalid_value")
        e = e[:body.dimensions]
        e = e / e.norm().clamp(min=1e-12)
    if body.encoding_format == "base64":
        return base64.b64encode(e.numpy().astype("<f4").tobytes()).decode()
    return e.tolist()


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    state = server_state(request)
    body = parse_body(EmbeddingRequest, await state.read_json(request))
    sm = state.get_model(body.model, ("embed", "clip"), "embeddings")
    items = body.input if isinstance(body.input, list) else [body.input]
    if not items:
        raise ApiError(400, "input is empty", param="input", code="invalid_value")
    if all(isinstance(x, int) for x in items):
        items = [items]
    texts, images = _split_inputs(state, sm, items)
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
    note(request, model=sm.name, prompt_tokens=n_tok, images=len(images))
    data = [{"object": "embedding", "index": i, "embedding": _encode(e, body)} for i, e in enumerate(out)]
    return {"object": "list", "data": data, "model": sm.name, "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}
