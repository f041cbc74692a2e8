"""The playground in a real headless Chromium (Playwright driving Debian's ``chromium``) against a real server.

They run against the shared tiny server (no extra server start). The page is given
an API key in its field, which it must send with every call (the server's side of
keys, and the page loading without one, are in tests/unit/test_playground.py). A
screenshot of each step goes to the test's tmp folder. Without playwright or
chromium these tests are skipped with the missing piece named, except under CI
(``CI`` set), where they fail instead.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playground_page import (  # tests/e2e/playground_page.py (pytest puts the test's folder on sys.path)
    CHROMIUM_ARGS,
    KEY,
    SUBMIT,
    chromium_path,
    fill_generate,
    is_idle,
    missing,
    missing_piece,
    open_page,
    record_form_data,
    sent_form,
    shown_image,
    t2i_status,
    wait_done,
    wait_for,
)

MISSING = missing_piece()
# Skipped before any fixture starts the shared server; under CI the browser fixture fails instead.
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=str(MISSING))]


@pytest.fixture(scope="module")
def browser():
    if MISSING is not None:
        missing(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def context(browser, server):
    """One browser profile for the module: the key typed in the first test stays in its local storage."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context, server):
    page, errors = open_page(context, server.base_url + "/")
    yield page
    page.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.fixture
def shot(page, tmp_path):
    """``shot(name)``: a screenshot of the page into the test's tmp folder, with QIS_TEST_SCREENSHOTS=1 (to look at
    the page by hand; no test reads them, and each full-page screenshot costs the browser CPU)."""

    def take(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        if os.environ.get("QIS_TEST_SCREENSHOTS"):
            page.screenshot(path=path, full_page=True)
        return path

    return take


def test_generate_shows_live_previews_before_the_image(page, shot):
    # What appears in the output panel, in order: previews (the strip) and results.
    page.evaluate(
        """() => { window.seen = []; window.texts = [];
        new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes) {
            window.seen.push(r.target.className); if (r.target.className === 'run-text') window.texts.push(n.textContent); }
        }).observe(document.querySelector('.output'), {childList: true, subtree: true}); }"""
    )
    fill_generate(page, "a red fox in the snow", steps=8, previews=3)
    page.fill("#generate [name=seed]", "7")
    shot("1-form")
    with page.expect_request("**/v1/images/generations") as request:
        page.click(SUBMIT.format("generate"))
    assert request.value.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(request.value.post_data)
    assert body["model"] == "qwen-image-tiny"
    assert body["stream"] is True and body["partial_images"] == 3
    assert (body["width"], body["height"], body["seed"], body["num_inference_steps"]) == (256, 256, 7, 8)
    page.wait_for_selector(".previews img")
    shot("2-preview")
    wait_done(page)
    shot("3-done")
    seen = page.evaluate("window.seen")
    assert "previews" in seen and "results" in seen
    assert seen.index("previews") < seen.index("results"), seen
    assert page.locator(".previews img").count() == 3
    texts = page.evaluate("window.texts")
    assert any("step 6 of 8" in text for text in texts), texts  # the last preview comes after step 6 of 8
    image = shown_image(page, ".results img")
    assert image.size == (256, 256) and image.format == "PNG"
    assert "seed 7" in page.inner_text(".result-info")


def test_edit_with_a_painted_mask_changes_only_the_masked_region(page, shot, tmp_path):
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    source = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    Image.fromarray(source).save(tmp_path / "input.png")
    record_form_data(page)
    page.click("nav [data-tab=edit]")
    page.set_input_files("#edit input[type=file]", str(tmp_path / "input.png"))
    canvas = page.wait_for_selector(".mask-paint")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    for fx, fy in ((0.4, 0.2), (0.4, 0.3), (0.15, 0.3), (0.15, 0.4), (0.4, 0.4)):
        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, steps=5)
    page.mouse.up()
    page.fill("#edit [name=prompt]", "a full moon")
    page.fill("#edit [name=num_inference_steps]", "4")
    page.select_option("#edit [name=partial_images]", "1")
    shot("1-painted")
    with page.expect_request("**/v1/images/edits") as request:
        page.click(SUBMIT.format("edit"))
    assert request.value.headers["content-type"].startswith("multipart/form-data")
    parts = sent_form(page)
    assert "mask" in parts and parts["stream"] == "true" and parts["prompt"] == "a full moon"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(parts["image"])).convert("RGB")), source)
    mask = np.asarray(Image.open(io.BytesIO(parts["mask"])).convert("RGBA"))[:, :, 3]
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}  # OpenAI's convention: transparent = edit
    edited = mask == 0
    rows, cols = np.nonzero(edited)
    assert rows.min() < 0.25 * 256 and rows.max() < 0.55 * 256 and cols.max() < 0.55 * 256  # where the strokes went
    assert edited.mean() > 0.05
    wait_done(page)
    page.wait_for_selector(".viewer .compare")  # before / after
    page.fill(".compare-slider", "80")
    shot("2-result")
    result = np.asarray(shown_image(page, ".results img").convert("RGB"))
    assert result.shape == source.shape
    assert np.array_equal(result[~edited], source[~edited]), "pixels outside the mask changed"
    assert (np.abs(result[edited].astype(int) - source[edited]).sum(axis=-1) > 0).mean() > 0.5


