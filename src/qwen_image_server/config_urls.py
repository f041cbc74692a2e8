"""Where input images may be fetched from: the URL prefixes of ``QIS_IMAGE_URL_PREFIXES`` and the parts of a URL
as a fetch requests them (``serving/fetch.py`` fetches; ``Settings`` checks the prefixes at start)."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
#: A host as a URL may name it for a fetch: a DNS name in ASCII (IDNA's xn-- form for others), or an IPv4 address;
#: IPv6 addresses are checked apart.
_FETCH_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class UrlPrefix:
    """One allowed prefix: ``scheme://host[:port]/path``; ``host`` may be ``*.example.com`` (any subdomain)."""

    scheme: str
    host: str
    port: int
    path: str

    def allows(self, scheme: str, host: str, port: int, path: str) -> bool:
        """Whether a URL of these parts (``url_parts``) is under this prefix."""
        if self.host.startswith("*."):
            host_ok = host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        else:
            host_ok = host == self.host
        # a prefix path without a trailing '/' is a whole segment: /img allows /img and /img/..., not /img-private
        path_ok = path == self.path or path.startswith(self.path if self.path.endswith("/") else self.path + "/")
        return scheme == self.scheme and host_ok and port == self.port and path_ok

    def __str__(self) -> str:
        default = DEFAULT_PORTS[self.scheme] == self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{'' if default else f':{self.port}'}{self.path}"


def url_parts(url: str) -> tuple[str, str, int, str, str]:
    """``(scheme, host, port, path, query)`` of an http(s) URL, as a fetch requests it: scheme and host in lower case,
    the port given or the scheme's; ValueError saying what is wrong with one that cannot be fetched unambiguously
    (characters outside printable ASCII, a user name or password, a host that is no DNS name or IP address)."""
    if not url.isascii() or not url.isprintable() or " " in url:
        raise ValueError("holds spaces or characters outside printable ASCII (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # an IPv6 address not closed, an IPv4 address in brackets, a port that is no number or too large
        raise ValueError("has a malformed host or port") from None
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("may not carry a user name or password")
    host = (parts.hostname or "").lower()
    named = _FETCH_HOST.match(host) and len(host) <= 253 and all(len(label) <= 63 for label in host.split("."))
    if not host or not (named or (":" in host and _ipv6(host))):
        raise ValueError("has no host name (at most 63 characters a label) or IP address")
    return parts.scheme.lower(), host, port or DEFAULT_PORTS[parts.scheme.lower()], parts.path or "/", parts.query


def _ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def parse_prefix(text: str) -> UrlPrefix:
    """A ``QIS_IMAGE_URL_PREFIXES`` entry, or ValueError saying what is wrong with it."""
    text = text.strip()
    wildcard = "://*." in text
    try:
        scheme, host, port, path, query = url_parts(text.replace("://*.", "://", 1) if wildcard else text)
    except ValueError as exc:
        raise ValueError(f"image URL prefix {text!r} {exc}") from None
    if query or "#" in text:
        raise ValueError(f"image URL prefix {text!r} may hold no query or fragment")
    if "*" in text.replace("://*.", "://", 1):
        raise ValueError(f"image URL prefix {text!r}: a host may only start with '*.' (any subdomain of what follows)")
    if wildcard and ("." not in host or host.rsplit(".", 1)[1].isdigit() or ":" in host):
        raise ValueError(f"image URL prefix {text!r}: '*.' goes before a domain of two labels or more, not an address")
    problem = path_problem(path)
    if problem:  # no URL under it could ever be fetched
        raise ValueError(f"image URL prefix {text!r} may not hold {problem}")
    return UrlPrefix(scheme, f"*.{host}" if wildcard else host, port, path)


def path_problem(path: str) -> str | None:
    """What in a URL's path a server might read as leaving the prefix: dot segments in any spelling (percent-encoded,
    Tomcat's ``..;``, full-width or other compatibility dots), a backslash, an encoded ``%`` (a second decoding) or
    NUL, or percent-encoding that is not UTF-8 (overlong forms of ``.``)."""
    lowered = path.lower()
    if "%25" in lowered or "%00" in lowered:
        return "an encoded '%' or NUL"
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return "percent-encoded bytes that are not UTF-8"
    decoded = unicodedata.normalize("NFKC", decoded)
    # a segment of dots (and blanks, which Windows servers trim: "..%20") may be read as "." or ".."
    if "\\" in decoded or any(re.fullmatch(r"[.\s]*\.[.\s]*", segment.split(";")[0]) for segment in decoded.split("/")):
        return "'.' or '..' path segments (or segments of dots and blanks) or backslashes"
    return None
