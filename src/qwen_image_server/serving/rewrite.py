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
import math
import re
import zlib

import httpx

from ..config import Settings
from ..config_files import checked_base_url, header_safe
from ..errors import QueueFull

log = logging.getLogger(__name__)

#: Where rewrites go when ``OPENAI_BASE_URL`` is not set.
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

#: Bytes of a chat answer read at most: a rewritten prompt is a few KiB; an endpoint that sends more (a flood, a
#: body with no end) is cut off there instead of filling the API process's memory.
MAX_ANSWER_BYTES = 1 << 20
#: Seconds waited before a retry at most (the endpoint's ``Retry-After``, else a short pause).
MAX_PAUSE = 2.0

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
#: Japanese kana: a prompt with them is Japanese (its kanji are CJK characters too), rewritten in English.
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
#: A reasoning model's thinking before its answer (Qwen3, DeepSeek-R1 behind vLLM or Ollama), dropped from it.
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)
#: Control characters no rewritten prompt holds (tabs and line ends are kept).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

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
    """True when CJK characters make up a fair share of the letters of ``text``, and it has no kana (Japanese)."""
    if _KANA.search(text):
        return False
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
    if key is not None and not header_safe(key):
        # an HTTP header carries printable ASCII only: httpx's encoding error stopped the server, rewriting on or not
        unusable = "OPENAI_API_KEY holds characters an HTTP header cannot carry (not printable ASCII)"
        if settings.enable_prompt_rewrite:
            raise ValueError(f"{unusable}; prompt rewriting (ENABLE_PROMPT_REWRITE) needs a usable key")
        log.warning("%s: it is not sent; rewrites a request asks for go without it", unusable)
        key = None
    url: str | None = None
    try:
        url = checked_base_url(settings.openai_base_url or DEFAULT_OPENAI_BASE_URL)
    except ValueError as exc:
        # nothing is posted (nor the key sent) to a URL that cannot be the endpoint
        log.warning("prompt rewrites asked for will use their own prompt: OPENAI_BASE_URL %s", exc)
    if url is not None and key is not None and "@" in url.partition("://")[2].partition("/")[0]:
        log.warning("OPENAI_BASE_URL holds credentials: they are sent (HTTP Basic) in place of OPENAI_API_KEY")
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
        # httpx logs each request's URL at INFO, httpcore its host and port (and the answer's headers) at DEBUG: a
        # base URL may carry credentials (user:key@, ?api-key=)
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
        self._secret = api_key  # taken out of the endpoint's error messages before they are logged
        self._waiting: dict[str, int] = {}  # per model, the requests waiting for their rewrite (``rewrite_for``)
        #: Sent with each request until the model refuses it (OpenAI's reasoning models take only their default)
        self.temperature: float | None = 0.7

    async def close(self) -> None:
        await self._client.aclose()

    async def rewrite_for(self, model: str, bound: int, prompt: str, *, edit: bool = False) -> str:
        """``rewrite`` for a request to ``model``, of which at most ``bound`` (its queue size) wait for their rewrite
        at once; past that a ``QueueFull``, as a full queue answers. They hold their decoded images, and the queue
        counts a job only once it is submitted: requests piled up here uncounted (and each sent its rewrite)."""
        waiting = self._waiting.get(model, 0)
        if waiting >= bound:
            raise QueueFull(retry_after=min(60, max(1, math.ceil(self.timeout))))
        self._waiting[model] = waiting + 1
        try:
            return await self.rewrite(prompt, edit=edit)
        finally:
            self._waiting[model] -= 1

    async def rewrite(self, prompt: str, *, edit: bool = False) -> str:
        """The rewritten prompt, or ``prompt`` itself when the chat model fails in any way."""
        if self.url is None:
            log.warning("prompt rewrite asked for, but OPENAI_BASE_URL cannot be used (said at start); using the original prompt")
            return prompt
        body: dict[str, object] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system_prompt(prompt, edit=edit)},
                {"role": "user", "content": prompt},
            ],
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        attempt = 0
        while True:
            try:
                # The client timeout bounds each phase; this bounds the whole attempt.
                return self._answer(await asyncio.wait_for(self._post(body), timeout=self.timeout))
            except Exception as exc:  # whatever goes wrong, the original prompt serves
                reason = _describe(exc, self._secret)
                if "temperature" in body and _refuses_temperature(exc):
                    log.warning("prompt rewrite: %s takes no temperature (%s); sent without it from now on", self.model, reason)
                    self.temperature = None
                    del body["temperature"]
                    continue
                if attempt < self.retries and _retryable(exc):
                    log.warning("prompt rewrite attempt %d failed (%s); retrying", attempt + 1, reason)
                    await asyncio.sleep(_pause(exc, attempt))
                    attempt += 1
                    continue
                log.warning("prompt rewrite failed (%s); using the original prompt", reason)
                return prompt

    async def _post(self, body: dict) -> dict:
        """The endpoint's answer as JSON, read up to ``MAX_ANSWER_BYTES``: counted as it is decompressed (httpx
        inflated a whole network chunk before the count: a gzip bomb took the API process past a GiB, on its event
        loop); an error's first bytes are kept for the log (``_describe``)."""
        assert self.url is not None  # (``rewrite`` posts only where there is a URL)
        async with self._client.stream("POST", self.url, json=body, headers={"Accept-Encoding": "gzip, identity"}) as response:
            if response.is_error:
                detail = await _read(response, 2048)
                try:
                    response.raise_for_status()
                except httpx.HTTPStatusError as exc:
                    exc.qis_detail = detail  # type: ignore[attr-defined]
                    raise
            read = await _read(response, MAX_ANSWER_BYTES)
        return json.loads(read)

    def _answer(self, data: dict) -> str:
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("the answer has no text")
        text = _THINKING.sub("", content)
        if "<think>" in text:
            raise ValueError("the answer is a reasoning model's thinking, without its end")
        text = text.strip()
        if len(text) > 1 and (text[0], text[-1]) in (('"', '"'), ("“", "”")):  # the answer in quotes: a pair only
            text = text[1:-1].strip()  # (an unpaired quote at the end was cut: '... & "quoted"' lost its last one)
        if not text:
            raise ValueError("the answer is empty")
        if _CONTROL.search(text):
            raise ValueError("the answer holds control characters")
        if len(text) > self.max_chars:
            raise ValueError(f"the answer is longer than {self.max_chars} characters")
        if not any(ch.isalpha() for ch in text):
            raise ValueError("the answer has no words")
        text.encode("utf-8")  # UnicodeEncodeError for a lone surrogate ("\ud800" in JSON), which no prompt may hold
        return text


