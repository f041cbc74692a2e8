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


def test_a_compressed_answer_is_counted_as_it_is_inflated():
    """A gzip bomb (2 GiB of text in about a MiB) passed "1 MiB of an answer read at most": httpx inflated whole
    network chunks before the count, tens of MB each, on the event loop; six at once took the API process past a
    GiB. Inflated here, at most the bound past it; a plain gzip answer still serves."""
    import gzip
    import tracemalloc

    bomb = gzip.compress(b'{"choices": [{"message": {"content": "' + b"a" * (64 << 20) + b'"}}]}')

    def streamed(request):  # as a network answer comes: in chunks, not read before the client reads it
        async def chunks():
            for start in range(0, len(bomb), 16384):
                yield bomb[start : start + 16384]

        return httpx.Response(200, content=chunks(), headers={"Content-Encoding": "gzip"})

    tracemalloc.start()
    try:
        answer = asyncio.run(_rewriter(streamed, retries=0).rewrite("cat"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer == "cat" and peak < 16 << 20, peak  # not the 64 MiB it inflates to
    fine = gzip.compress(b'{"choices": [{"message": {"content": "A detailed cat."}}]}')
    assert asyncio.run(_rewriter(_answering(fine, headers={"Content-Encoding": "gzip"})).rewrite("cat")) == "A detailed cat."
    brotli = _answering(b"xx", headers={"Content-Encoding": "br"})
    assert asyncio.run(_rewriter(brotli, retries=0).rewrite("cat")) == "cat"


def test_a_reasoning_models_thinking_is_dropped_and_control_characters_refused():
    """A reasoning model behind vLLM or Ollama answers "<think>...</think>" before its answer: the whole of it became
    the prompt. Control characters (no prompt of a user's needs them from a rewriter) fall back to the prompt."""

    def answer(text):
        return lambda request: httpx.Response(200, json={"choices": [{"message": {"content": text}}]})

    thought = "<think>\nThe user wants a fox.\n</think>\n\nA vivid red fox in fresh snow."
    assert asyncio.run(_rewriter(answer(thought)).rewrite("fox")) == "A vivid red fox in fresh snow."
    for bad in ("<think>still thinking when the answer was cut", "a fox \x1b[31m in red", "a fox\x00", "a \x85 fox"):
        assert asyncio.run(_rewriter(answer(bad), retries=0).rewrite("fox")) == "fox", bad
    assert asyncio.run(_rewriter(answer("a fox\n\tin snow")).rewrite("fox")) == "a fox\n\tin snow"


def test_japanese_prompts_are_not_rewritten_in_chinese():
    """Kanji are CJK characters: a Japanese prompt got the Chinese system prompt (and came back in Chinese)."""
    assert not is_chinese("桜の木の下で猫が寝ている") and not is_chinese("カメラを持った猫")
    assert "in English" in system_prompt("桜の木の下で猫が寝ている", edit=False)
    assert is_chinese("樱花树下睡着一只猫")


def test_an_endpoints_error_message_is_logged_without_the_key(caplog):
    """A refused request was logged as "HTTP 400" alone: a model that takes no temperature failed every rewrite with
    no hint why. What the endpoint said is logged (one line, the key taken out where it repeats it)."""
    import logging

    said = {"error": {"message": "Unsupported value: 'temperature' for key\nkey (sk-key-123 invalid)", "type": "x"}}
    refusing = lambda request: httpx.Response(400, json=said)  # noqa: E731
    rewriter = PromptRewriter("http://chat/v1", "sk-key-123", "m", transport=httpx.MockTransport(refusing), retries=0)
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(rewriter.rewrite("cat")) == "cat"
    assert "prompt rewrite failed (HTTP 400: Unsupported value: 'temperature' for key key (*** invalid))" in caplog.text
    assert "sk-key-123" not in caplog.text


def test_a_model_that_takes_no_temperature_is_asked_again_without_one_and_from_then_on(caplog):
    """OpenAI's reasoning models refuse any temperature but their default with a 400: every rewrite failed (the
    original prompt served) for the 0.7 always sent. The refusal is now taken once: the same request goes again
    without it, within the same rewrite, and later ones leave it out."""
    import json
    import logging

    sent = []

    def reasoning_model(request):
        body = json.loads(request.content)
        sent.append(body)
        if "temperature" in body:
            error = {"message": "Unsupported value: 'temperature' does not support 0.7 with this model.", "param": "temperature"}
            return httpx.Response(400, json={"error": {**error, "type": "invalid_request_error", "code": "unsupported_value"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "A detailed cat."}}]})

    rewriter = PromptRewriter("http://chat/v1", "key", "o3-mini", transport=httpx.MockTransport(reasoning_model), retries=0)
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(rewriter.rewrite("cat")) == "A detailed cat."
        assert asyncio.run(rewriter.rewrite("dog")) == "A detailed cat."
    assert ["temperature" in body for body in sent] == [True, False, False]
    assert "o3-mini takes no temperature" in caplog.text and "using the original prompt" not in caplog.text
    # other refusals are not retried, the temperature kept
    refusing = lambda request: sent.append(request) or httpx.Response(400, json={"error": {"message": "bad model"}})  # noqa: E731
    sent.clear()
    other = PromptRewriter("http://chat/v1", "key", "m", transport=httpx.MockTransport(refusing), retries=3)
    assert asyncio.run(other.rewrite("cat")) == "cat" and len(sent) == 1 and other.temperature == 0.7