def test_vary_and_edit_a_result_with_several_images(page, shot, tmp_path):
    record_form_data(page)
    fill_generate(page, "a lighthouse", steps=4)
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    made = shown_image(page, ".results img")
    page.click(".result-actions [data-action=vary]")
    assert page.locator("#variations .thumbs img").count() == 1
    page.fill("#variations [name=strength]", "0.5")
    page.fill("#variations [name=num_inference_steps]", "4")
    page.select_option("#variations [name=partial_images]", "1")
    page.click(SUBMIT.format("variations"))
    wait_done(page)
    sent = sent_form(page)
    assert sent["strength"] == "0.5" and sent["model"] == "qwen-image-tiny"
    assert Image.open(io.BytesIO(sent["image"])).tobytes() == made.tobytes()
    shot("1-variation")
    # Images decode slowly (a large upload): the mask of the first image is still being made when the second comes.
    page.evaluate(
        """() => { const decode = window.createImageBitmap; window.decoding = [];
        window.createImageBitmap = (...args) => { const done = new Promise((r) => setTimeout(r, 300)).then(() => decode(...args));
            window.decoding.push(done); return done; }; }"""
    )
    page.click(".result-actions [data-action=edit]")
    first_input = shown_image(page, "#edit .thumbs img")  # the variation's result
    page.select_option("#edit [name=model]", "qwen-image-edit-plus-tiny")
    Image.new("RGB", (256, 256), (200, 30, 30)).save(tmp_path / "second.png")
    page.set_input_files("#edit input[type=file]", str(tmp_path / "second.png"))
    assert page.locator("#edit .thumbs img").count() == 2
    page.evaluate("() => Promise.all(window.decoding)")
    # the mask is the first image's, with several too (the server applies it to the first, as OpenAI's does): a
    # second image added keeps it (it said "a mask works with one image" and sent none)
    canvas = page.wait_for_selector("#edit .mask-paint")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    page.fill("#edit [name=prompt]", "both together")
    page.fill("#edit [name=num_inference_steps]", "4")
    page.click(SUBMIT.format("edit"))
    wait_done(page)
    sent = page.evaluate("window.sent")[-1]
    assert sent["names"].count("image[]") == 2 and sent["names"].count("mask") == 1
    assert sent["fields"]["model"] == "qwen-image-edit-plus-tiny"
    result = np.asarray(shown_image(page, ".results img").convert("RGB"))
    assert result.shape == (made.height, made.width, 3)  # the first image's size
    # the slider compares the result with the image the mask edited, the first (it showed the last one added)
    assert shown_image(page, "img.before").convert("RGB").tobytes() == first_input.convert("RGB").tobytes()
    shot("2-edit-plus")


