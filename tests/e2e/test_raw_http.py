"""What needs real HTTP on a real port: raw framing an HTTP client would normalise away, and Host headers."""

from __future__ import annotations

import http.client
import json
import socket

import httpx
import pytest

LIMIT = 25 * 1024 * 1024  # the default max_upload_bytes
GENERATIONS = "/v1/images/generations"


@pytest.mark.parametrize("raw_path", ["/images/../something", "/images/../../etc/passwd", "/images/./../pyproject.toml"])
def test_dot_segments_in_the_raw_path_are_404(server, raw_path):
    # httpx normalises dot segments away; send the path exactly as written.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", raw_path)
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 404
    assert set(body) == {"error", "detail", "request_id"} and body["detail"] == body["error"]["message"]


def test_chunked_body_with_any_spelling_of_the_header_is_413(server):
    """Header values are case-insensitive: ``Transfer-Encoding: Chunked`` is bounded like ``chunked``."""
    part = b" " * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: Chunked\r\nConnection: close\r\n\r\n"
        )
        try:  # the server answers and closes once the limit is passed: sending may then fail
            for _ in range(LIMIT // len(part) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, reply[:300]
    assert b"request_too_large" in reply


def test_image_urls_ignore_a_forged_host_header(server):
    http_client = httpx.Client(base_url=server.base_url, timeout=120)
    body = {"prompt": "a cat", "num_inference_steps": 2, "response_format": "url"}
    forged = http_client.post(GENERATIONS, json=body, headers={"host": "evil.example/phish?x="})
    assert forged.status_code == 200, forged.text[:300]
    url = forged.json()["data"][0]["url"]
    assert url.startswith(f"http://127.0.0.1:{server.port}/images/"), url
    plain = http_client.post(GENERATIONS, json=body, headers={"host": "images.example.com:8443"})
    assert plain.json()["data"][0]["url"].startswith("http://images.example.com:8443/images/")
    assert httpx.get(url, timeout=30).status_code == 200
