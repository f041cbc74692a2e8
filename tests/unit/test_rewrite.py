"""The rewriter on its own, with httpx's mock transport."""

import asyncio

import httpx

from qwen_image_server.serving.rewrite import PromptRewriter, is_chinese, system_prompt


def test_language_detection():
    assert is_chinese("一只可爱的小猫") and is_chinese("a 小猫 坐在花园里")
    assert not is_chinese("a cat on a sofa") and not is_chinese("a cat named 猫 sitting on a big red sofa")
    assert "中文" in system_prompt("小猫", edit=False) and "中文" in system_prompt("加一顶帽子", edit=True)
    assert "image-editing" in system_prompt("add a hat", edit=True)


def _rewriter(handler, **kw):
    return PromptRewriter("http://chat/v1", "key", "m", transport=httpx.MockTransport(handler), **kw)


def test_answer_and_fallbacks():
    calls = []

    def answer(text):
        def handler(request):
            calls.append(request)
            return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})

        return handler

    assert asyncio.run(_rewriter(answer('"A detailed cat."')).rewrite("cat")) == "A detailed cat."
    assert asyncio.run(_rewriter(answer("x" * 50), max_chars=10).rewrite("cat")) == "cat"
    assert asyncio.run(_rewriter(answer("!!! 123")).rewrite("cat")) == "cat"
    assert calls[0].headers["authorization"] == "Bearer key"


def test_client_errors_are_not_retried():
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(401, json={"error": "bad key"})

    assert asyncio.run(_rewriter(handler, retries=3).rewrite("cat")) == "cat"
    assert len(calls) == 1


def _answering(content: bytes, status: int = 200, headers: dict | None = None, calls: list | None = None):
    def handler(request):
        if calls is not None:
            calls.append(request)
        return httpx.Response(status, content=content, headers=headers)

    return handler


def test_any_answer_that_cannot_be_used_falls_back_to_the_prompt():
    """ "Whatever goes wrong, the original prompt is used": nesting too deep for the JSON parser (a 500 before), a lone
    surrogate that no tokenizer takes (a 500 at the text encoder: the request's own prompt is refused for it with a
    400), an answer larger than ``MAX_ANSWER_BYTES`` (read whole before), and an error of any other kind."""
    from qwen_image_server.serving import rewrite

    deep = b"[" * 100_000 + b"]" * 100_000
    surrogate = b'{"choices": [{"message": {"content": "a cat \\ud800 on a mat"}}]}'
    flood = b'{"choices": [{"message": {"content": "' + b"a" * (rewrite.MAX_ANSWER_BYTES + 1) + b'"}}]}'
    for content in (deep, surrogate, flood):
        assert asyncio.run(_rewriter(_answering(content), max_chars=10**7, retries=0).rewrite("cat")) == "cat"

    def broken(request):
        raise RuntimeError("a bug in a transport")

    assert asyncio.run(_rewriter(broken, retries=0).rewrite("cat")) == "cat"


def test_a_retry_waits_for_retry_after_up_to_a_bound(monkeypatch):
    from qwen_image_server.serving import rewrite

    pauses: list[float] = []

    async def sleep(seconds):
        pauses.append(seconds)

    monkeypatch.setattr(rewrite.asyncio, "sleep", sleep)
    calls: list = []
    busy = _answering(b"{}", 429, {"Retry-After": "1"}, calls)
    assert asyncio.run(_rewriter(busy, retries=2).rewrite("cat")) == "cat"
    assert len(calls) == 3 and pauses == [1.0, 1.0]
    pauses.clear()
    assert asyncio.run(_rewriter(_answering(b"{}", 503, {"Retry-After": "3600"}), retries=1).rewrite("cat")) == "cat"
    assert pauses == [rewrite.MAX_PAUSE]
    pauses.clear()
    assert asyncio.run(_rewriter(_answering(b"{}", 500), retries=2).rewrite("cat")) == "cat"
    assert pauses == [0.5, 1.0]


def test_httpx_does_not_log_the_urls_it_posts_to():
    """httpx logs each request's URL at INFO; a base URL may hold credentials (``https://user:key@host/v1``)."""
    import logging

    httpx_log = logging.getLogger("httpx")
    httpx_log.setLevel(logging.DEBUG)  # as under --log-level debug
    try:
        _rewriter(_answering(b"{}"))
        assert not httpx_log.isEnabledFor(logging.INFO)
    finally:
        httpx_log.setLevel(logging.NOTSET)


def test_a_base_url_the_rewriter_cannot_post_to_is_refused_at_start_when_rewriting_is_on(caplog):
    """With ENABLE_PROMPT_REWRITE, an OPENAI_BASE_URL the rewriter cannot post to is refused at start (a trailing
    newline made every request a 500). Without it the variable may be another tool's: a bad one is logged at start
    and the rewrites a request asks for use its own prompt; a blank one is unset (compose's ``${VAR:-}``)."""
    import logging

    import pytest
    from pydantic import ValidationError

    from qwen_image_server.config import Settings
    from qwen_image_server.serving.rewrite import DEFAULT_OPENAI_BASE_URL, make_rewriter

    on = {"enable_prompt_rewrite": True}
    assert Settings(openai_base_url="http://127.0.0.1:8001/v1\n", **on).openai_base_url == "http://127.0.0.1:8001/v1"
    for url, says in [
        ("localhost:8000/v1", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://chat:eighty/v1", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://chat/v1\nx", "it holds spaces or control characters"),
        ("http://chat/v1?api-version=1", "a query or fragment would hold /chat/completions"),
    ]:
        with pytest.raises(ValidationError, match=f"OPENAI_BASE_URL \\(with ENABLE_PROMPT_REWRITE\\): .* {says}"):
            Settings(openai_base_url=url, **on)
    assert make_rewriter(Settings(openai_base_url="  ")) is None  # blank: unset, no rewriter
    assert make_rewriter(Settings(openai_base_url=" ", **on)).url == DEFAULT_OPENAI_BASE_URL + "/chat/completions"
    caplog.set_level(logging.WARNING)
    other = make_rewriter(Settings(openai_base_url="http://user:pw@chat/v1?api-key=K", openai_api_key="sk-x"))
    assert other is not None and other.url is None  # another tool's: said at start, and never posted to
    assert asyncio.run(other.rewrite("cat")) == "cat"
    assert "prompt rewrites asked for will use their own prompt: OPENAI_BASE_URL 'http://***@chat/v1?***'" in caplog.text
    assert "pw" not in caplog.text and "api-key=K" not in caplog.text
    assert make_rewriter(Settings(openai_api_key=" ")) is None  # a blank key is no key
