"""The playground page as the browser tests drive it (tests/e2e/test_playground.py): where Chromium is, opening the
page with the API key, reading back what it shows and what it sends, and waiting on the page and the server."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

KEY = "sk-playground-e2e"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SUBMIT = "#{} button[type=submit]"


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}; CI must run the browser tests")
    pytest.skip(what)


def chromium_path() -> str | None:
    configured = os.environ.get("QIS_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return next((path for path in ("/usr/bin/chromium", shutil.which("chromium")) if path and Path(path).is_file()), None)


def missing_piece() -> str | None:
    """What the browser tests lack to run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; the test extra has it)"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install chromium, or set QIS_CHROMIUM to a Chromium binary)"
    return None


def open_page(context, url: str, viewport: dict | None = None):
    """A new page at ``url`` with the API key given (typed into its field the first time); its error list."""
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    if not page.input_value("#api-key"):
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # "change" stores it and loads the models
    page.locator("#server-status[data-state=ready]").wait_for()
    return page, errors


def shown_image(page, selector: str) -> Image.Image:
    """The image an <img> shows (a blob: URL made by the page), read back through the page."""
    data_url = page.eval_on_selector(
        selector,
        """async (img) => {
            const blob = await (await fetch(img.src)).blob();
            return await new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });
        }""",
    )
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def record_form_data(page) -> None:
    """Keep the fields of every multipart body the page sends in ``window.sent`` (Chromium does not hand
    Playwright bodies that hold files): {name: text, or [base64 of the file]}, and the names in order."""
    page.evaluate(
        """() => { window.sent = []; const send = window.fetch;
        window.fetch = async (url, options = {}) => {
            if (options.body instanceof FormData) {
                const fields = {}, names = [];
                for (const [name, value] of options.body.entries()) {
                    names.push(name);
                    if (!(value instanceof Blob)) { fields[name] = value; continue; }
                    const data = await new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(value); });
                    fields[name] = [data.split(",", 2)[1]];
                }
                window.sent.push({ url: String(url), fields, names });
            }
            return send(url, options);
        }; }"""
    )


def sent_form(page) -> dict:
    """The fields of the last multipart body the page sent (files as bytes)."""
    sent = page.evaluate("window.sent")
    assert sent, "the page sent no multipart request"
    return {name: base64.b64decode(v[0]) if isinstance(v, list) else v for name, v in sent[-1]["fields"].items()}


def t2i_status(server) -> dict:
    return httpx.get(server.base_url + "/ready", timeout=5).json()["models"]["qwen-image-tiny"]


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def is_idle(status: dict) -> bool:
    return status["queued_jobs"] == 0 and all(worker["state"] == "idle" for worker in status["workers"])


def fill_generate(page, prompt: str, steps: int, previews: int = 0) -> None:
    page.click("nav [data-tab=generate]")
    page.fill("#generate [name=prompt]", prompt)
    page.fill("#generate [name=num_inference_steps]", str(steps))
    page.select_option("#generate [name=partial_images]", str(previews))


def wait_done(page) -> None:
    """Wait for the run to end (the page has no eval under its CSP: no wait_for_function)."""
    page.locator(",".join(f".run-state[data-state={s}]" for s in ("done", "failed", "cancelled"))).wait_for(state="attached")
    assert page.get_attribute(".run-state", "data-state") == "done", page.inner_text(".run-text")
