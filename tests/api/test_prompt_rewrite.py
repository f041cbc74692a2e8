"""Seed 002's prompt rewriting against a local OpenAI-compatible chat server started here.

The chat server's behaviour follows a marker in the prompt: an answer, an error,
a hang past the rewrite timeout, or garbage. Whatever it does, the image request
succeeds, with the rewritten prompt or the original one as ``revised_prompt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

API_KEY = "sk-test-secret-key-0123456789"


class ChatServer:
    """A minimal ``/v1/chat/completions`` that records what it receives."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                prompt = body["messages"][-1]["content"]
                if "[hang]" in prompt:
                    time.sleep(5)
                    return self._send(200, {"choices": [{"message": {"content": "too late"}}]})
                if "[error]" in prompt:
                    return self._send(500, {"error": {"message": "boom"}})
                if "[garbage]" in prompt:
                    return self._raw(200, b"<html>not json</html>")
                if "[empty]" in prompt:
                    return self._send(200, {"choices": [{"message": {"content": "   "}}]})
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"DETAILED: {prompt}"}}]})

            def _send(self, status, data):
                self._raw(status, json.dumps(data).encode())

            def _raw(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def chat():
    server = ChatServer()
    yield server
    server.close()


REWRITE = {"enable_prompt_rewrite": True, "openai_api_key": API_KEY, "openai_model": "local-chat", "rewrite_retries": 1}


@pytest.fixture(scope="module")
def rewriting_server(make_api, tiny_t2i, tiny_edit, chat):
    return make_api(
        {"tiny": tiny_t2i, "tiny-edit": tiny_edit}, openai_base_url=chat.base_url, rewrite_timeout=1.5, **REWRITE
    ).client


@pytest.fixture(scope="module")
def impatient_server(make_api, tiny_t2i, chat):
    """The same with a short rewrite timeout, for the chat server that hangs: two attempts wait 0.6 s, not 3."""
    return make_api({"tiny": tiny_t2i}, openai_base_url=chat.base_url, rewrite_timeout=0.3, **REWRITE).client


def _generate(client, prompt, **extra):
    r = client.post("/v1/images/generations", json={"prompt": prompt, "num_inference_steps": 2, **extra})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def test_prompt_is_rewritten_and_returned(rewriting_server, chat):
    chat.requests.clear()
    body = _generate(rewriting_server, "a cat", n=2)
    assert [d["revised_prompt"] for d in body["data"]] == ["DETAILED: a cat"] * 2
    (request,) = chat.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {API_KEY}"
    assert request["body"]["model"] == "local-chat"
    assert "in English" in request["body"]["messages"][0]["content"]
    assert body["usage"]["input_tokens_details"]["text_tokens"] == len("DETAILED: a cat")


def test_chinese_prompts_get_the_chinese_system_prompt(rewriting_server, chat):
    chat.requests.clear()
    body = _generate(rewriting_server, "一只可爱的小猫坐在花园里")
    assert body["data"][0]["revised_prompt"] == "DETAILED: 一只可爱的小猫坐在花园里"
    assert "中文" in chat.requests[0]["body"]["messages"][0]["content"]


def test_edit_instructions_get_their_own_system_prompt(rewriting_server, chat):
    import base64
    import io

    from PIL import Image

    chat.requests.clear()
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (1, 2, 3)).save(buf, format="PNG")
    r = rewriting_server.post(
        "/v1/images/edits",
        json={"image": base64.b64encode(buf.getvalue()).decode(), "prompt": "add a hat", "num_inference_steps": 2},
    )  # fmt: skip
    assert r.status_code == 200, r.text[:300]
    assert r.json()["data"][0]["revised_prompt"] == "DETAILED: add a hat"
    assert "image-editing model" in chat.requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("marker,attempts", [("[error]", 2), ("[hang]", 2), ("[garbage]", 1), ("[empty]", 1)])
def test_failures_fall_back_to_the_original_prompt(request, chat, marker, attempts):
    client = request.getfixturevalue("impatient_server" if marker == "[hang]" else "rewriting_server")
    chat.requests.clear()
    prompt = f"a dog {marker}"
    body = _generate(client, prompt)
    assert body["data"][0]["revised_prompt"] == prompt
    assert len(chat.requests) == attempts  # errors and timeouts are retried once; nonsense is not


def test_per_request_switch(rewriting_server, chat):
    chat.requests.clear()
    body = _generate(rewriting_server, "a fox", prompt_rewrite=False)
    assert body["data"][0]["revised_prompt"] == "a fox" and chat.requests == []


def test_api_key_never_logged(rewriting_server, caplog):
    caplog.set_level(logging.DEBUG)
    _generate(rewriting_server, "a bird [error]")
    logs = caplog.text
    assert "prompt rewrite failed" in logs
    assert API_KEY not in logs


def test_rewrite_requested_but_not_configured(api):
    r = api.client.post("/v1/images/generations", json={"prompt": "x", "prompt_rewrite": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_rewrite"
    # a variation needs no prompt: asking for a rewrite there is refused all the same
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(image, "PNG")
    files = {"image": ("a.png", image.getvalue(), "image/png")}
    r = api.client.post("/v1/images/variations", files=files, data={"prompt_rewrite": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_rewrite"
