"""Thin routers: parse, hand to the service from app state, shape the HTTP response."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.datastructures import URL

from ..config_files import fetchable_host
from ..engine.base import EngineClient
from ..errors import InvalidRequest, ModelNotFound, NotFound, ServerError
from ..images import b64
from ..jobs import JobResult
from ..models.lora import lora_card
from ..protocol.images import EditRequest, GenerationRequest, VariationRequest
from ..protocol.responses import CompletedEvent, ErrorEvent, ErrorObject, PartialImageEvent
from ..serving.service import ImageService, Prepared
from ..storage import MEDIA_TYPES, StoredImage, in_store_thread
from .errors import current_request_id, error_object, log_failure, note_model
from .head import HEAD_AS_GET
from .uploads import TooManyFiles, read_image_request

log = logging.getLogger(__name__)
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
    except asyncio.CancelledError:  # this request itself is cancelled (server shutting down)
        work.cancel()
        raise
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


def _base_url(request: Request, service: ImageService) -> str:
    """Where this server is reached, for ``/images/{name}`` URLs when no URL prefix is configured.

    From the Host header only when it is a plain host[:port]; anything else (none, as
    HTTP/1.0 may send, or a forged header with a path, spaces or odd characters) gives
    the address the connection came in on (the bind address where the server does not
    say: ``0.0.0.0`` and ``::`` are no address a client can fetch from). Set
    ``IMAGE_DOWNLOAD_URL_PREFIX`` in production, so that no header decides.
    """
    host = fetchable_host(request.headers.get("host", ""))
    if host is not None:
        return f"{request.url.scheme}://{host}/"
    settings = service.settings
    address, port = request.scope.get("server") or (settings.host, settings.port)
    if ":" in address:  # IPv6: http://[::1]:8000/ (a link-local address's zone, %eth0, has no place in a URL)
        address = f"[{address.partition('%')[0]}]"
    return f"{request.scope.get('scheme') or 'http'}://{address}:{port}/"


def _sse(event: PartialImageEvent | CompletedEvent | ErrorEvent) -> bytes:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


async def _respond(request: Request, prepare, model: str | None, edit: bool = False, images: int = 1) -> Response:
    """Prepare (validate, decode, rewrite), then run: as one JSON response, or as server-sent events.

    ``request.state.model`` notes the model the request named, else the one that serves such requests by default,
    whatever the outcome (for the metrics: a refusal counted under ``none`` and a success under the model split one
    model's requests in two); ``request.state.outcome`` a stream's end when it is not a success."""
    service = _service(request)
    base_url = _base_url(request, service)
    note_model(request, model, edit, images)
    try:
        prepared = await _unless_disconnected(request, prepare)
        request.state.model = prepared.req.model or prepared.spec.id
        if prepared.req.stream:
            return await _stream(service, prepared, base_url, request)
        body, result = await _unless_disconnected(request, service.run(prepared, base_url))
    except ClientGone:
        return Response(status_code=499)
    # pydantic writes the JSON itself: about 4x faster than JSONResponse's json.dumps on a 1024x1024 image's
    # base64 (1.5 ms against 5.9 ms here), time the client otherwise waits for after the pipeline
    return Response(body.model_dump_json(), media_type="application/json", headers=_timing_headers(result))


async def _stream(service: ImageService, prepared: Prepared, base_url: str, request: Request) -> Response:
    """OpenAI's image streaming: ``<kind>.partial_image`` events while denoising, then one ``<kind>.completed`` per image.

    Errors before the stream starts (a full queue) are ordinary error responses;
    later ones are an in-band ``error`` event that ends the stream. A client that
    goes away cancels the job (Starlette cancels this generator). ``request.state.outcome``
    notes the status of the error that ended a stream, which the metrics count
    instead of its 200 (and 499 for a stream whose client went away).
    """
    state = request.state
    events: asyncio.Queue = asyncio.Queue()
    run = asyncio.ensure_future(service.run(prepared, base_url, on_partial=events.put_nowait))
    run.add_done_callback(lambda _: events.put_nowait(None))
    await asyncio.sleep(0)  # let the engine accept or refuse the job before the status line is sent
    if run.done() and (failure := run.exception()) is not None:
        raise failure
    kind = prepared.event

    async def generate():
        try:
            while (partial := await events.get()) is not None:
                image = partial.image
                yield _sse(
                    PartialImageEvent(
                        type=f"{kind}.partial_image",
                        b64_json=b64(image.data),
                        partial_image_index=partial.partial_index,
                        created_at=int(time.time()),
                        **service.echo(prepared, image).model_dump(exclude={"safety_identifier"}),  # OpenAI's have none
                        image_index=partial.index,
                        seed=image.seed,
                    )
                )
            try:
                body, result = run.result()
            except ServerError as exc:
                state.outcome = exc.status_code
                log_failure(request, exc, " (stream)")  # as the same failure of a request that is not a stream
                yield _sse(ErrorEvent(error=error_object(exc), request_id=current_request_id()))
                return
            except Exception:
                log.exception("streaming job failed")
                state.outcome = 500
                internal = ErrorObject(message="Internal server error", type="server_error", code="internal_error")
                yield _sse(ErrorEvent(error=internal, request_id=current_request_id()))
                return
            for index, (item, image) in enumerate(zip(body.data, result.images, strict=True)):
                single = JobResult([image], result.started, result.finished, result.workers, result.prompt_tokens)
                yield _sse(
                    CompletedEvent(
                        type=f"{kind}.completed",
                        b64_json=b64(image.data),
                        created_at=int(time.time()),
                        **service.echo(prepared, image).model_dump(),
                        usage=service.usage(prepared, single, inputs=index == 0),  # the events' add up to the request's
                        stats=body.stats,  # the whole request's
                        image_index=index,
                        seed=image.seed,
                        revised_prompt=item.revised_prompt,
                    )
                )
        finally:
            if not run.done():
                run.cancel()

    # X-Accel-Buffering: nginx passes the events on as they come instead of buffering them.
    return StreamingResponse(
        generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post("/v1/images/generations")
async def create_image(body: GenerationRequest, request: Request) -> Response:
    """Generate images from a prompt (OpenAI's images.generate); stream=true streams previews."""
    return await _respond(request, _service(request).prepare_generation(body), body.model)


@router.post("/v1/images/edits")
async def edit_image(request: Request) -> Response:
    """Edit one or several images, optionally within a mask (OpenAI's images.edit)."""
    service = _service(request)
    counted = _counted_under(request, edit=True)
    body, files = await read_image_request(request, EditRequest, service.settings.max_input_images, counted)
    prepared = service.prepare_edit(body, files.images, files.mask, files.markup)
    return await _respond(request, prepared, body.model, edit=True, images=len(files.images))


def _counted_under(request: Request, edit: bool) -> Callable[[object], None]:
    """Note the model an upload is counted under before its body is read (the default one: a body refused before it
    names one counts there, not under ``none``); the callback notes the one the body names once it is read."""
    note_model(request, None, edit)
    return lambda named: note_model(request, named, edit)


@router.post("/v1/images/variations")
async def create_variation(request: Request) -> Response:
    """Variations of an image with the text-to-image model's img2img form (OpenAI's images.create_variation)."""
    service = _service(request)
    counted = _counted_under(request, edit=False)
    body, files = await read_image_request(request, VariationRequest, 1, counted, takes_mask=False)
    if files.markup is not None:
        raise InvalidRequest("a variation takes no markup (a markup guides an edit: POST /v1/images/edits)", param="markup")
    if files.mask is not None or len(files.images) > 1:  # two files (or JSON images): told what three are (README)
        raise TooManyFiles(1, param="mask" if files.mask is not None else "image", takes_mask=False)
    return await _respond(request, service.prepare_variation(body, files.images[0] if files.images else None), body.model)


@router.get("/images/{name}")
async def get_image(name: str, request: Request) -> Response:
    """A stored image of a response_format=url response."""
    stored = await in_store_thread(_service(request).store.open, name)
    if stored is None:
        raise NotFound(f"Image not found: {name}")
    return StoredImageResponse(stored, MEDIA_TYPES[name.rsplit(".", 1)[1]], name)


#: Bytes of a stored image read and sent at a time: what one ``GET /images/NAME`` holds, however large the image
#: and however slowly its client reads (the server waits to send more while the client's socket is full).
IMAGE_CHUNK = 256 * 1024


class StoredImageResponse(Response):
    """A stored image sent as it is read, ``IMAGE_CHUNK`` bytes at a time, with its ``Content-Length``; the file is
    closed when the answer ends, however it ends."""

    def __init__(self, stored: StoredImage, media_type: str, name: str = ""):
        super().__init__(media_type=media_type, headers={"content-length": str(stored.size)})
        self.stored, self.name = stored, name

    async def __call__(self, scope, receive, send) -> None:
        stored, sent = self.stored, 0
        gone = asyncio.Event()  # the client left: uvicorn then drops what is sent without a word, so read no more

        async def listen() -> None:
            with contextlib.suppress(Exception):  # a server's own error from receive: taken as the client gone too
                while (await receive())["type"] != "http.disconnect":
                    pass
            gone.set()

        head_only = bool(scope.get("state", {}).get(HEAD_AS_GET))  # HEAD: the head is all that goes out
        listener = asyncio.ensure_future(listen())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if head_only or stored.size == 0:
                await send({"type": "http.response.body", "body": b""})
                return
            while sent < stored.size and not gone.is_set():
                try:
                    chunk = await in_store_thread(stored.file.read, min(IMAGE_CHUNK, stored.size - sent))
                except Exception as exc:  # the bucket stalled, the mount went away: too late for an error answer
                    chunk, why = b"", f"{type(exc).__name__}: {exc}"
                else:
                    why = "the store gave fewer bytes than it announced"
                if not chunk:  # the answer ends short (its Content-Length says so to the client): one line, no
                    log.warning(  # traceback (the image needs no key: anyone could fill the log with those)
                        "stopped sending image %s after %d of %d bytes: %s", self.name, sent, stored.size, why[:300]
                    )
                    return
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": sent < stored.size})
        finally:
            listener.cancel()
            stored.file.close()


def _model_card(spec, engine: EngineClient) -> dict:
    """OpenAI's model object, plus what the model does, how it runs (its run profile) and its memory estimate."""
    memory = engine.memory(spec.id)
    return {
        "id": spec.id,
        "object": "model",
        "created": START_TIME,
        "owned_by": "qwen-image-server",
        "kind": spec.kind,
        "profile": spec.profile.summary(),
        **({"memory": memory} if memory is not None else {}),
    }


def _gpus(engine) -> dict:
    """Per GPU memory and workers, and the host's for CPU workers, from engines that plan their devices (the
    embedded one)."""
    gpus, host = engine.gpus(), engine.host()
    return {**({"gpus": gpus} if gpus is not None else {}), **({"host": host} if host else {})}


def _lora_card(name: str, service: ImageService) -> dict:
    """A LoRA id's model object: OpenAI's fields, its base model (``parent``, as for fine-tunes) and its preset."""
    base, lora = service.loras[name]
    return {"id": name, "object": "model", "created": START_TIME, "owned_by": "qwen-image-server", **lora_card(lora, base)}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The served models and LoRA ids, in OpenAI's list shape (plus the GPUs they are placed on)."""
    service = _service(request)
    cards = [_model_card(spec, service.engine) for spec in service.models.values()]
    cards += [_alias_card(alias, service) for alias in service.aliases]
    cards += [_lora_card(name, service) for name in service.loras]
    return {"object": "list", "data": cards, **_gpus(service.engine)}


def _alias_card(alias: str, service: ImageService) -> dict:
    """Another name of a served model or LoRA id: that one's card under the alias, with ``alias_of`` naming it."""
    name = service.aliases[alias]
    card = _lora_card(name, service) if name in service.loras else _model_card(service.models[name], service.engine)
    return {**card, "id": alias, "alias_of": name}


@router.get("/v1/models/{model_id:path}", response_model=None)
async def get_model(model_id: str, request: Request) -> dict | Response:
    """One served model or LoRA id."""
    service = _service(request)
    if model_id in service.loras:
        return _lora_card(model_id, service)
    if model_id in service.aliases:
        return _alias_card(model_id, service)
    if model_id not in service.models:
        if model_id.endswith("/") or not model_id:  # ``/v1/models/``, ``/v1/models/ID/``: this path matched them
            return _without_trailing_slash(request)
        raise ModelNotFound(model_id)
    return _model_card(service.models[model_id], service.engine)


def _without_trailing_slash(request: Request) -> Response:
    """The redirect (307) Starlette gives every other route's path with a trailing slash: to the path without it."""
    return RedirectResponse(URL(scope={**request.scope, "path": request.scope["path"].rstrip("/")}))


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
    """200 once every worker has loaded its model (a worker that gave up loading while others of its model serve
    does not hold it back), 503 before (with each worker's state)."""
    engine = _service(request).engine
    is_ready = engine.ready()
    state = "shutting_down" if engine.draining else ("failed" if engine.failed() else "loading")
    body: dict = {"status": "ready" if is_ready else state}
    settings = _service(request).settings
    # With API keys, the per-worker detail is for callers with a key (probes still get the status code).
    if request.scope.get("state", {}).get("authenticated", True) or settings.public_ready_detail:
        body.update(models=engine.status(), **_gpus(engine))
    return JSONResponse(body, status_code=200 if is_ready else 503)