def test_cancel_stops_the_job_on_the_server(page, shot, server):
    """A running job is one at a time (the forms' buttons and the history's re-runs are off while it runs), and its
    cancel stops it on the server, which then serves the next (a re-run)."""
    from playwright.sync_api import expect

    fill_generate(page, "a short job first", steps=4)
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    rerun = page.locator(".history-item").first.locator("[data-action=rerun]")
    rerun.wait_for(state="attached")
    wait_for(lambda: is_idle(t2i_status(server)), "the shared server to be idle")
    fill_generate(page, "a very long job", steps=900)
    page.click(SUBMIT.format("generate"))
    wait_for(lambda: any(w["state"] == "busy" for w in t2i_status(server)["workers"]), "the job to run")
    shot("1-running")
    expect(rerun).to_be_disabled()
    for tab in ("generate", "edit", "variations"):
        expect(page.locator(SUBMIT.format(tab))).to_be_disabled()
    stopped_before = server.logs(tail=None).count("stopped after")
    page.click(".cancel")
    page.locator(".run-state[data-state=cancelled]").wait_for()
    shot("2-cancelled")
    wait_for(lambda: server.logs(tail=None).count("stopped after") > stopped_before, "the server to log the task as stopped")
    assert is_idle(t2i_status(server)), "the cancelled job still holds a worker"
    expect(page.locator(SUBMIT.format("generate"))).to_be_enabled()
    page.click("nav [data-tab=history]")
    with page.expect_request("**/v1/images/generations") as request:
        rerun.click()
    assert json.loads(request.value.post_data)["prompt"] == "a short job first"
    wait_done(page)
    shot("3-rerun")


def test_an_over_limit_size_is_shown_next_to_the_size_field(page, shot):
    fill_generate(page, "too wide", steps=4)
    page.fill("#generate [name=width]", "4096")
    page.click(SUBMIT.format("generate"))
    error = page.locator("#generate .size-field .error")
    error.wait_for()
    assert "width and height must be between 256 and 2048, got 4096x256" in error.inner_text()
    assert "invalid" in page.get_attribute("#generate .size-field", "class")
    assert page.get_attribute(".run-state", "data-state") == "failed"
    shot("1-error")


def test_busy_server_is_retried_after_retry_after(page, shot):
    calls = []

    def busy_once(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            body = {"error": {"message": "Task queue is full", "type": "server_error", "param": None, "code": "queue_full"}}
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json", body=json.dumps(body))
        else:
            route.continue_()

    page.route("**/v1/images/generations", busy_once)
    page.evaluate(
        """() => { window.texts = []; new MutationObserver(() => window.texts.push(document.querySelector('.run-text')
            .textContent)).observe(document.querySelector('.run-text'), {childList: true, characterData: true, subtree: true}); }"""
    )
    fill_generate(page, "busy first", steps=4)
    page.click(SUBMIT.format("generate"))
    page.locator(".run-text", has_text="server busy, retrying in 1 s").wait_for()
    shot("1-busy")
    wait_done(page)
    assert len(calls) == 2
    # once the retry is sent the note goes (it stayed up while the accepted job ran, until a preview came)
    texts = page.evaluate("window.texts")
    last_busy = max(i for i, text in enumerate(texts) if "server busy" in text)
    assert any(text.startswith("Generating · 4 steps") for text in texts[last_busy + 1 :]), texts


def test_history_survives_a_reload_and_reruns(page, shot):
    from playwright.sync_api import expect

    fill_generate(page, "kept in the history", steps=4)
    page.fill("#generate [name=seed]", "123")
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    page.reload()
    page.click("nav [data-tab=history]")
    item = page.locator(".history-item", has_text="kept in the history").first
    item.wait_for()
    assert "seed 123" in item.inner_text()
    shot("1-history")
    before = page.locator(".history-item").count()
    with page.expect_request("**/v1/images/generations") as request:
        item.locator("[data-action=rerun]").click()
    assert json.loads(request.value.post_data)["prompt"] == "kept in the history"
    wait_done(page)
    page.click("nav [data-tab=history]")
    expect(page.locator(".history-item")).to_have_count(before + 1)
    page.locator(".history-item").first.locator("[data-action=open]").click()
    expect(page.locator("#generate [name=seed]")).to_have_value("123")  # filled once the entry is read back
    with page.expect_download() as download:
        page.select_option("select[name=download-format]", "webp")
        page.click(".result-actions [data-action=download]")
    assert download.value.suggested_filename.endswith(".webp")
    shot("2-rerun")


def test_phone_width_has_no_horizontal_scroll(context, server, tmp_path):
    page, errors = open_page(context, server.base_url + "/playground", {"width": 390, "height": 844})
    for tab in ("generate", "edit", "variations", "history"):
        page.click(f"nav [data-tab={tab}]")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), tab
        if os.environ.get("QIS_TEST_SCREENSHOTS"):
            page.screenshot(path=tmp_path / f"phone-{tab}.png", full_page=True)
    # the output is above the forms on a phone: a run (started from the form's button, below) scrolls it into view
    page.click("nav [data-tab=generate]")
    fill_generate(page, "seen on a phone", steps=4)
    page.click(SUBMIT.format("generate"))
    page.locator(".run-state[data-state=running]").wait_for()
    box = page.evaluate(
        "(() => { const r = document.querySelector('.run-state').getBoundingClientRect(); return [r.top, r.bottom]; })()"
    )
    assert box[0] >= 0 and box[1] <= 844, box  # the progress and its Cancel in sight
    wait_done(page)
    page.close()
    assert not errors, errors


