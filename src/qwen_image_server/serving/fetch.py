"""Input images given by URL (OpenAI's JSON edits: ``{"image_url": "https://..."}``), fetched only from the URL
prefixes the operator allows (``QIS_IMAGE_URL_PREFIXES``; none by default, so that no client makes the server fetch
from its own network).

A URL is fetched when its scheme, host and port are a prefix's and its path starts with the prefix's path (a prefix's
host may start with ``*.``: any subdomain); it must be printable ASCII (percent-encoded beyond), carry no user name or
password, and hold no ``.`` or ``..`` segment in any spelling a server may read so (percent-encoded, Tomcat's ``..;``,
full-width dots, a backslash for a slash) nor an encoded ``%`` or NUL. The request goes to exactly the scheme, host,
port and path checked (httpcore, with no URL parsing of its own). Redirects are followed (at most ``MAX_REDIRECTS``)
only to URLs that are allowed as well. One deadline bounds the whole fetch (``QIS_IMAGE_URL_TIMEOUT``: connecting,
the headers, every redirect and every byte), and a request's fetched images together may be as large as a request
body (``QIS_MAX_UPLOAD_BYTES``), counted after a gzip or deflate encoding is undone (one layer; others are refused).
It runs in the request's decoding slot (``DecodeGate``: once the model admits work, ``max_concurrent_decodes``
requests at a time), straight to the origin (no proxy), with certifi's CAs or ``SSL_CERT_FILE``'s.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import urljoin

import httpcore

from ..config_urls import DEFAULT_PORTS, UrlPrefix, path_problem, url_parts
from ..errors import InvalidImage

#: Redirects followed for one image.
MAX_REDIRECTS = 3
#: Content-Encodings undone (one layer), as zlib's window bits.
_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class ImageFetcher:
    """Fetches input images from allowed URLs (blocking: it runs in a request's decoding thread)."""

    def __init__(
        self, prefixes: list[UrlPrefix], timeout: float, max_bytes: int, observe: Callable[[str, int], None] | None = None
    ):
        self.prefixes = prefixes
        self.timeout = timeout
        self.max_bytes = max_bytes
        #: Told of each URL: ``("fetched", bytes)``, ``("failed", 0)``, or (by the caller's check) ``("refused", 0)``.
        self.observe = observe or (lambda outcome, size: None)
        # read once, at start, where an https prefix needs it (a CA file that cannot be read stops the server then)
        self._ssl = _ssl_context() if any(prefix.scheme == "https" for prefix in prefixes) else None

    def check(self, url: str, param: str) -> tuple[str, str, int, str]:
        """``(scheme, host, port, target)`` of a URL that may be fetched; a 400 naming ``param`` for one that may not,
        before the request waits for anything."""
        if not self.prefixes:
            raise InvalidImage(
                f"'{param}' is a URL: this server fetches no image URLs (QIS_IMAGE_URL_PREFIXES allows some); send the "
                "image as a file, base64 or a data URL",
                param=param,
            )
        try:
            scheme, host, port, path, query = url_parts(url)
        except ValueError as exc:
            raise InvalidImage(f"'{param}': the image URL {exc}", param=param) from None
        problem = path_problem(path)
        if problem:
            raise InvalidImage(f"'{param}': an image URL may not hold {problem}", param=param)
        if not any(prefix.allows(scheme, host, port, path) for prefix in self.prefixes):
            raise InvalidImage(
                f"'{param}': {_shown(url)} is not under a URL prefix this server fetches images from (QIS_IMAGE_URL_PREFIXES)",
                param=param,
            )
        return scheme, host, port, path + (f"?{query}" if query else "")

    def fetch_all(self, urls: list[tuple[str, str]], stop: threading.Event | None = None) -> list[bytes]:
        """The bytes of each ``(url, param)``, in order: together at most ``max_bytes``, and all within one
        ``timeout`` (a request's fetches hold its decoding slot that long at most). None is started once ``stop`` is
        set (the request was cancelled: its client left, or the server shuts down)."""
        out: list[bytes] = []
        left = self.max_bytes
        deadline = time.monotonic() + self.timeout
        for url, param in urls:
            if stop is not None and stop.is_set():
                raise InvalidImage(f"'{param}' was not fetched: the request was cancelled", param=param)
            try:
                data = self._fetch(url, param, left, deadline)
            except InvalidImage:
                self.observe("failed", 0)
                raise
            self.observe("fetched", len(data))
            left -= len(data)
            out.append(data)
        return out

    def _fetch(self, url: str, param: str, limit: int, deadline: float) -> bytes:
        """The bytes at ``url`` (redirects to allowed URLs followed), at most ``limit`` of them, by ``deadline``; a 400
        naming ``param`` when they cannot be had."""
        with httpcore.ConnectionPool(ssl_context=self._ssl, network_backend=_Deadline(deadline)) as pool:
            for _ in range(MAX_REDIRECTS + 1):
                scheme, host, port, target = self.check(url, param)
                try:
                    location = _request_once(self, pool, (scheme, host, port, target), url, param, limit)
                except httpcore.TimeoutException:
                    raise InvalidImage(
                        f"'{param}' could not be fetched within {self.timeout:g} s from {_shown(url)}", param=param
                    ) from None
                except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
                    raise InvalidImage(
                        f"'{param}' could not be fetched from {_shown(url)}: {type(exc).__name__}", param=param
                    ) from None
                if isinstance(location, bytes):
                    return location
                url = location
        raise InvalidImage(f"'{param}' could not be fetched: more than {MAX_REDIRECTS} redirects", param=param)

    def too_large(self, param: str, limit: int) -> InvalidImage:
        return InvalidImage(
            f"'{param}' is larger than the {limit} bytes left of this request's {self.max_bytes} (QIS_MAX_UPLOAD_BYTES)",
            param=param,
        )


def _request_once(
    fetcher: ImageFetcher, pool: httpcore.ConnectionPool, where: tuple[str, str, int, str], url: str, param: str, limit: int
) -> bytes | str:
    """One request: the body's bytes, or the URL a redirect points to."""
    scheme, host, port, target = where
    netloc = (f"[{host}]" if ":" in host else host) + ("" if port == DEFAULT_PORTS[scheme] else f":{port}")
    url_sent = httpcore.URL(scheme=scheme, host=host, port=port, target=target)  # exactly what was checked
    headers = [
        (b"Host", netloc.encode("ascii")),
        (b"Accept", b"image/png, image/jpeg, image/webp"),
        (b"Accept-Encoding", b"gzip, deflate"),
        (b"User-Agent", b"qwen-image-server"),
    ]
    timeouts = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), fetcher.timeout)}
    with pool.stream("GET", url_sent, headers=headers, extensions=timeouts) as response:
        answer: dict[str, str] = {}
        for name, value in response.headers:  # a header given on several lines is one list (RFC 9110)
            key = name.decode("latin-1").lower()
            answer[key] = f"{answer[key]}, {value.decode('latin-1')}" if key in answer else value.decode("latin-1")
        if response.status in (301, 302, 303, 307, 308) and "location" in answer:
            try:
                return urljoin(url, answer["location"].strip())
            except ValueError:  # a malformed host ([::1, [127.0.0.1])
                raise InvalidImage(
                    f"'{param}' could not be fetched: {_shown(url)} redirects to a malformed URL", param=param
                ) from None
        if response.status != 200:
            raise InvalidImage(f"'{param}' could not be fetched: {_shown(url)} answered HTTP {response.status}", param=param)
        encodings = [e.strip().lower() for e in answer.get("content-encoding", "").split(",")]
        encodings = [e for e in encodings if e not in ("", "identity")]
        if len(encodings) > 1 or (encodings and encodings[0] not in _ENCODINGS):
            raise InvalidImage(
                f"'{param}' could not be fetched: {_shown(url)} sent it with Content-Encoding "
                f"{answer['content-encoding']!r} (read here: none, or one layer of gzip or deflate)",
                param=param,
            )
        declared = "" if "transfer-encoding" in answer else answer.get("content-length", "")  # chunks say the length
        if not encodings and declared.isdigit() and int(declared) > limit:
            raise fetcher.too_large(param, limit)
        raw: Iterator[bytes] = iter(response.iter_stream())
        chunks: list[bytes] = []
        size = 0
        for chunk in _decoded(raw, encodings[0] if encodings else None, limit, param):
            size += len(chunk)
            if size > limit:
                raise fetcher.too_large(param, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _decoded(raw: Iterator[bytes], encoding: str | None, limit: int, param: str) -> Iterator[bytes]:
    """The body with its encoding undone, never more than ``limit + 1`` bytes of output at a time (a small body may
    inflate a thousandfold: it is decompressed in bounded steps, and the caller stops past the limit)."""
    if encoding is None:
        yield from raw
        return
    inflate = None
    head = b""  # deflate comes zlib-wrapped (RFC 9110) or, from some servers, raw: told by its first two bytes
    try:
        for chunk in raw:
            if inflate is None:
                head += chunk
                if len(head) < 2:
                    continue
                wrapped = encoding != "deflate" or (head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0)
                inflate = zlib.decompressobj(_ENCODINGS[encoding] if wrapped else -15)
                chunk, head = head, b""
            data = chunk
            while data:
                yield inflate.decompress(data, limit + 1)
                data = inflate.unconsumed_tail
        if inflate is None:  # a body of a byte or none: no encoding's whole stream
            raise zlib.error("too short")
        yield inflate.flush()
        if not inflate.eof:  # cut short: its end (and a gzip body's checksum) never came
            raise zlib.error("incomplete")
    except zlib.error:
        raise InvalidImage(
            f"'{param}' could not be fetched: its {encoding} encoding is damaged or cut short", param=param
        ) from None


class _Deadline(httpcore.NetworkBackend):
    """Connections whose every connect, read and write gets no more than the time left before ``deadline``: the whole
    fetch is bounded, however an origin trickles its headers or body."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.backend = httpcore.SyncBackend()

    def left(self, timeout: float | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the fetch's time is up")
        return min(timeout if timeout is not None else math.inf, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = _resolve(host, port, self.left(timeout))  # the name's lookup within the deadline too
        stream = self.backend.connect_tcp(address, port, self.left(timeout), local_address, socket_options)
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover (never asked for)
        raise httpcore.ConnectError("unix sockets are not fetched from")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self.deadline - time.monotonic())))


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline):
        self.stream = stream
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self.deadline.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self.deadline.left(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, self.deadline.left(timeout)), self.deadline)

    def get_extra_info(self, info: str):
        return self.stream.get_extra_info(info)


def _resolve(host: str, port: int, timeout: float) -> str:
    """The first address of ``host``, looked up on a thread of its own so that a slow resolver cannot hold the fetch
    past its deadline (``getaddrinfo`` takes no timeout; an abandoned lookup ends on its own)."""
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
        except Exception as exc:  # OSError; UnicodeError for a label the IDNA codec refuses
            found.append(exc)

    thread = threading.Thread(target=lookup, name="qis-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise httpcore.ConnectTimeout(f"looking up {host} took too long")
    if isinstance(found[0], Exception):
        raise httpcore.ConnectError(f"{host}: {found[0]}")
    return found[0]


def _ssl_context() -> ssl.SSLContext:
    cafile, capath = os.environ.get("SSL_CERT_FILE") or _certifi(), os.environ.get("SSL_CERT_DIR") or None
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"the CA certificates for image URLs (QIS_IMAGE_URL_PREFIXES has https ones) cannot be read from "
            f"{cafile or capath}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _certifi() -> str | None:
    try:
        import certifi
    except ImportError:  # the system's CAs
        return None
    return certifi.where()


def _shown(url: str, limit: int = 200) -> str:
    """A URL as messages show it: without its query (which may carry a signature) or fragment, cut at ``limit``."""
    shown = url.split("?", 1)[0].split("#", 1)[0]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
