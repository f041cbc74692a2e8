"""Input images given by URL (OpenAI's ``{"image_url": "https://..."}``): fetched only under the URL prefixes the
settings allow (``QIS_IMAGE_URL_PREFIXES``), within their time and the request's byte limit, redirects only to allowed
URLs. In process on the fake engine (its jobs hold the arrays a worker would get), against a local HTTP server."""

from __future__ import annotations

import gzip
import http.server
import io
import threading
import time
import zlib

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import png_bytes
from qwen_image_server.config import Settings
from qwen_image_server.config_urls import parse_prefix
from qwen_image_server.errors import InvalidImage
from qwen_image_server.serving.fetch import ImageFetcher

EDITS, VARIATIONS = "/v1/images/edits", "/v1/images/variations"
BLUE, RED = (40, 90, 200), (200, 30, 30)


def _raw_deflate(data: bytes) -> bytes:
    """Deflate without zlib's header and checksum, as some servers send Content-Encoding: deflate."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _noise_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _Images(http.server.BaseHTTPRequestHandler):
    """``/ok/...`` and ``/private/...``: PNGs, redirects, a 404, a slow answer and one without an end in sight."""

    protocol_version = "HTTP/1.0"
    blue, red, white = png_bytes((256, 256), BLUE), png_bytes((256, 256), RED), png_bytes((256, 256), (255, 255, 255))
    noise = _noise_png()  # random pixels: about 197 kB (two fit a 400 kB request, three do not)
    bomb = gzip.compress(b"\0" * (8 << 20), 9)  # 8 kB that inflate to 8 MiB, 20 times the limit
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        routes = {
            "/ok/blue.png": (200, self.blue, {}),
            "/ok/red.png": (200, self.red, {}),
            "/ok/white.png": (200, self.white, {}),
            "/ok/noise.png": (200, self.noise, {}),
            "/private/blue.png": (200, self.blue, {}),
            "/ok/redirect": (302, b"", {"Location": "/ok/blue.png"}),
            "/ok/away": (302, b"", {"Location": "/private/blue.png"}),
            "/ok/loop": (302, b"", {"Location": "/ok/loop"}),
            "/ok/bad-redirect": (302, b"", {"Location": "http://[::1"}),
            "/ok/deflate.png": (200, zlib.compress(self.blue), {"Content-Encoding": "deflate"}),
            "/ok/raw-deflate.png": (200, _raw_deflate(self.blue), {"Content-Encoding": "deflate"}),
            "/ok/gzip.png": (200, gzip.compress(self.blue), {"Content-Encoding": "gzip"}),
            "/ok/gzip2": (200, gzip.compress(gzip.compress(self.blue)), {"Content-Encoding": "gzip, gzip"}),
            "/ok/gzip-bomb": (200, self.bomb, {"Content-Encoding": "gzip"}),
            "/ok/gzip-cut": (200, gzip.compress(self.blue)[:-20], {"Content-Encoding": "gzip"}),
        }
        if self.path == "/ok/slow":
            time.sleep(3)
        if self.path == "/ok/slowish.png":  # within the timeout alone, not twice
            time.sleep(0.35)
            self.path = "/ok/blue.png"
        if self.path in ("/ok/deflate-bytes", "/ok/chunked-with-length"):  # chunked (HTTP/1.1), with odd framing
            self.protocol_version = "HTTP/1.1"
            one_byte = self.path == "/ok/deflate-bytes"
            body = zlib.compress(self.blue) if one_byte else self.blue
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.send_header(*(("Content-Encoding", "deflate") if one_byte else ("Content-Length", "99999999")))
            self.end_headers()
            pieces = [body[i : i + 1] for i in range(len(body))] if one_byte else [body]
            self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n")
            return
        if self.path == "/ok/trickle":  # a header line a byte every 0.2 s: each read is quick, the whole is not
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(20):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        if self.path == "/ok/endless":  # no Content-Length: bytes until the client stops reading
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return
        status, body, headers = routes.get(self.path, (404, b"not here", {}))
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (the slow answer)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def fetching(make_api, origin):
    """A server that fetches input images from ``{origin}/ok/``, within half a second and 400 kB a request."""
    return make_api(
        workers=1, max_steps=1000, image_url_prefixes=[f"{origin}/ok/"], image_url_timeout=0.5, max_upload_bytes=400_000
    )


def _last_inputs(api) -> list[np.ndarray]:
    return api.engine.jobs[-1][1].images


def test_json_edits_and_variations_fetch_their_images_by_url(fetching, origin):
    body = {"prompt": "a hat", "images": [{"image_url": f"{origin}/ok/blue.png"}, {"image_url": {"url": f"{origin}/ok/red.png"}}]}
    edit = fetching.client.post(EDITS, json={**body, "model": "qwen-image-edit-plus-tiny"})
    assert edit.status_code == 200, edit.text[:300]
    first, second = _last_inputs(fetching)
    assert (first == BLUE).all() and (second == RED).all()
    variation = fetching.client.post(VARIATIONS, json={"image": f"{origin}/ok/red.png"})
    assert variation.status_code == 200, variation.text[:300]
    assert (_last_inputs(fetching)[0] == RED).all()


def test_a_form_field_a_mask_and_a_redirect_under_the_prefix_are_fetched(fetching, origin):
    form = {"prompt": "a hat", "image": f"{origin}/ok/redirect", "mask": f"{origin}/ok/white.png"}  # white: edit all
    empty = {"unused": ("", b"", "application/octet-stream")}  # a file input left empty: no file, but a multipart body
    response = fetching.client.post(EDITS, data=form, files=empty)
    assert response.status_code == 200, response.text[:300]
    job = fetching.engine.jobs[-1][1]
    assert job.mode == "inpaint" and (job.images[0] == BLUE).all() and job.mask.all()


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/private/blue.png", "http://127.0.0.1:{port}/private/blue.png is not under a URL prefix this server fetches"),
        ("/ok/../private/blue.png", "an image URL may not hold '.' or '..' path segments"),
        ("/ok/%2e%2e/private/blue.png", "an image URL may not hold '.' or '..' path segments"),
        ("/ok/..;/private/blue.png", "an image URL may not hold '.' or '..' path segments"),  # Tomcat's ".."
        ("/ok/..\\private\\blue.png", "or backslashes"),
        ("/ok/away", "/private/blue.png is not under a URL prefix this server fetches"),  # a redirect out of the prefix
        ("/ok/%252e%252e/private/blue.png", "an image URL may not hold an encoded '%' or NUL"),  # decoded twice: ..
        ("/ok/.%00./private/blue.png", "an image URL may not hold an encoded '%' or NUL"),
        ("/ok/%c0%ae%c0%ae/private/blue.png", "percent-encoded bytes that are not UTF-8"),  # overlong '.'
        ("/ok/%EF%BC%8E%EF%BC%8E/private/blue.png", "'.' or '..' path segments"),  # full-width dots
        ("/ok/gzip2", "sent it with Content-Encoding 'gzip, gzip' (read here: none, or one layer of gzip or deflate)"),
        ("/ok/gzip-bomb", "is larger than the 400000 bytes left of this request's 400000"),
        ("/ok/trickle", "could not be fetched within 0.5 s"),  # headers a byte at a time: the whole fetch's deadline
        ("/ok/loop", "could not be fetched: more than 3 redirects"),
        ("/ok/bad-redirect", "redirects to a malformed URL"),  # was a 500
        ("/ok/gzip-cut", "its gzip encoding is damaged or cut short"),
        ("/ok/..%20/private/blue.png", "segments of dots and blanks"),  # Windows servers trim the blank: ..
        ("/ok/.../private/blue.png", "segments of dots and blanks"),
        ("/ok/missing.png", "could not be fetched: http://127.0.0.1:{port}/ok/missing.png answered HTTP 404"),
        ("/ok/slow", "could not be fetched within 0.5 s"),
        ("/ok/endless", "is larger than the 400000 bytes left of this request's 400000 (QIS_MAX_UPLOAD_BYTES)"),
    ],
    ids=[
        "other-path",
        "dot-dot",
        "encoded-dot-dot",
        "dot-dot-semicolon",
        "backslash",
        "redirect-out",
        "double-encoded",
        "nul",
        "overlong",
        "full-width",
        "stacked-gzip",
        "gzip-bomb",
        "header-trickle",
        "redirect-loop",
        "malformed-redirect",
        "gzip-cut-short",
        "dot-dot-blank",
        "three-dots",
        "404",
        "slow",
        "too-large",
    ],
)
def test_a_url_that_cannot_be_fetched_is_a_400_naming_the_image(fetching, origin, path, said):
    port = origin.rsplit(":", 1)[1]
    before = len(fetching.engine.jobs)
    response = fetching.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": origin + path}})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "image" and said.format(port=port) in error["message"], error["message"]
    assert len(fetching.engine.jobs) == before


@pytest.mark.parametrize(
    "path", ["/ok/gzip.png", "/ok/deflate.png", "/ok/raw-deflate.png", "/ok/deflate-bytes", "/ok/chunked-with-length"]
)
def test_an_encoded_image_is_read(fetching, origin, path):
    response = fetching.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": origin + path}})
    assert response.status_code == 200, response.text[:300]
    assert (_last_inputs(fetching)[0] == BLUE).all()


def test_a_compressed_body_is_inflated_in_steps_no_larger_than_the_limit(fetching, origin, monkeypatch):
    """8 MiB of zeros in 8 kB: each step of the inflation gives at most the bytes left plus one, so however much a
    small body inflates to, no more than that is ever held (httpx inflated every layer of a chunk at once)."""
    from qwen_image_server.serving import fetch

    outputs: list[int] = []
    real = fetch.zlib.decompressobj

    class Counted:
        def __init__(self, *args):
            self.inner = real(*args)

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            outputs.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(fetch.zlib, "decompressobj", Counted)
    response = fetching.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": f"{origin}/ok/gzip-bomb"}})
    assert response.status_code == 400 and "is larger than the 400000 bytes left" in response.json()["error"]["message"]
    assert outputs and max(outputs) <= 400_001 and sum(outputs) <= 2 * 400_001


def test_a_refused_url_is_not_requested_and_the_requests_images_share_its_byte_limit(fetching, origin):
    _Images.hits.clear()
    credentials = origin.replace("http://", "http://user:secret@") + "/ok/blue.png"
    for url in (credentials, f"{origin}/private/blue.png"):
        response = fetching.client.post(EDITS, json={"prompt": "a hat", "image": url})
        assert response.status_code == 400 and response.json()["error"]["param"] == "image"
        assert "secret" not in response.text
    assert _Images.hits == []  # refused before anything was fetched
    assert 2 * len(_Images.noise) < 400_000 < 3 * len(_Images.noise)
    body = {"prompt": "a hat", "model": "qwen-image-edit-plus-tiny"}
    two = fetching.client.post(EDITS, json={**body, "images": [{"image_url": f"{origin}/ok/noise.png"}] * 2})
    assert two.status_code == 200, two.text[:300]
    three = fetching.client.post(EDITS, json={**body, "images": [{"image_url": f"{origin}/ok/noise.png"}] * 3})
    assert three.status_code == 400 and three.json()["error"]["param"] == "images[2]"
    assert f"is larger than the {400_000 - 2 * len(_Images.noise)} bytes left of this request's 400000" in three.text


def test_without_prefixes_no_url_is_fetched(api, origin):
    _Images.hits.clear()
    response = api.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": f"{origin}/ok/blue.png"}})
    assert response.status_code == 400
    assert "this server fetches no image URLs (QIS_IMAGE_URL_PREFIXES allows some)" in response.json()["error"]["message"]
    assert _Images.hits == []


@pytest.mark.parametrize(
    "prefix",
    [
        "ftp://example.com/",
        "https://",
        "https://user:pw@example.com/",
        "https://example.com/?sig=1",
        "https://ex*.com/",
        "https://h:99999/",
        "http://h/a/../b/",
        "http://h\\x/",
        "http://[::1/",
        "http://h/a/%2e%2e/",  # no URL under these could ever be fetched
        "http://h/%25/",
        "http://*.1:80/",  # a wildcard over an address
        "http://*.com/",  # over a whole top-level domain
        "http://" + "a" * 64 + ".example/",
    ],
)
def test_a_prefix_that_cannot_be_one_stops_the_settings(prefix):
    with pytest.raises(ValidationError, match="image URL prefix"):
        Settings(models=["m=/x"], image_url_prefixes=[prefix])


def test_prefixes_from_the_environment_are_comma_separated_and_subdomains_match(monkeypatch):
    from qwen_image_server.config_urls import url_parts

    monkeypatch.setenv(
        "QIS_IMAGE_URL_PREFIXES", "https://cdn.example.com/img/, https://*.bucket.example.org, http://[::1]:8080/a/"
    )
    prefixes = ["https://cdn.example.com/img/", "https://*.bucket.example.org/", "http://[::1]:8080/a/"]
    assert Settings(models=["m=/x"]).image_url_prefixes == prefixes  # as written (IPv6 in brackets), parsed again alike
    assert [str(parse_prefix(prefix)) for prefix in prefixes] == prefixes

    def allows(prefix: str, url: str) -> bool:
        return parse_prefix(prefix).allows(*url_parts(url)[:4])

    sub = "https://*.bucket.example.org"
    assert allows(sub, "https://eu.bucket.example.org/a.png") and not allows(sub, "https://bucket.example.org/a")
    assert not allows(sub, "https://evilbucket.example.org/a") and not allows(sub, "http://eu.bucket.example.org/a")
    cdn = "https://CDN.example.com:443/img/"
    assert allows(cdn, "https://cdn.example.com/img/a.png") and not allows(cdn, "https://cdn.example.com/imgs/a")
    assert not allows(cdn, "https://cdn.example.com:8443/img/a.png")
    assert allows("http://[::1]:8080/a/", "http://[::1]:8080/a/b.png")
    whole = "https://cdn.example.com/img"  # a path without its '/' is a whole segment
    assert allows(whole, "https://cdn.example.com/img") and allows(whole, "https://cdn.example.com/img/a.png")
    assert not allows(whole, "https://cdn.example.com/img-private/a.png")
    punycode = "https://*.xn--bcher-kva.example/"  # IDNA's form of a name that is not ASCII
    assert allows(punycode, "https://img.xn--bcher-kva.example/x.png")


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://cdn.example.com/img/a.png", True),
        ("https://cdn.example.com:443/img/a.png", True),  # the default port, spelt out
        ("https://ＣＤＮ.example.com/img/a.png", False),  # not ASCII: percent-encode, or IDNA's xn-- form for a host
        ("https://cdn.example.com/img/a b.png", False),
        ("https://[127.0.0.1]/img/a.png", False),  # urlsplit raised ValueError here: a 500
        ("https://[::1/img/a.png", False),
        ("https://" + "a" * 64 + ".cdn.example.com/img/a.png", False),  # a label too long: the lookup's thread failed
        ("https://cdn.example.com:18301:80/img/a.png", False),
        ("https://cdn.example.com./img/a.png", False),
        ("https://cdn.example.com:x/img/a.png", False),
        ("https://cdn.example.com/img/x/..;/../a", False),
        ("http://cdn.example.com/img/a.png", False),
        ("https://cdn.example.com@evil.example/img/a.png", False),
    ],
)
def test_a_url_is_checked_as_the_client_will_request_it(url, allowed):
    fetcher = ImageFetcher([parse_prefix("https://cdn.example.com/img/")], timeout=5, max_bytes=1000)
    if allowed:
        fetcher.check(url, "image")
    else:
        with pytest.raises(InvalidImage):
            fetcher.check(url, "image")


def test_a_slow_name_lookup_is_within_the_fetchs_deadline(fetching, origin, monkeypatch):
    """The host's lookup (getaddrinfo, which takes no timeout) ran outside the deadline: a slow resolver held the fetch
    and its decoding slot for as long as it took."""
    from qwen_image_server.serving import fetch

    real = fetch.socket.getaddrinfo

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(fetch.socket, "getaddrinfo", slow)
    response = fetching.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": f"{origin}/ok/blue.png"}})
    assert response.status_code == 400 and "could not be fetched within 0.5 s" in response.json()["error"]["message"]


def test_a_requests_fetches_share_one_deadline_and_stop_once_it_is_cancelled(fetching, origin):
    """Each image had a deadline of its own: a request of five URLs held its decoding slot five times the timeout, and
    its fetches went on one after the other after its client had left or the server's shutdown had cancelled it."""
    slowish = {"image_url": f"{origin}/ok/slowish.png"}  # 0.35 s each, against the 0.5 s of the fixture's timeout
    alone = fetching.client.post(EDITS, json={"prompt": "a hat", "image": slowish})
    assert alone.status_code == 200, alone.text[:300]
    both = fetching.client.post(EDITS, json={"prompt": "a hat", "image": slowish, "mask": slowish})
    assert both.status_code == 400 and "could not be fetched within 0.5 s" in both.json()["error"]["message"]

    _Images.hits.clear()
    stop = threading.Event()
    stop.set()
    with pytest.raises(InvalidImage, match="'image' was not fetched: the request was cancelled"):
        ImageFetcher([parse_prefix(f"{origin}/ok/")], 0.5, 400_000).fetch_all([(f"{origin}/ok/blue.png", "image")], stop)
    assert _Images.hits == []