def test_preview_steps_match_the_server(page):
    from qwen_image_server.models.previews import preview_steps

    cases = [(steps, partials) for steps in (2, 3, 4, 5, 8, 10, 20, 50) for partials in (1, 2, 3)]
    got = page.evaluate(
        "async (cases) => { const { previewSteps } = await import('./playground/view.js');"
        " return cases.map(([s, p]) => previewSteps(s, p)); }",
        cases,
    )
    assert got == [preview_steps(steps, partials) for steps, partials in cases]


def test_the_badge_says_ready_only_once_a_reload_has_filled_the_forms(page, server):
    """A key typed in reloads the server's settings and models, and each form's defaults with them. Until they are
    in, the badge says loading (the page's /ready polls leave it alone), so what is typed once it says ready stays."""
    held: list = []
    page.route("**/v1/models", lambda route: held.append(route))  # the reload's model list waits until the test lets it through
    page.fill("#api-key", KEY + " ")  # the same key once trimmed: a change of the field all the same
    page.press("#api-key", "Tab")
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    assert held, "typing a key did not reload the models"
    page.wait_for_timeout(300)  # room for a /ready poll to (wrongly) set the badge
    assert page.get_attribute("#server-status", "data-state") == "loading"
    page.fill("#generate [name=num_inference_steps]", "9")  # typed while it loads: the model stays, so do the steps
    held[0].continue_()
    page.locator("#server-status[data-state=ready]").wait_for()
    assert page.input_value("#generate [name=num_inference_steps]") == "9"
    # a model picked gets its own defaults
    settings = httpx.get(server.base_url + "/playground/settings", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    page.click("nav [data-tab=edit]")
    page.select_option("#edit [name=model]", "qwen-image-edit-plus-tiny")
    default = settings["models"]["qwen-image-edit-plus-tiny"]["default_steps"]
    assert page.input_value("#edit [name=num_inference_steps]") == str(default)


def test_a_server_that_comes_back_has_its_settings_and_models_loaded_again(page):
    """While the server was unreachable the badge said so; once it answered again the badge said ready, but the page
    kept the models and the key status of the server it had loaded, which may be another one now (restarted with
    other models or keys): runs failed with "Model not available" until a reload."""
    loads: list[str] = []
    page.on("request", lambda request: loads.append(request.url) if request.url.endswith("/playground/settings") else None)
    page.route("**/ready", lambda route: route.abort())  # the server is gone
    page.locator("#server-status", has_text="server unreachable").wait_for(timeout=15_000)
    assert loads == []
    page.unroute("**/ready")  # and back
    page.locator("#server-status[data-state=ready]").wait_for(timeout=15_000)
    assert len(loads) == 1  # loaded again, with the models it serves now


def test_a_mask_on_a_tall_image_keeps_its_shape_and_paints_under_the_pointer(page, tmp_path):
    """A tall image's mask frame reaches its height cap (60% of the window): it kept the full width, so the image was
    stretched across and a stroke landed higher on the image than under the pointer (y was scaled by the width)."""
    Image.new("RGB", (256, 512), (90, 90, 90)).save(tmp_path / "tall.png")
    page.click("nav [data-tab=edit]")
    page.set_input_files("#edit input[type=file]", str(tmp_path / "tall.png"))
    canvas = page.wait_for_selector(".mask-paint")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box["height"] <= 0.6 * 900 + 1 and abs(box["width"] / box["height"] - 0.5) < 0.02, box  # its own shape
    page.fill(".mask-tools input[name=brush]", "10")
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.9)
    alpha = page.evaluate(
        """() => { const c = document.querySelector('.mask-paint'); const ctx = c.getContext('2d');
        const at = (x, y) => ctx.getImageData(x, y, 1, 1).data[3]; return [at(128, 461), at(128, 420), at(128, 500)]; }"""
    )
    assert alpha[0] > 0 and alpha[1] == alpha[2] == 0, alpha  # painted at (128, 461), 90 % of the way down, only there


