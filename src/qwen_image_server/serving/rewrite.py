"""Optional prompt rewriting through any OpenAI-compatible chat endpoint (seed 002).

A short prompt becomes the detailed description Qwen-Image does best with.
Bounded: one timeout per attempt, a fixed number of retries (after a short pause, or
the endpoint's ``Retry-After`` up to ``MAX_PAUSE``), and at most ``MAX_ANSWER_BYTES``
read of an answer. Whatever goes wrong (an error, a hang past the timeout, an empty,
absurd, oversized or unreadable answer), the original prompt is used and a warning is
logged: the image request itself never fails because of the rewriter, and waits for it
at most the attempts' timeouts and pauses (20 s x 2 by default, before its task timeout
starts). The API key is sent in a header and never logged or echoed; httpx's own log
of each request (its URL, which may hold credentials) is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

import httpx

from ..config import Settings
from ..config_files import checked_base_url

log = logging.getLogger(__name__)

#: Where rewrites go when ``OPENAI_BASE_URL`` is not set.
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

#: Bytes of a chat answer read at most: a rewritten prompt is a few KiB; an endpoint that sends more (a flood, a
#: body with no end) is cut off there instead of filling the API process's memory.
MAX_ANSWER_BYTES = 1 << 20
#: Seconds waited before a retry at most (the endpoint's ``Retry-After``, else a short pause).
MAX_PAUSE = 2.0

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

SYSTEM_PROMPT_EN = """You rewrite prompts for a text-to-image model (Qwen-Image).
Turn the user's prompt into one detailed, vivid description of the image, in English:
the main subject and its appearance, the setting and background, composition and
camera angle, lighting, colours, mood and style. Keep every element the user asked
for and add nothing that contradicts it. Any text that must appear in the image is
kept exactly, in quotation marks. Answer with the rewritten prompt only: no preamble,
no explanation, no lists, at most 200 words."""

SYSTEM_PROMPT_ZH = """你负责为文生图模型（Qwen-Image）改写提示词。
请把用户的提示词扩写成一段详细、生动的中文画面描述：主体及其外观、场景与背景、
构图与视角、光线、色彩、氛围和风格。保留用户要求的所有元素，不要添加与之矛盾的内容。
画面中需要出现的文字请原样保留并加引号。只输出改写后的提示词，不要任何解释、前言或列表，
不超过300字。"""

SYSTEM_PROMPT_EDIT_EN = """You rewrite instructions for an image-editing model (Qwen-Image-Edit).
Turn the user's instruction into one precise, explicit editing instruction in English:
say exactly what to change (add, remove, replace, restyle), where in the image, and how
it should look, and say that everything else stays unchanged. Text to be written in the
image is kept exactly, in quotation marks. Answer with the rewritten instruction only,
at most 120 words."""

SYSTEM_PROMPT_EDIT_ZH = """你负责为图像编辑模型（Qwen-Image-Edit）改写编辑指令。
请把用户的指令改写成一条明确、具体的中文编辑指令：说明要修改什么（添加、删除、替换、改变风格）、
在图像中的位置、修改后的样子，并说明其余部分保持不变。需要写入图像的文字请原样保留并加引号。
只输出改写后的指令，不超过150字。"""


def is_chinese(text: str) -> bool:
    """True when CJK characters make up a fair share of the letters of ``text``."""
    cjk = len(_CJK.findall(text))
    letters = sum(ch.isalpha() for ch in text)
    return cjk > 0 and cjk >= 0.2 * max(letters, 1)


def system_prompt(prompt: str, *, edit: bool) -> str:
    chinese = is_chinese(prompt)
    if edit:
        return SYSTEM_PROMPT_EDIT_ZH if chinese else SYSTEM_PROMPT_EDIT_EN
    return SYSTEM_PROMPT_ZH if chinese else SYSTEM_PROMPT_EN


def make_rewriter(settings: Settings) -> PromptRewriter | None:
    """The server's rewriter when any of ``ENABLE_PROMPT_REWRITE``, ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` is set
    (a request may then ask for rewriting), else None. A base URL it cannot post to is said at start (refused then
    with ``ENABLE_PROMPT_REWRITE``: ``Settings``); rewrites asked for then fall back to the request's prompt."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None  # (blank: None, Settings)
    if not (settings.enable_prompt_rewrite or key is not None or settings.openai_base_url is not None):
        return None
    url: str | None = None
    try:
        url = checked_base_url(settings.openai_base_url or DEFAULT_OPENAI_BASE_URL)
    except ValueError as exc:
        # nothing is posted (nor the key sent) to a URL that cannot be the endpoint
        log.warning("prompt rewrites asked for will use their own prompt: OPENAI_BASE_URL %s", exc)
    return PromptRewriter(
        url,
        key,
        settings.openai_model,
        timeout=settings.rewrite_timeout,
        retries=settings.rewrite_retries,
        max_chars=settings.max_prompt_chars,
    )


