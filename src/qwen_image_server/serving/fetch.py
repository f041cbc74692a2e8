"""Input images given by URL (OpenAI's JSON edits: ``{"image_url": "https://..."}``), fetched only from the URL
prefixes the operator allows (``QIS_IMAGE_URL_PREFIXES``; none by default, so that no client makes the server fetch
from its own network).

A URL is fetched when its scheme, host and port are a prefix's and its path starts with the prefix's path (a prefix's
host may start with ``*.``: any subdomain); it may carry no user name or password, and no ``..`` or ``.`` segment
(which a server may resolve outside the prefix). Redirects are followed (at most ``MAX_REDIRECTS``) only to URLs that
are allowed as well. A request's fetched images together may be as large as a request body may be
(``QIS_MAX_UPLOAD_BYTES``), and each is fetched within ``QIS_IMAGE_URL_TIMEOUT`` seconds, in the decoding slot of its
request (``DecodeGate``: after the model admits work, at most ``max_concurrent_decodes`` requests at a time).
"""

from __future__ import annotations

import time
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from ..config_files import DEFAULT_PORTS, UrlPrefix
from ..errors import InvalidImage

#: Redirects followed for one image.
MAX_REDIRECTS = 3


class ImageFetcher:
    """Fetches input images from allowed URLs (blocking: it runs in a request's decoding thread)."""

    def __init__(self, prefixes: list[UrlPrefix], timeout: float, max_bytes: int):
        self.prefixes = prefixes
        self.timeout = timeout
        self.max_bytes = max_bytes

    def check(self, url: str, param: str) -> None:
        """Refuse (400) a URL that may not be fetched, before the request waits for anything."""
        if not self.prefixes:
            raise InvalidImage(
                f"'{param}' is a URL: this server fetches no image URLs (QIS_IMAGE_URL_PREFIXES allows some); send the "
                "image as a file, base64 or a data URL",
                param=param,
            )
        problem = self._problem(url)
        if problem:
            raise InvalidImage(f"'{param}': {problem}", param=param)

    def _problem(self, url: str) -> str | None:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            return "an image URL may not carry a user name or password"
        path = unquote(parts.path)
        # dot segments, also as some servers read them (Tomcat's "..;/"), and backslashes (read as "/" by others)
        if "\\" in path or any(segment.split(";")[0] in (".", "..") for segment in path.split("/")):
            return "an image URL may not hold '.' or '..' path segments or backslashes"
        try:  # what the client will request must be what was checked
            sent = httpx.URL(url)
            same = (sent.scheme, sent.host, sent.port or DEFAULT_PORTS.get(sent.scheme)) == (
                parts.scheme,
                parts.hostname,
                parts.port or DEFAULT_PORTS.get(parts.scheme),
            )
        except (httpx.InvalidURL, ValueError):
            same = False
        if not same:
            return f"{_shown(url)} is not a URL this server reads unambiguously"
        if not any(prefix.allows(parts) for prefix in self.prefixes):
            allowed = ", ".join(str(prefix) for prefix in self.prefixes)
            return f"{_shown(url)} is not under an allowed URL prefix ({allowed})"
        return None

    def fetch_all(self, urls: list[tuple[str, str]]) -> list[bytes]:
        """The bytes of each ``(url, param)``, in order; together at most ``max_bytes``."""
        out: list[bytes] = []
        left = self.max_bytes
        for url, param in urls:
            data = self.fetch(url, param, left)
            left -= len(data)
            out.append(data)
        return out

    def fetch(self, url: str, param: str, max_bytes: int | None = None) -> bytes:
        """The bytes at ``url`` (redirects to allowed URLs followed); a 400 naming ``param`` when it cannot be had."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        deadline = time.monotonic() + self.timeout
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:  # the environment's proxy and CA
            for _ in range(MAX_REDIRECTS + 1):
                self.check(url, param)
                try:
                    with client.stream("GET", url, headers={"Accept": "image/png, image/jpeg, image/webp"}) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise InvalidImage(
                                f"'{param}' could not be fetched: {_shown(url)} answered HTTP {response.status_code}",
                                param=param,
                            )
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > limit:
                            raise self._too_large(param, limit)
                        chunks: list[bytes] = []
                        size = 0
                        for chunk in response.iter_bytes():
                            size += len(chunk)
                            if size > limit:
                                raise self._too_large(param, limit)
                            if time.monotonic() > deadline:
                                raise httpx.ReadTimeout("the image took too long")
                            chunks.append(chunk)
                        return b"".join(chunks)
                except httpx.TimeoutException:
                    raise InvalidImage(
                        f"'{param}' could not be fetched within {self.timeout:g} s from {_shown(url)}", param=param
                    ) from None
                except httpx.HTTPError as exc:
                    raise InvalidImage(
                        f"'{param}' could not be fetched from {_shown(url)}: {type(exc).__name__}", param=param
                    ) from None
        raise InvalidImage(f"'{param}' could not be fetched: more than {MAX_REDIRECTS} redirects", param=param)

    def _too_large(self, param: str, limit: int) -> InvalidImage:
        return InvalidImage(
            f"'{param}' is larger than the {limit} bytes left of this request's {self.max_bytes} (QIS_MAX_UPLOAD_BYTES)",
            param=param,
        )


def _shown(url: str, limit: int = 200) -> str:
    """A URL as messages show it: without its query (which may carry a signature), cut at ``limit`` characters."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
