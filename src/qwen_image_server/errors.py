"""Typed errors. Each knows its HTTP status and OpenAI error ``type``/``code``.

They are turned into responses in one place (``api/errors.py``); no route
catches them itself.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error a client may see. ``message`` is safe to show."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(ServerError):
    """The request is malformed or asks for something that cannot be honoured (400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class TooManyImages(InvalidRequest):
    """More images than one edit takes (400), as JSON or as multipart files."""

    code = "too_many_files"


class InvalidImage(InvalidRequest):
    """An uploaded image or mask cannot be decoded or does not fit (400)."""

    code = "invalid_image"


def echoed(name: str, limit: int = 200) -> str:
    """A name the client sent, as an error message repeats it: cut at ``limit`` characters (a megabyte of ``model``
    came back twice, in ``message`` and ``detail``)."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


class ModelNotAvailable(InvalidRequest):
    """The request names a model this server does not serve (400, as seed 002 has it)."""

    code = "model_not_found"

    def __init__(self, model: str, *, param: str | None = "model"):
        super().__init__(f"Model not available: {echoed(model)}", param=param)


class NotFound(ServerError):
    """No such route, model or stored image (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """``GET /v1/models/{id}`` of an id that is not served (404), with OpenAI's code for it."""

    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"Model not found: {echoed(model)}", param="model")


class QueueFull(ServerError):
    """The model's task queue is full (503 with Retry-After)."""

    status_code = 503
    error_type = "server_error"
    code = "queue_full"

    def __init__(self, retry_after: int = 1):
        super().__init__("Task queue is full", headers={"Retry-After": str(retry_after)})


class NotReady(ServerError):
    """The model cannot take work: its workers failed to load (503)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class ShuttingDown(ServerError):
    """The server stopped before the request's work was done (503; retry on another replica or after a restart)."""

    status_code = 503
    error_type = "server_error"
    code = "shutting_down"
    text = "The server is shutting down; retry shortly"
    retry_after = 5

    def __init__(self) -> None:
        super().__init__(self.text, headers={"Retry-After": str(self.retry_after)})


class TaskTimeout(ServerError):
    """The task did not finish within the task timeout (504). The same job would run out of its time again: the
    answer tells clients not to retry it (``X-Should-Retry``, which OpenAI's SDKs obey; they retry a 5xx twice by
    default, each run holding a worker for the whole timeout)."""

    status_code = 504
    error_type = "server_error"
    code = "timeout"

    def __init__(self) -> None:
        super().__init__("Task timeout", headers={"X-Should-Retry": "false"})


class InferenceFailed(ServerError):
    """The pipeline call failed or its worker died (500). The reason is short, with no traceback. A call that raised
    would raise again for the same request: the answer tells clients not to retry it (``X-Should-Retry``; OpenAI's
    SDKs retry a 5xx twice by default, each run a full pipeline call). A worker or replica that died is replaced,
    and the request may then run: ``retryable``."""

    status_code = 500
    error_type = "server_error"
    code = "inference_failed"

    def __init__(self, reason: str, *, retryable: bool = False):
        # ``short_reason`` keeps an exception's own text to 300 characters; its advice (out of memory) comes on top
        reason = " ".join(str(reason).split())[:600] or "unknown error"
        super().__init__(f"Inference failed: {reason}", headers=None if retryable else {"X-Should-Retry": "false"})


class RequestDoesNotFit(InvalidRequest):
    """A request's own choice (``param``: its ``cache`` policy) needed more memory than its worker had, where the
    model's own settings are planned to fit (400): the message says what to ask for instead."""

    code = "does_not_fit"

    def __init__(self, reason: str, param: str):
        super().__init__(f"This request's {param} does not fit in its worker's memory: {reason}", param=param)


def task_failure(reason: str, param: str | None = None) -> ServerError:
    """A failed task as the client's error: ``RequestDoesNotFit`` when the request's own ``param`` made it fail
    (``failure_param``), else ``InferenceFailed``."""
    return RequestDoesNotFit(reason, param) if param else InferenceFailed(reason)


def failure_param(exc: BaseException) -> str | None:
    """The request field whose value made ``exc`` happen (a pipeline's out-of-memory error marks it as
    ``qis_param``: the request's own step cache), or None when the server's side failed."""
    return getattr(exc, "qis_param", None) if is_out_of_memory(exc) else None


class StorageFailed(ServerError):
    """A ``response_format=url`` image could not be stored: a full disk, a folder that cannot be written, a bucket
    that refused it (500); or, ``reading``, a stored image could not be read back for ``/images/{name}``. The reason
    is the system's short one (no path, no bucket name)."""

    status_code = 500
    error_type = "server_error"
    code = "storage_failed"

    def __init__(self, reason: str, reading: bool = False):
        if reading:
            super().__init__(f"Could not read the stored image ({reason})")
        else:  # not to be retried (``X-Should-Retry``): a retry would run the whole pipeline again, into the same disk
            super().__init__(
                f"Could not store the image for response_format=url ({reason}); response_format=b64_json returns it "
                "without storing it",
                headers={"X-Should-Retry": "false"},
            )


class TaskCancelled(Exception):
    """Work stopped because its client went away or its time ran out (internal, never sent)."""


#: What a client is told when a pipeline ran out of memory: torch's own message names processes, their memory and
#: the allocator's settings (all in the server log, none of the client's business).
OUT_OF_MEMORY = "out of memory on the device"
#: The same for the machine's own memory (Python's ``MemoryError``, torch's CPU allocator): on a GPU worker, e.g. while
#: it encodes an image, "the device" would point at the GPU.
OUT_OF_HOST_MEMORY = "out of host memory"
#: Added for a request that ran out of memory.
OUT_OF_MEMORY_ADVICE = (
    " (this request needed more than was free: a smaller size or fewer images per request needs less; "
    "another request running beside it may have held the rest)"
)


def compiler_cause(exc: BaseException) -> BaseException:
    """What a compiler raised while ``torch.compile`` compiled a graph (dynamo's ``BackendCompilerFailed``, whose own
    first line is only "backend='inductor' raised:"), or ``exc`` itself."""
    while type(exc).__name__ == "BackendCompilerFailed" and isinstance(getattr(exc, "inner_exception", None), BaseException):
        exc = exc.inner_exception  # type: ignore[attr-defined]
    return exc


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA and other accelerators), Python's ``MemoryError``, or a ``RuntimeError`` that
    says so (torch's CPU allocator, the MPS backend); also raised by a compiler while a graph compiled."""
    exc = compiler_cause(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    first = str(exc).strip().splitlines()[0].lower() if str(exc).strip() else ""
    return isinstance(exc, RuntimeError) and ("out of memory" in first or "can't allocate memory" in first)


def short_reason(exc: BaseException, *, request: bool = False) -> str:
    """One line for a client: the exception's type and first line, no traceback. Running out of memory is named
    without torch's details, with advice when it was a ``request``'s run (not a model's load), and what the pipeline
    added about that run (an exception's ``qis_advice``: the step cache's state). Of an error raised by a compiler
    while a graph compiled, what the compiler raised."""
    cause = compiler_cause(exc)
    if is_out_of_memory(cause):
        host = isinstance(cause, MemoryError) or "cpuallocator" in str(cause).lower()
        advice = OUT_OF_MEMORY_ADVICE + getattr(exc, "qis_advice", "") if request else ""
        return (OUT_OF_HOST_MEMORY if host else OUT_OF_MEMORY) + advice
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}"[:300] if text else type(cause).__name__