class PromptRewriter:
    """Calls ``{base_url}/chat/completions``; ``rewrite`` always returns a usable prompt."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        model: str,
        *,
        timeout: float = 20.0,
        retries: int = 1,
        max_chars: int = 4000,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions" if base_url is not None else None  # None: never posts
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.max_chars = max_chars
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)
        # httpx logs each request's URL at INFO: a base URL may carry credentials (user:key@, ?api-key=).
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").getEffectiveLevel()))

    async def close(self) -> None:
        await self._client.aclose()

    async def rewrite(self, prompt: str, *, edit: bool = False) -> str:
        """The rewritten prompt, or ``prompt`` itself when the chat model fails in any way."""
        if self.url is None:
            log.warning("prompt rewrite asked for, but OPENAI_BASE_URL cannot be used (said at start); using the original prompt")
            return prompt
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system_prompt(prompt, edit=edit)},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0.7,
        }
        for attempt in range(self.retries + 1):
            try:
                # The client timeout bounds each phase; this bounds the whole attempt.
                return self._answer(await asyncio.wait_for(self._post(body), timeout=self.timeout))
            except Exception as exc:  # whatever goes wrong, the original prompt serves
                reason = _describe(exc)
                if attempt < self.retries and _retryable(exc):
                    log.warning("prompt rewrite attempt %d failed (%s); retrying", attempt + 1, reason)
                    await asyncio.sleep(_pause(exc, attempt))
                    continue
                log.warning("prompt rewrite failed (%s); using the original prompt", reason)
                return prompt
        return prompt

    async def _post(self, body: dict) -> dict:
        """The endpoint's answer as JSON, read up to ``MAX_ANSWER_BYTES``."""
        assert self.url is not None  # (``rewrite`` posts only where there is a URL)
        async with self._client.stream("POST", self.url, json=body) as response:
            response.raise_for_status()
            read = bytearray()
            async for chunk in response.aiter_bytes():
                read += chunk
                if len(read) > MAX_ANSWER_BYTES:
                    raise ValueError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
        return json.loads(bytes(read))

    def _answer(self, data: dict) -> str:
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("the answer has no text")
        text = content.strip().strip('"“”').strip()
        if not text:
            raise ValueError("the answer is empty")
        if len(text) > self.max_chars:
            raise ValueError(f"the answer is longer than {self.max_chars} characters")
        if not any(ch.isalpha() for ch in text):
            raise ValueError("the answer has no words")
        text.encode("utf-8")  # UnicodeEncodeError for a lone surrogate ("\ud800" in JSON), which no prompt may hold
        return text


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 409, 429) or exc.response.status_code >= 500
    return isinstance(exc, (httpx.TransportError, asyncio.TimeoutError))


def _pause(exc: BaseException, attempt: int) -> float:
    """Seconds before the next attempt: the endpoint's ``Retry-After`` (in seconds), else 0.5 s more per attempt;
    ``MAX_PAUSE`` at most."""
    if isinstance(exc, httpx.HTTPStatusError):
        with contextlib.suppress(ValueError):
            return min(MAX_PAUSE, max(0.0, float(exc.response.headers.get("retry-after", ""))))
    return min(MAX_PAUSE, 0.5 * (attempt + 1))


def _describe(exc: BaseException) -> str:
    """A reason for the log that cannot contain the API key (no headers, no request dump)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
