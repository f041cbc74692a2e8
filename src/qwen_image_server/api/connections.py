"""Connection guards for the embedded uvicorn server: read timeouts, a connection cap and clean shutdown.

uvicorn closes idle keep-alive connections but has no limit on how long a client may
take to send a request head or body, so sockets that dribble (or never finish) a
request are held forever and enough of them take the server off the air. uvicorn's
``limit_concurrency`` answers plain text, and requests still running when the graceful
shutdown window ends get a plain-text 500 and a ``CancelledError`` traceback in the log.

``GuardedH11Protocol`` (a subclass of uvicorn's h11 protocol, passed as ``http=``) adds:

* a header timeout: a request head must be complete within N seconds of the connection
  opening or of the previous response ending (408 with the JSON envelope, then close);
* a body timeout: the request body must be complete within N seconds of its head;
  both 408s carry a request id like every error: the request's (``RequestIds`` named it
  once its head was in), else the ``X-Request-ID`` of the partial head, else a new one;
* a send timeout: a client that takes (next to) nothing of its answer for N seconds while
  the server's writes wait for it (its socket full) is cut off. uvicorn would wait forever,
  holding the answer (megabytes per image) and the connection;
* the connection cap (``limit_concurrency``) answered with the JSON envelope (503, Retry-After);
* requests cut off by shutdown answered with a JSON 503 ``shutting_down`` (Retry-After), or,
  when their answer had started, ended cleanly (an SSE ``error`` event for event streams);
* a request head over ``max_head_bytes`` refused with a JSON 431, whether it came in pieces
  (h11 refuses a head it still waits for past ``h11_max_incomplete_event_size``) or in one
  read (which h11 takes whole, whatever its size); a request h11 cannot parse answered with
  a JSON 400 instead of uvicorn's plain text.
Every one of these answers carries a request id: the request's, else the client's
``X-Request-ID`` (of the partial head, when that is all there is), else a new one. The answers themselves
are built in ``connection_answers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ShuttingDown
from ..protocol.responses import error_envelope
from .connection_answers import (
    head_bytes,
    head_too_large,
    head_too_large_body,
    partial_head_request_id,
    raw_response,
    refusal,
    send_json,
    timeout_response,
)
from .security import client_request_id, request_id_var, scope_request_id

if sys.platform == "linux":
    import fcntl
    import termios

    _SEND_QUEUE: int | None = termios.TIOCOUTQ  # SIOCOUTQ: bytes in a TCP socket's send queue
else:
    _SEND_QUEUE = None

#: Bytes of its answer a client must take within each ``send_timeout`` while the server waits to write.
MIN_SEND_PROGRESS = 64 * 1024

#: Seconds a client is told to wait (Retry-After) after a refusal at the connection level.
CAP_RETRY_AFTER = 1
SHUTDOWN_RETRY_AFTER = ShuttingDown.retry_after


def _cut_off(cycle) -> None:
    """End a request cycle whose connection is being closed under it: its application sees a client gone and sends
    nothing more."""
    cycle.response_started = cycle.response_complete = cycle.disconnected = True
    cycle.message_event.set()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header/body read timeouts, a JSON connection cap and a JSON shutdown answer."""

    header_timeout: float | None = None
    body_timeout: float | None = None
    send_timeout: float | None = None
    max_head_bytes: int | None = None
    #: Told of each answer sent here, before the application (``Metrics.count_refusal``): ``(status, code)``.
    on_refused: Callable[[int, str], None] = staticmethod(lambda status, code: None)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn would answer the cap in plain text; it is answered in _serve instead.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        inner = self.app
        self.app = lambda scope, receive, send: self._serve(inner, scope, receive, send)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes the client had yet to take at the send clock's last look
        self._shutting_down = False
        # h11's last refusal (uvicorn answers every one with the same text): its status hint tells a head too large
        self._protocol_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event

        def noting_next_event():
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error = exc
                raise

        self.conn.next_event = noting_next_event  # type: ignore[method-assign]

    # --- read timeouts ------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request head has its own time
            self._track_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(head=True, body=True, send=True)
        super().connection_lost(exc)

    # --- send timeout -------------------------------------------------------------
    def pause_writing(self) -> None:
        """The transport holds more than it may: the client reads slower than the answer comes, or not at all."""
        super().pause_writing()
        if self._send_timer is None and self.send_timeout is not None:
            self._arm_send_timer()

    def resume_writing(self) -> None:
        self._cancel(send=True)
        super().resume_writing()

    def _unsent_bytes(self) -> int:
        """What the client has yet to take: the transport's buffer, and on Linux the socket's send queue too (the
        transport's buffer alone moves only in steps of half the kernel's, megabytes, however steadily one reads)."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _SEND_QUEUE is not None and sock is not None:
            with contextlib.suppress(OSError):
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SEND_QUEUE, b"\0" * 4))[0]
        return unsent

    def _arm_send_timer(self) -> None:
        self._unsent = self._unsent_bytes()
        self._send_timer = self.loop.call_later(self.send_timeout, self._send_check)  # type: ignore[arg-type]

    def _send_check(self) -> None:
        """``send_timeout`` after the last look while writing waits: a client that took ``MIN_SEND_PROGRESS`` since
        has its clock started again; one that took less is cut off (a client that reads nothing still lets a few
        kilobytes trickle into its socket's buffer now and then)."""
        self._send_timer = None
        if not self.flow.write_paused or (self.transport.is_closing() and not self.transport.get_write_buffer_size()):
            return  # (a transport closed after its answer still sends it: a JSON answer is one write, megabytes)
        if self._unsent - self._unsent_bytes() >= min(MIN_SEND_PROGRESS, self._unsent // 2):
            self._arm_send_timer()
            return
        cycle = self.cycle
        request_id = cycle.scope.get("state", {}).get("request_id") if cycle is not None else None
        self.logger.info(
            "closing a connection whose client took under %d KiB of its answer in %ss (request %s)",
            MIN_SEND_PROGRESS // 1024, self.send_timeout, request_id,
        )  # fmt: skip
        self.transport.abort()  # close() would first wait to send what the client does not read

    def _arm_head_timer(self) -> None:
        self._cancel(head=True)
        if self.header_timeout is not None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel(self, head: bool = False, body: bool = False, send: bool = False) -> None:
        if head and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if send and self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _track_request(self) -> None:
        """Stop the head clock once a head is in; run the body clock while its body arrives."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return
        self._cancel(head=True)
        if state is h11.SEND_BODY:
            if self._body_timer is None and self.body_timeout is not None:
                self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
        else:
            self._cancel(body=True)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head came: tell the client why it is closed
            request_id = partial_head_request_id(bytes(self.conn.trailing_data[0]))
            self.logger.debug(
                "closing a connection whose request head took over %ss (request %s)", self.header_timeout, request_id
            )
            message = f"Request head not received within {self.header_timeout:g} s"
            self.transport.write(timeout_response(message, request_id))
            self.on_refused(408, "request_timeout")
        self.transport.close()

    # --- requests h11 refuses -----------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """What h11 cannot take (uvicorn answers it in plain text): a head that grew past ``max_head_bytes`` while it
        arrived (431), or a request that is not HTTP/1.1, in its head or its body's framing (400); in the JSON
        envelope, and the connection closed.

        h11 says which by its error's status hint (a long buffer alone could be a body that came with a broken head:
        h11 takes a whole head out of its buffer before it parses it). A request under way gives its own id; one
        whose answer has started cannot be answered again: only closed."""
        cycle = self.cycle
        under_way = cycle is not None and not cycle.response_complete
        if cycle is not None and under_way and cycle.response_started:
            self.transport.close()
            return
        if cycle is not None and under_way:  # its head was read (the application may not have run yet)
            request_id = scope_request_id(cycle.scope)
        else:
            request_id = partial_head_request_id(bytes(self.conn.trailing_data[0]))
        if cycle is not None and under_way:
            _cut_off(cycle)
        limit, hint = self.max_head_bytes, getattr(self._protocol_error, "error_status_hint", 400)
        if limit is not None and hint == 431:  # h11: "Receive buffer too long", an event (a head) still incomplete
            self.transport.write(head_too_large(limit, request_id))
            self.on_refused(431, "request_header_too_large")
        else:
            message = "Invalid HTTP request: its request line, headers or body framing are not HTTP/1.1"
            body = error_envelope(message, type_="invalid_request_error", code="invalid_http_request", request_id=request_id)
            self.transport.write(raw_response(400, "Bad Request", body, request_id=request_id))
            self.on_refused(400, "invalid_http_request")
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        cycle = self.cycle
        # The head is in, so the application has the request and RequestIds has named it in the scope's state.
        named = cycle.scope.get("state", {}).get("request_id") if cycle is not None else None
        request_id = named or client_request_id(None)
        self.logger.info("closing a connection whose request body took over %ss (request %s)", self.body_timeout, request_id)
        if cycle is not None and not cycle.response_started:
            message = f"Request body not received within {self.body_timeout:g} s"
            self.transport.write(timeout_response(message, request_id))
            self.on_refused(408, "request_timeout")
        if cycle is not None:
            _cut_off(cycle)
        self.transport.close()

    # --- connection cap and shutdown --------------------------------------------------
    def shutdown(self) -> None:
        self._shutting_down = True
        super().shutdown()

    async def _serve(self, app, scope, receive, send) -> None:
        """Run one request: refused when its head is too large or above the cap, answered in JSON when shutdown
        cancels it."""
        if self.max_head_bytes is not None and head_bytes(scope) > self.max_head_bytes:
            self.logger.info("refusing a request head of over %d bytes", self.max_head_bytes)
            request_id = scope_request_id(scope)
            await send_json(send, 431, head_too_large_body(self.max_head_bytes, request_id), request_id)
            self.on_refused(431, "request_header_too_large")
            return
        cap = self.max_connections
        if cap is not None and (len(self.connections) > cap or len(self.tasks) > cap):
            self.logger.warning("%d connections open (limit %d): refusing a request", len(self.connections), cap)
            request_id = scope_request_id(scope)
            body = refusal(f"Too many connections (limit {cap}); retry shortly", "too_many_connections", request_id)
            await send_json(send, 503, body, request_id, CAP_RETRY_AFTER)
            self.on_refused(503, "too_many_connections")
            return
        started: dict = {}

        async def tracking_send(message) -> None:
            if message["type"] == "http.response.start":
                started["headers"] = message.get("headers", [])
            await send(message)

        try:
            await app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self._shutting_down:
                raise
            await self._answer_cut_off(scope, started, send)

    async def _answer_cut_off(self, scope, started: dict, send) -> None:
        """The end of a request that outlived the shutdown grace period, without a traceback."""
        message, request_id = ShuttingDown.text, scope_request_id(scope)
        token = request_id_var.set(request_id)  # the log lines name the request they are about (the access line too)
        try:
            self.logger.warning("%s %s stopped: the server is shutting down", scope["method"], scope["path"])
            await self._send_cut_off(scope, started, send, message, request_id)
        finally:
            request_id_var.reset(token)

    async def _send_cut_off(self, scope, started: dict, send, message: str, request_id: str) -> None:
        """A JSON 503, or the end of an answer that had started: an ``error`` event for a stream, else a close."""
        if "headers" not in started:
            await send_json(send, 503, refusal(message, "shutting_down", request_id), request_id, SHUTDOWN_RETRY_AFTER)
            return
        content_type = dict(started["headers"]).get(b"content-type", b"")
        if content_type.startswith(b"text/event-stream"):
            error = refusal(message, "shutting_down", request_id)["error"]
            event = {"type": "error", "error": error, "request_id": request_id}
            data = f"event: error\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": False})
        else:
            self.transport.close()  # half an answer: the client sees the connection end early


class GraceEndIsNoError(logging.Filter):
    """uvicorn logs the end of the shutdown grace period as an ERROR ("Cancel N running task(s), timeout graceful
    shutdown exceeded"): it is what ``--shutdown-grace`` documents (the requests still running get a JSON 503), so
    it is logged as a WARNING, not as a failure an alert would fire on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("Cancel %s running task(s)"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def guarded_protocol(
    header_timeout: float | None,
    body_timeout: float | None,
    send_timeout: float | None = None,
    max_head_bytes: int | None = None,
    on_refused: Callable[[int, str], None] | None = None,
) -> type[GuardedH11Protocol]:
    """``GuardedH11Protocol`` with these timeouts and head limit (uvicorn builds one protocol object per connection),
    telling ``on_refused`` of the answers it sends itself."""
    limits: dict[str, object] = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "send_timeout": send_timeout,
        "max_head_bytes": max_head_bytes,
    }
    if on_refused is not None:
        limits["on_refused"] = staticmethod(on_refused)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def uvicorn_options(settings, on_refused: Callable[[int, str], None] | None = None) -> dict:
    """The keyword arguments of ``uvicorn.run`` for the connection settings; ``on_refused`` counts the answers the
    connections send before the application (the app's ``Metrics.count_refusal``)."""
    return {
        "http": guarded_protocol(
            settings.header_timeout, settings.body_timeout, settings.send_timeout, settings.max_header_bytes, on_refused
        ),
        "ws": "none",  # no WebSocket routes; an upgraded connection would outlive these guards
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
    }
