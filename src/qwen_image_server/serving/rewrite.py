"""Optional prompt rewriting through any OpenAI-compatible chat endpoint (seed 002).

A short prompt becomes the detailed description Qwen-Image does best with.
Bounded: one timeout per attempt and a fixed number of retries. Whatever goes
wrong (an error, a hang past the timeout, an empty or absurd answer), the
original prompt is used and a warning is logged: the image request itself
never fails because of the rewriter, and waits for it at most the attempts'
timeouts (20 s x 2 by default, before its task timeout starts). The API key is
sent in a header and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import logging
import re

import httpx

log = logging.getLogger(__name__)

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


class PromptRewriter:
    """Calls ``{base_url}/chat/completions``; ``rewrite`` always returns a usable prompt."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        *,
        timeout: float = 20.0,
        retries: int = 1,
        max_chars: int = 4000,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.max_chars = max_chars
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    async def close(self) -> None:
        await self._client.aclose()

    async def rewrite(self, prompt: str, *, edit: bool = False) -> str:
        """The rewritten prompt, or ``prompt`` itself when the chat model fails in any way."""
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
                response = await asyncio.wait_for(self._client.post(self.url, json=body), timeout=self.timeout)
                response.raise_for_status()
                return self._answer(response.json())
            except (httpx.HTTPError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
                reason = _describe(exc)
                if attempt < self.retries and _retryable(exc):
                    log.warning("prompt rewrite attempt %d failed (%s); retrying", attempt + 1, reason)
                    continue
                log.warning("prompt rewrite failed (%s); using the original prompt", reason)
                return prompt
        return prompt

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
        return text


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 409, 429) or exc.response.status_code >= 500
    return isinstance(exc, (httpx.TransportError, asyncio.TimeoutError))


def _describe(exc: BaseException) -> str:
    """A reason for the log that cannot contain the API key (no headers, no request dump)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
