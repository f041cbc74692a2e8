"""Files and folders the settings name: the API keys file, a folder of models, the folder url images go to, and
what makes two local model sources one folder. Read or checked once, at start."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from urllib.parse import SplitResult, urlsplit


def read_keys_file(path: Path) -> list[str]:
    """API keys from a file, one per line; blank lines and lines starting with ``#`` are skipped. A byte-order mark
    (what Windows editors put first) is not part of the first key."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"the API keys file {path} holds no key")
    return [checked_key(key, f" in {path}") for key in keys]


def header_safe(text: str) -> bool:
    """Whether an HTTP header can carry ``text``: printable ASCII."""
    return text.isascii() and text.isprintable()


def checked_key(key: str, where: str = "") -> str:
    """An API key clients can send (``header_safe``). Another one started the server and could never match (a browser
    cannot even send it)."""
    if not header_safe(key):
        raise ValueError(f"an API key{where} holds characters an HTTP header cannot carry (not printable ASCII)")
    return key


def checked_host(value: str) -> str:
    """The address to listen on. An empty one would make the server listen on every interface: refused, not taken as
    a default. An IPv6 address in URL brackets (``[::1]``) is the address."""
    if not value.strip():
        raise ValueError("is empty: give the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    host = value.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def checked_device(value: str) -> str:
    """``auto``, or a comma-separated list of ``cpu``, ``cuda`` and ``cuda:N`` (one per worker slot)."""
    entries = [entry.strip() for entry in value.split(",")]
    if value.strip() == "auto":
        return "auto"
    if not all(entry == "cpu" or re.fullmatch(r"cuda(:\d+)?", entry) for entry in entries):
        raise ValueError("must be auto, or cpu, cuda or cuda:N, or a comma-separated list of them (cuda:0,cuda:1)")
    return ",".join(entries)


def parse_entry(item: str) -> tuple[str | None, str]:
    """A ``--model`` value ``[ID=]SOURCE`` → ``(id or None, source)``."""
    ident, sep, source = item.partition("=")
    named = sep and "?" not in ident  # random:ORG/NAME?KEY=VALUE has an '=' but no ID
    return (ident.strip(), source.strip()) if named else (None, item.strip())


def models_in_dir(folder: Path) -> list[tuple[str | None, str]]:
    """The model folders directly inside ``folder`` (those with a ``model_index.json``), by name.

    This is how a container serves whatever is mounted at ``/models`` without naming it.
    """
    if not folder.is_dir():
        raise ValueError(f"QIS_MODELS_DIR {folder} is not a folder (mount the models there, or name them with --model)")
    found: list[tuple[str | None, str]] = [
        (None, str(sub)) for sub in sorted(folder.iterdir()) if (sub / "model_index.json").is_file()
    ]
    if not found:
        raise ValueError(
            f"no model to serve: QIS_MODELS_DIR {folder} holds no model folder (one with a model_index.json), "
            "and none is named by --model, QIS_MODELS, MODEL_PATH or QWEN_IMAGE_LOCATION"
        )
    return found


def directory_problem(directory: Path) -> str | None:
    """Why images could never be stored in ``directory`` (it is a file, or the system refuses to look at it: a name
    too long), or None. A folder that does not exist yet is fine: it is made when the first image is stored."""
    path = Path(directory).expanduser()
    try:
        return "is a file, not a folder" if path.exists() and not path.is_dir() else None
    except OSError as exc:
        return f"cannot be used: {exc.strerror or exc}"


def checked_output_dir(value: object, default: Path) -> object:
    """The folder url images are stored in. Blank is the default (it was the working directory). A regular file cannot
    hold url images: refused at start rather than a 500 on every url response. A folder that does not exist yet is made
    when the first is stored. ``~`` is the home folder, for the check and the images alike."""
    if isinstance(value, str) and not value.strip():
        return default
    if isinstance(value, str | Path) and (problem := directory_problem(Path(value))):
        raise ValueError(f"{value} {problem} (url-format images are stored in this folder)")
    return Path(value).expanduser() if isinstance(value, str | Path) else value


def checked_origin(origin: str) -> str:
    """A ``--cors-origin`` as browsers send ``Origin``: ``scheme://host[:port]``, lower-case, without a trailing ``/``
    (``https://App.example/`` → ``https://app.example``), or ``*``. One that no browser could send (no scheme, a path)
    would silently never match: refused, with the form it needs."""
    text = origin.strip()
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    host = rest[:-1] if rest.endswith("/") else rest
    if not (sep and scheme and host) or any(c in host for c in "/?#@ ") or not scheme.replace("-", "").isalnum():
        raise ValueError(f"{origin!r} is not a web origin: expected SCHEME://HOST[:PORT] (as https://app.example) or *")
    return f"{scheme.lower()}://{host.lower()}"


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253})(?::(\d{1,5}))?\Z")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")  # "_": a compose service's name


