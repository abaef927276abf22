"""The web playground: ``/`` and ``/static/*`` (plain HTML/JS/CSS shipped in
``polymodal/serve/static``, no CDN), ``/playground/config``, ``/playground/search`` (the images
of ``--image-dir`` ranked by CLIP cosine similarity to a text) and ``/playground/images/*``.

The folder is embedded once per CLIP model, 32 images at a time; a file that does not decode is
skipped with a warning and counted (``skipped`` in the answer) instead of failing the search.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ...data.images import ImageLoadError, load_image
from ..errors import ApiError, parse_body
from ..models import ServedModel
from ..schemas import SearchRequest
from ..state import note, server_state

STATIC = Path(__file__).resolve().parents[1] / "static"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
MAX_IMAGES = 2000
log = logging.getLogger("polymodal.serve")
router = APIRouter()


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


@router.get("/static/{name}")
async def static(name: str):
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, f"no static file {name!r}", code="not_found")
    return FileResponse(path)


@router.get("/playground/config")
async def playground_config(request: Request):
    state = server_state(request)
    return {"models": [sm.info() for sm in state.models.values()], "image_dir": bool(state.options.image_dir)}


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:MAX_IMAGES]


def build_index(sm: ServedModel, root: Path) -> tuple[list[Path], torch.Tensor, list[str]]:
    """(files that decoded, their (N, D) embeddings, the skipped files with the reason)."""
    files, embs, skipped = [], [], []
    candidates = image_files(root)
    for s in range(0, len(candidates), 32):
        batch = []
        for path in candidates[s:s + 32]:
            try:
                batch.append((path, load_image(path)))
            except ImageLoadError as e:
                log.warning("polymodal serve: skipping an image of --image-dir: %s", e)
                # name it relative to the folder: the page need not learn the server's paths
                skipped.append(f"{path.relative_to(root).as_posix()}: {str(e).split(': ', 1)[-1]}")
        if batch:
            files += [p for p, _ in batch]
            embs.append(sm.embed_images([im for _, im in batch]))
    return files, (torch.cat(embs) if embs else torch.zeros(0, 1)), skipped


@router.post("/playground/search")
async def search(request: Request):
    state = server_state(request)
    body = parse_body(SearchRequest, await state.read_json(request))
    clips = [sm for sm in state.models.values() if sm.kind == "clip"]
    if not clips:
        raise ApiError(400, "no CLIP model is served: image-text search needs one", code="no_clip_model")
    sm = state.get_model(body.model, ("clip",), "image search") if body.model else clips[0]
    if not state.options.image_dir:
        raise ApiError(400, "the server was started without --image-dir", code="no_image_dir")
    root = Path(state.options.image_dir)
    if sm.name not in state.search_index:  # embed the folder once per model
        state.search_index[sm.name] = await asyncio.to_thread(build_index, sm, root)
    files, embs, skipped = state.search_index[sm.name]
    z, _ = await asyncio.to_thread(sm.embed_texts, [body.query])
    scores = (embs @ z[0]).tolist() if files else []
    order = sorted(range(len(files)), key=lambda i: -scores[i])[:body.top_k]
    note(request, model=sm.name, images=len(files))
    return {"results": [{"file": files[i].relative_to(root).as_posix(), "score": scores[i]} for i in order],
            "images": len(files), "skipped": len(skipped), "skipped_files": skipped[:20]}


@router.get("/playground/images/{name:path}")
async def image_file(name: str, request: Request):
    image_dir = server_state(request).options.image_dir
    if not image_dir:
        raise ApiError(404, "no image folder is served", code="not_found")
    root = Path(image_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise ApiError(404, f"no image {name!r}", code="not_found")
    return FileResponse(path)
