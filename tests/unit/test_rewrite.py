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