def fetchable_host(host: str) -> str | None:
    """``host`` as a URL's ``host[:port]`` when it is one a client could fetch from: a name of host labels, an IPv4
    address or a bracketed IPv6 one, and a port from 1 to 65535 (written without leading zeros); else None
    (``-``, ``...``, ``[:]`` and ``h:99999`` were taken as given: from a Host header, and in a URL prefix)."""

    match = _HOST.match(host)
    if match is None:
        return None
    name, port = match.group(1), match.group(2)
    if port is not None and not 0 < int(port) < 65536:
        return None
    try:
        if name.startswith("["):
            ipaddress.IPv6Address(name[1:-1])
        elif name.replace(".", "").isdigit():
            ipaddress.IPv4Address(name)
        elif not all(_LABEL.match(label) for label in name.removesuffix(".").split(".")):
            return None
    except ValueError:
        return None
    return name + (f":{int(port)}" if port is not None else "")


def checked_url_prefix(prefix: str | None) -> str | None:
    """``IMAGE_DOWNLOAD_URL_PREFIX``: an absolute ``http(s)://HOST[:PORT][/PATH]`` URL, or unset (None or empty).
    Anything else would give clients image URLs they cannot fetch, or not the image: refused. That is a URL without a
    host (``images.example.com/img``, a bare path, ``http://:80``), with spaces or control characters, a port that is
    no number, credentials (``user@``), or a query or fragment (the image's name would be appended inside it)."""
    if not prefix or not prefix.strip():
        return None
    text = prefix.strip()
    scheme, sep, rest = text.partition("://")
    problem = None
    if not (sep and scheme.lower() in ("http", "https") and rest and not rest.startswith("/")):
        problem = "expected http(s)://HOST[/PATH]"
    elif any(c.isspace() or not c.isprintable() or c == "\\" for c in text):
        problem = "it holds spaces, backslashes or control characters"
    else:
        parts = _split(text)
        if "@" in parts.netloc:
            problem = "credentials (user@) have no place in it"
        elif parts.query or parts.fragment or "?" in text or "#" in text:
            problem = "a query or fragment would hold the image's name"
        elif fetchable_host(rest.partition("/")[0]) is None:
            problem = "expected http(s)://HOST[:PORT][/PATH]"
    if problem:
        raise ValueError(
            f"{shown_url(prefix)!r} is not an absolute URL clients can fetch images under: {problem} "
            "(as https://images.example.com/images/)"
        )
    return text


#: A bucket name botocore takes (AWS's own rules are stricter; MinIO and Ceph take these), or an access point's ARN.
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}\Z|arn:\S+\Z")


def checked_place(field: str, value: str | None) -> str | None:
    """Where url images go: ``image_download_url_prefix`` (``checked_url_prefix``), and an S3 endpoint URL and
    bucket that the S3 client can use. Both were taken as given: a bucket name it refuses failed every url request
    with "the object store could not be reached", an endpoint without a scheme failed ``serve`` only (not ``plan``)
    and without naming the setting. Blank is unset."""
    if field == "image_download_url_prefix":
        return checked_url_prefix(value)
    text = (value or "").strip()
    if not text:
        return None
    if field == "s3_bucket" and not _BUCKET.match(text):
        raise ValueError(f"{text!r} is not a bucket name: letters, digits and . _ - (at most 255), or an access point ARN")
    if field == "s3_endpoint_url":
        parts = _split(text)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not _port_ok(parts) or " " in text:
            raise ValueError(f"{shown_url(text)!r} is not an S3 endpoint URL: expected http(s)://HOST[:PORT]")
    return text