def test_after_a_failed_run_the_viewer_shows_the_selected_result_and_files_not_taken_are_named(page, tmp_path):
    """A run that fails after its first preview left that preview in the viewer while Download, Vary and the info
    line still acted on the result selected before. Files the page does not take were dropped without a word, and an
    image the browser cannot decode left an unhandled error in the page (the page fixture fails on one)."""
    fill_generate(page, "kept in view", steps=4)
    page.fill("#generate [name=seed]", "31")
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    selected = page.get_attribute(".results .selected img", "src")
    preview = {"type": "image_generation.partial_image", "b64_json": base64.b64encode(_png((64, 64))).decode(),
               "partial_image_index": 0, "image_index": 0, "output_format": "png", "size": "64x64"}  # fmt: skip
    error = {"type": "error", "error": {"message": "Task timeout", "type": "server_error", "param": None, "code": "timeout"}}
    stream = f"event: image_generation.partial_image\ndata: {json.dumps(preview)}\n\nevent: error\ndata: {json.dumps(error)}\n\n"
    page.route("**/v1/images/generations", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
    fill_generate(page, "fails after a preview", steps=4, previews=1)
    page.click(SUBMIT.format("generate"))
    page.locator(".run-state[data-state=failed]").wait_for()
    assert page.get_attribute(".viewer img.after", "src") == selected
    assert page.get_attribute(".viewer img.after", "data-kind") == "final" and "seed 31" in page.inner_text(".result-info")
    page.click("nav [data-tab=edit]")
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#edit input[type=file]", str(tmp_path / "notes.txt"))
    assert "Not added: 1 not a PNG, JPEG or WebP image" in page.inner_text("#edit [data-params~=image] .error")
    # a file past the server's upload limit is not sent whole to be refused with a 413
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png((64, 64)) + bytes(25 * 2**20))
    page.set_input_files("#edit input[type=file]", str(huge))
    assert "Not added: 1 larger than the 25 MiB the server takes" in page.inner_text("#edit [data-params~=image] .error")
    assert page.locator("#edit .thumbs img").count() == 0
    (tmp_path / "fake.png").write_text("not a png either")
    page.set_input_files("#edit input[type=file]", str(tmp_path / "fake.png"))
    page.locator("#edit .mask-stage", has_text="cannot decode").wait_for()
    assert "cannot decode the image" in page.inner_text("#edit [data-params~=image] .error")


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 120, 220)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_badge_says_no_access_until_a_key_works(context, server):
    """The page's /ready poll (every 5 s, open to anyone) set the badge back to "ready" while the key was refused."""
    page = context.new_page()
    page.clock.install()
    refused = {"error": {"message": "Invalid API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    page.route("**/v1/models", lambda route: route.fulfill(status=401, content_type="application/json", body=json.dumps(refused)))
    page.goto(server.base_url + "/")
    page.locator("#server-status[data-state=failed]").wait_for()
    page.clock.run_for(12_000)  # two polls
    page.wait_for_timeout(200)
    assert page.inner_text("#server-status") == "no access"
    page.unroute("**/v1/models")
    # a key no header can carry (a pasted zero-width space) is said to be one: it was "Cannot reach the server"
    page.fill("#api-key", KEY + "\u200b")
    page.press("#api-key", "Tab")
    page.locator(".key.field .error", has_text="holds characters an HTTP header cannot carry").wait_for()
    assert page.inner_text("#server-status") == "no access"
    page.fill("#api-key", KEY + "  ")
    page.press("#api-key", "Tab")
    page.locator("#server-status[data-state=ready]").wait_for()
    # steps typed in stay when the key changes (the reload reset them to the model's default)
    page.fill("#generate [name=num_inference_steps]", "7")
    page.fill("#api-key", KEY + " ")
    page.press("#api-key", "Tab")
    page.locator("#server-status[data-state=ready]").wait_for()
    assert page.input_value("#generate [name=num_inference_steps]") == "7"
    # a key refused by a run (a server restarted with another) is "no access" too, not left at "ready"
    page.route("**/v1/images/generations", lambda route: route.fulfill(status=401, content_type="application/json",
                                                                        body=json.dumps(refused)))  # fmt: skip
    page.fill("#generate [name=prompt]", "refused")
    page.click(SUBMIT.format("generate"))
    page.locator("#server-status", has_text="no access").wait_for()
    page.unroute("**/v1/images/generations")
    # Ctrl+Enter from the key field sends the key typed there (it was kept on "change" only: none was sent)
    page.evaluate("() => localStorage.clear()")
    page.fill("#api-key", KEY)
    with page.expect_request("**/v1/images/generations") as request:
        page.press("#api-key", "Control+Enter")
    assert request.value.headers["authorization"] == f"Bearer {KEY}"
    wait_done(page)
    page.close()


def test_history_keeps_to_its_limits_and_the_page_revokes_the_urls_it_no_longer_shows(page):
    """The history grew without bound (each image, with its request's input images, kept forever) and every list of
    it, preview and shown entry made object URLs that were never revoked (each holds its image in memory)."""
    kept = page.evaluate(
        """async () => { const h = await import('./playground/history.js');
        await h.clearEntries();
        const blob = (n) => new Blob([new Uint8Array(n)], { type: 'image/png' });
        const add = (i, limits) => h.addEntry({ created: i, tab: 'generate', fields: { prompt: `p${i}` }, inputs: [blob(300)],
                                                mask: null, image: blob(700), seed: i }, limits);
        for (let i = 1; i <= 5; i++) await add(i, { entries: 3, bytes: 1e9 });
        const byCount = (await h.allEntries()).map((e) => e.seed);
        for (let i = 6; i <= 8; i++) await add(i, { entries: 100, bytes: 2500 });
        const byBytes = (await h.allEntries()).map((e) => e.seed);
        await h.clearEntries();
        return [byCount, byBytes]; }"""
    )
    assert kept == [[5, 4, 3], [8, 7]]  # the newest three; then what 2,500 bytes hold (1,000 an entry)
    for seed in (1, 2):
        fill_generate(page, "counted", steps=2)
        page.fill("#generate [name=seed]", str(seed))
        page.click(SUBMIT.format("generate"))
        wait_done(page)
    page.evaluate(
        """() => { window.live = new Set(); const make = URL.createObjectURL, drop = URL.revokeObjectURL;
        URL.createObjectURL = (b) => { const u = make(b); window.live.add(u); return u; };
        URL.revokeObjectURL = (u) => { window.live.delete(u); drop(u); }; }"""
    )
    for _ in range(4):
        page.click("nav [data-tab=history]")
        page.locator(".history-item").first.wait_for()
        page.locator(".history-item").first.locator("[data-action=show]").click()
        page.click("nav [data-tab=generate]")
    assert page.evaluate("window.live.size") <= page.locator(".history-item").count() + 2  # this list's, the shown entry's


def test_seeds_past_2_53_go_and_come_back_exact_and_aspect_presets_keep_their_ratio(page):
    """A seed typed as 9007199254740993 was sent as ...992 (a JavaScript number), and 2^63 - 1, the largest the server
    takes, as 9223372036854776000, which it refused; the seed the server answered was shown rounded too. The aspect
    presets clamped each side on its own: 16:9 became 336x256 on a 256-pixel minimum."""
    page.fill("#generate [name=seed]", "9223372036854775807")
    got = page.evaluate(
        """async () => { const api = await import('./playground/api.js'); const forms = await import('./playground/forms.js');
        const fields = forms.readFields(document.querySelector('#generate'));
        return [typeof fields.seed, api.toJSON({ seed: fields.seed, prompt: '"seed"' }),
                String(api.fromJSON('{"seed": 9007199254740993, "n": 2}').seed),
                forms.aspectSize('16:9', 256 * 256, { min_side: 256, max_side: 2048, size_multiple: 16 }),
                forms.aspectSize('16:9', 1024 * 1024, { min_side: 256, max_side: 1024, size_multiple: 16 }),
                forms.aspectSize('1:1', 1024 * 1024, { min_side: 256, max_side: 512, size_multiple: 16 })]; }"""
    )
    assert got[:3] == ["bigint", '{"seed":9223372036854775807,"prompt":"\\"seed\\""}', "9007199254740993"]
    assert got[3:] == [[448, 256], [1024, 576], [512, 512]]
    fill_generate(page, "the largest seed", steps=2)
    page.fill("#generate [name=seed]", "9223372036854775807")
    with page.expect_request("**/v1/images/generations") as request:
        page.click(SUBMIT.format("generate"))
    assert '"seed":9223372036854775807' in request.value.post_data
    wait_done(page)
    assert "seed 9223372036854775807 ·" in page.inner_text(".result-info")


def test_the_tabs_and_errors_speak_to_assistive_technology(page):
    """The tabs had no panels named, no one tab stop and no arrow keys; an invalid field was not marked invalid, and
    the whole output panel was one live region whose run text changes ten times a second."""
    assert page.get_attribute("#edit", "role") == "tabpanel" and page.get_attribute("#edit", "aria-labelledby") == "tab-edit"
    assert page.get_attribute("#tab-edit", "aria-controls") == "edit"
    assert [page.get_attribute(f"#tab-{tab}", "tabindex") for tab in ("generate", "edit")] == [None, "-1"]
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-edit" and page.is_visible("#edit")
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-history" and page.is_visible("#history")
    page.keyboard.press("ArrowRight")  # round to the first
    assert page.evaluate("document.activeElement.id") == "tab-generate" and page.get_attribute("#tab-generate", "tabindex") == "0"
    fill_generate(page, "too wide", steps=2)
    page.fill("#generate [name=width]", "4096")
    page.click(SUBMIT.format("generate"))
    page.locator("#generate .size-field .error").wait_for()
    assert page.get_attribute("#generate [name=width]", "aria-invalid") == "true"
    assert page.get_attribute(".output", "aria-live") is None and page.get_attribute(".result-info", "aria-live") == "polite"
    page.fill("#generate [name=width]", "256")
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    assert page.get_attribute("#generate [name=width]", "aria-invalid") is None


def test_what_the_forms_send_is_what_was_asked(page, tmp_path):
    """A number the browser cannot read ("12-3" in the seed) read as empty and was left out: a random seed, without
    a word. A variation without a prompt sent the prefilled guidance (CFG on, twice the work). *Edit this* added a
    fifth image to an edit-plus model's four. A stroke erased with the eraser left faint paint that still went as a
    mask."""
    requests = []
    page.on("request", lambda request: "/v1/images/" in request.url and requests.append(request))
    fill_generate(page, "a typed seed", steps=4)
    page.focus("#generate [name=seed]")
    page.keyboard.type("12-3")
    page.click(SUBMIT.format("generate"))
    page.locator('#generate [data-params="seed"] .error', has_text="Not a number").wait_for()
    assert requests == []
    page.fill("#generate [name=seed]", "5")
    page.click(SUBMIT.format("generate"))
    wait_done(page)
    assert json.loads(requests[-1].post_data)["seed"] == 5
    # a variation without a prompt sends no guidance; with one it does
    record_form_data(page)
    page.click(".result-actions [data-action=vary]")
    page.fill("#variations [name=num_inference_steps]", "2")
    page.click(SUBMIT.format("variations"))
    wait_done(page)
    assert "true_cfg_scale" not in sent_form(page)
    page.fill("#variations [name=prompt]", "in autumn")
    page.click(SUBMIT.format("variations"))
    wait_done(page)
    assert "true_cfg_scale" in sent_form(page)
    # Edit this, to an edit-plus model that holds its four images already
    page.click("nav [data-tab=edit]")
    page.select_option("#edit [name=model]", "qwen-image-edit-plus-tiny")
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(paths[-1])
    page.set_input_files("#edit input[type=file]", [str(p) for p in paths])
    assert page.locator("#edit .thumbs img").count() == 4
    page.click(".result-actions [data-action=edit]")
    page.locator("#edit .error", has_text="more than the 4 images this model takes").wait_for()
    assert page.locator("#edit .thumbs img").count() == 4
    # the mask: faint paint (an eraser's soft edge) is no paint
    painted = page.evaluate(
        """async () => { const { MaskEditor } = await import('./playground/mask.js');
        const stage = document.createElement('div'); const editor = new MaskEditor(stage);
        const canvas = document.createElement('canvas'); canvas.width = canvas.height = 32;
        await editor.load(await new Promise((r) => canvas.toBlob(r, 'image/png')));
        editor.context.fillStyle = 'rgba(255, 45, 85, 0.25)'; editor.context.fillRect(0, 0, 32, 32);
        const faint = [editor.hasPaint(), await editor.toBlob()];
        editor.context.fillStyle = 'rgb(255, 45, 85)'; editor.context.fillRect(0, 0, 8, 8);
        return [...faint, editor.hasPaint(), (await editor.toBlob()) !== null]; }"""
    )
    assert painted == [False, None, True, True]