def test_ca_certificates_that_cannot_be_read_stop_the_server_naming_them(monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="cannot be read from /nonexistent/ca.pem"):
        ImageFetcher([parse_prefix("https://cdn.example.com/img/")], 5, 1000)
    ImageFetcher([parse_prefix("http://cdn.example.com/img/")], 5, 1000)  # no https: no certificates read


def test_malformed_urls_are_told_so_in_words_of_this_server():
    fetcher = ImageFetcher([parse_prefix("https://cdn.example.com/img/")], 5, 1000)
    for url in ("https://[127.0.0.1]/img/a.png", "https://cdn.example.com:99999/img/a.png", "https://cdn.example.com:x/img/"):
        with pytest.raises(InvalidImage) as refused:
            fetcher.check(url, "image")
        assert str(refused.value) == "'image': the image URL has a malformed host or port", url


def test_the_metrics_count_each_url_by_outcome_and_the_bytes_fetched(make_api, origin):
    """qis_image_url_fetches_total{outcome}: fetched, refused before any fetch, or failed; qis_image_url_bytes_total."""
    from prometheus_client.parser import text_string_to_metric_families

    api = make_api(workers=1, image_url_prefixes=[f"{origin}/ok/"], image_url_timeout=2)

    def counted() -> dict:
        families = text_string_to_metric_families(api.client.get("/metrics").text)
        return {(s.name, s.labels.get("outcome")): s.value for f in families for s in f.samples if "image_url" in s.name}

    assert counted() == {
        ("qis_image_url_fetches_total", "fetched"): 0,
        ("qis_image_url_fetches_total", "refused"): 0,
        ("qis_image_url_fetches_total", "failed"): 0,
        ("qis_image_url_bytes_total", None): 0,
    }
    for path in ("/ok/blue.png", "/ok/red.png", "/private/blue.png", "/ok/missing.png"):
        api.client.post(EDITS, json={"prompt": "a hat", "image": {"image_url": origin + path}})
    counts = counted()
    assert counts[("qis_image_url_fetches_total", "fetched")] == 2
    assert counts[("qis_image_url_fetches_total", "refused")] == 1
    assert counts[("qis_image_url_fetches_total", "failed")] == 1
    assert counts[("qis_image_url_bytes_total", None)] == len(_Images.blue) + len(_Images.red)