def test_an_api_key_no_header_can_carry_is_refused_or_left_out_and_credentials_in_the_url_are_said(caplog):
    """A non-ASCII OPENAI_API_KEY stopped the server with "'ascii' codec can't encode character", naming nothing,
    also with rewriting off (the variable may be another tool's). And credentials in OPENAI_BASE_URL are what httpx
    sends (Basic), not the key: said at start. httpcore's debug lines (host, port, headers) are off."""
    import logging

    import pytest

    from qwen_image_server.config import Settings
    from qwen_image_server.serving.rewrite import make_rewriter

    with pytest.raises(ValueError, match="OPENAI_API_KEY holds characters an HTTP header cannot carry"):
        make_rewriter(Settings(enable_prompt_rewrite=True, openai_api_key="sk-SECRET\u00a0KEY"))
    with caplog.at_level(logging.WARNING):
        other = make_rewriter(Settings(openai_api_key="sk-SECRET\u00e9KEY"))
        assert other is not None and "authorization" not in other._client.headers
        make_rewriter(Settings(openai_api_key="sk-x", openai_base_url="http://user:pass@chat/v1"))
    assert "OPENAI_API_KEY holds characters an HTTP header cannot carry (not printable ASCII): it is not sent" in caplog.text
    assert "OPENAI_BASE_URL holds credentials: they are sent (HTTP Basic) in place of OPENAI_API_KEY" in caplog.text
    assert "SECRET" not in caplog.text and "pass" not in caplog.text
    assert not logging.getLogger("httpcore").isEnabledFor(logging.DEBUG)


def test_a_malformed_ipv6_base_url_and_a_blank_model_name(monkeypatch):
    import pytest
    from pydantic import ValidationError

    from qwen_image_server.config import Settings

    with pytest.raises(ValidationError, match=r"OPENAI_BASE_URL \(with ENABLE_PROMPT_REWRITE\): 'http://\*\*\*@\[::1/v1'"):
        Settings(enable_prompt_rewrite=True, openai_base_url="http://user:pw@[::1/v1")
    monkeypatch.setenv("OPENAI_MODEL", "  ")
    assert Settings().openai_model == "gpt-4o-mini"  # blank: the default, as the key's and the URL's blank is unset
    monkeypatch.setenv("OPENAI_MODEL", " qwen3-8b\n")
    assert Settings().openai_model == "qwen3-8b"


def test_at_most_a_queues_worth_of_requests_to_a_model_wait_for_their_rewrite():
    """Requests were counted by the queue only once submitted, after their rewrite: any number waited in it (holding
    their decoded images, each sending its rewrite), then got 503 anyway. Past the bound: 503 at once."""
    import pytest

    from qwen_image_server.errors import QueueFull

    async def main() -> None:
        release = asyncio.Event()
        calls = []

        async def slow(request):
            calls.append(request)
            await release.wait()
            return httpx.Response(200, json={"choices": [{"message": {"content": "A detailed cat."}}]})

        rewriter = _rewriter(slow, retries=0)
        waiting = [asyncio.ensure_future(rewriter.rewrite_for("m", 2, "cat")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as refused:
            await rewriter.rewrite_for("m", 2, "cat")
        assert refused.value.headers["Retry-After"] == "20"  # a rewrite's timeout
        other = asyncio.ensure_future(rewriter.rewrite_for("other", 2, "cat"))  # another model's bound is its own
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.gather(*waiting, other) == ["A detailed cat."] * 3 and len(calls) == 3
        assert await rewriter.rewrite_for("m", 2, "cat") == "A detailed cat."  # room again

    asyncio.run(main())


def test_only_quotes_around_the_whole_answer_are_taken_off():
    """An unpaired quote at the answer's end was cut ('... & "quoted"' became '... & "quoted')."""

    def answer(text):
        return lambda request: httpx.Response(200, json={"choices": [{"message": {"content": text}}]})

    for given, used in [
        ('"A detailed cat."', "A detailed cat."),
        ("“A detailed cat.”", "A detailed cat."),
        ('A sign that reads "open"', 'A sign that reads "open"'),
        ('"open" reads the sign', '"open" reads the sign'),
    ]:
        assert asyncio.run(_rewriter(answer(given)).rewrite("cat")) == used