def _refuses_temperature(exc: BaseException) -> bool:
    """A 400 whose error names ``temperature``: OpenAI's reasoning models (o1, o3, gpt-5) refuse any but their
    default ("Unsupported value: 'temperature' does not support 0.7 with this model")."""
    if not isinstance(exc, httpx.HTTPStatusError) or exc.response.status_code not in (400, 422):
        return False
    return "temperature" in getattr(exc, "qis_detail", b"").decode("utf-8", "replace").lower()


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


async def _read(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of ``response``'s body, inflated here when it is gzip- or deflate-encoded (every
    inflated byte counted: ``ValueError`` past ``limit``); another encoding is a ``ValueError``."""
    if response.is_stream_consumed:  # a body already read into memory (a transport that answers from memory)
        if len(response.content) > limit:
            raise ValueError(f"the answer is larger than {limit} bytes")
        return response.content
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        raise ValueError(f"the answer is {encoding}-encoded")
    inflate = zlib.decompressobj(wbits=47) if encoding not in ("", "identity") else None  # 47: a gzip or zlib header
    read = bytearray()
    async for chunk in response.aiter_raw():
        if inflate is not None:
            chunk = inflate.decompress(chunk, limit + 1 - len(read))
        read += chunk
        if len(read) > limit or (inflate is not None and inflate.unconsumed_tail):
            if limit < MAX_ANSWER_BYTES:  # an error's first bytes: enough
                return bytes(read[:limit])
            raise ValueError(f"the answer is larger than {limit} bytes")
    return bytes(read)


def _describe(exc: BaseException, secret: str | None = None) -> str:
    """A reason for the log that cannot contain the API key (no headers, no request dump; the key taken out of what
    the endpoint said)."""
    if isinstance(exc, httpx.HTTPStatusError):
        said = _error_message(getattr(exc, "qis_detail", b""))
        if said and secret:
            said = said.replace(secret, "***")
        return f"HTTP {exc.response.status_code}" + (f": {said}" if said else "")
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def _error_message(body: bytes) -> str:
    """What an error answer says (OpenAI's ``{"error": {"message": ...}}``, a ``detail``, or its text), on one line of
    at most 200 printable characters (a model that refuses ``temperature``, say)."""
    text = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(text)
        error = data.get("error") if isinstance(data, dict) else None
        found = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else data.get("detail")
        if found is not None:
            text = str(found)
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text[:200] + ("..." if len(text) > 200 else "")