def shown_url(url: str) -> str:
    """``url`` as a message may repeat it, however malformed: everything before its last ``@`` (credentials, which
    may hold ``/``, ``?`` or ``#``) and after its first ``?`` or ``#`` (a query's key, a fragment's token) hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[: cut + 1] + "***"
    return f"{scheme}{sep}{rest}"


def _split(url: str) -> SplitResult:
    """``urlsplit(url)``, or the parts of no URL where it raises (a malformed IPv6 address): the checks then refuse it
    in their own words, naming the setting, not in urllib's."""
    try:
        return urlsplit(url)
    except ValueError:
        return urlsplit("")


def _port_ok(parts: SplitResult) -> bool:
    """Whether a URL's port, if it has one, is a number from 0 to 65535."""
    try:
        parts.port  # noqa: B018 (the property raises ValueError for any other)
    except ValueError:
        return False
    return True


def checked_base_url(url: str, where: str = "") -> str:
    """``OPENAI_BASE_URL``: an ``http(s)://HOST[:PORT][/PATH]`` URL the rewriter can post to (``/chat/completions``
    is appended). One with spaces or control characters (a newline from a secrets file), no host, a port that is no
    number, or a query or fragment (the path would be appended inside it) would fail every rewrite: refused."""
    text = url.strip()
    parts = _split(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not _port_ok(parts):
        problem = "expected http(s)://HOST[:PORT][/PATH]"
    elif any(c.isspace() or not c.isprintable() for c in text):
        problem = "it holds spaces or control characters"
    elif parts.query or parts.fragment or "?" in text or "#" in text:
        problem = "a query or fragment would hold /chat/completions"
    else:
        return text
    raise ValueError(
        f"{where}{shown_url(url)!r} is not a URL the prompt rewriter can post to: {problem} (as https://api.openai.com/v1)"
    )


def looks_like_path(source: str) -> bool:
    """True when a model source names a local folder rather than a hub id (``ORG/NAME``)."""
    return source.startswith(("/", ".", "~")) or Path(source).exists() or source.count("/") != 1


def source_key(source: str) -> str:
    """What makes two configured sources one model: a local folder's resolved path (``X``, ``X/``, ``./X`` and its
    absolute path are one folder), a hub id or ``random:`` source as it is spelled."""
    if not source or source.startswith("random:") or not looks_like_path(source):
        return source
    try:
        return str(Path(source).expanduser().resolve())
    except (OSError, RuntimeError):  # a symlink loop: compared as given
        return source


def unique_entries(entries: list[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    """``(id or None, source)`` entries without repeats of a source (``source_key``): the first of each is kept."""
    seen: set[str] = set()
    unique: list[tuple[str | None, str]] = []
    for entry in entries:
        key = source_key(entry[1])
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def repeated_entries(entries: list[tuple[str | None, str]]) -> list[tuple[str, str]]:
    """``(id, source)`` of each repeat ``unique_entries`` leaves out that names an id of its own, ``source`` spelled
    as the kept entry spells it; local folders are one source when their resolved paths are (``X``, ``X/``, ``./X``
    and its absolute path), hub ids when they are the same string."""
    first: dict[str, tuple[str | None, str]] = {}
    repeated: list[tuple[str, str]] = []
    for ident, source in entries:
        key = source_key(source)
        if key not in first:
            first[key] = (ident, source)
        elif ident and ident != first[key][0] and (ident, first[key][1]) not in repeated:
            repeated.append((ident, first[key][1]))
    return repeated


def configured_entries(settings) -> list[tuple[str | None, str]]:
    """Every model ``settings`` name as ``(id or None, path or hub id)``, in order, repeats included: ``--model``
    entries, then ``MODEL_PATH`` (with ``MODEL_NAME``) and the two location variables; the models folder's only when
    nothing else names one."""
    entries = [parse_entry(item) for item in settings.models]
    if settings.model_path:
        entries.append((settings.model_name, settings.model_path))
    if settings.qwen_image_location:
        entries.append((None, settings.qwen_image_location))
    if settings.qwen_image_edit_location:
        entries.append((None, settings.qwen_image_edit_location))
    if not entries and settings.models_dir is not None:
        entries = models_in_dir(settings.models_dir)
    return entries
