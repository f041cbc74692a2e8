"""Thin routers: parse, hand to the service from app state, shape the HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ..engine.types import JobResult
from ..errors import NotFound
from ..protocol.images import GenerationRequest
from ..serving.service import ImageService
from ..storage import MEDIA_TYPES
from .uploads import read_edit_request

router = APIRouter()
START_TIME = int(time.time())


def _service(request: Request) -> ImageService:
    return request.app.state.service


class ClientGone(Exception):
    """The client disconnected while its job was queued or running."""


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro):
    """Await ``coro``; if the client goes away first, cancel it (the engine then stops its work)."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise ClientGone()
    return work.result()


def _timing_headers(result: JobResult) -> dict[str, str]:
    """When and where the images were made: epoch seconds of the first start and last end of the pipeline runs."""
    return {
        "X-Run-Start": f"{result.started:.6f}",
        "X-Run-End": f"{result.finished:.6f}",
        "X-Workers": ",".join(result.workers),
    }


async def _respond(request: Request, coro) -> Response:
    try:
        body, result = await _unless_disconnected(request, coro)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(body, headers=_timing_headers(result))


@router.post("/v1/images/generations")
async def create_image(body: GenerationRequest, request: Request) -> Response:
    """Generate images from a prompt (OpenAI's images.generate)."""
    return await _respond(request, _service(request).generate(body, str(request.base_url)))


@router.post("/v1/images/edits")
async def edit_image(request: Request) -> Response:
    """Edit one or several images, optionally within a mask (OpenAI's images.edit)."""
    service = _service(request)
    body, images, mask = await read_edit_request(request, service.settings.max_input_images)
    return await _respond(request, service.edit(body, images, mask, str(request.base_url)))


@router.get("/images/{name}")
async def get_image(name: str, request: Request) -> Response:
    """A stored image of a response_format=url response."""
    path = _service(request).store.path(name)
    if path is None:
        raise NotFound(f"Image not found: {name}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lstrip(".")])


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": START_TIME, "owned_by": "qwen-image-server"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The served models, in OpenAI's list shape."""
    return {"object": "list", "data": [_model_card(model_id) for model_id in _service(request).models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    """One served model."""
    if model_id not in _service(request).models:
        raise NotFound(f"Model not found: {model_id}")
    return _model_card(model_id)


@router.get("/healthz")
async def healthz(request: Request) -> dict:
    """Seed 002's health check: status and the default model."""
    return {"status": "ok", "model": _service(request).health_model_id()}


@router.get("/health")
async def health() -> dict:
    """Alive: the API process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once every worker has loaded its model, 503 before (with each worker's state)."""
    engine = _service(request).engine
    is_ready = engine.ready()
    body = {"status": "ready" if is_ready else "loading", "models": engine.status()}
    return JSONResponse(body, status_code=200 if is_ready else 503)
