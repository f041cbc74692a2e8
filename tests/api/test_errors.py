"""Every client error over HTTP: its status code and OpenAI's error envelope plus seed 002's ``detail``.

``{"error": {"message", "type", "param", "code"}, "detail": <the same message>}``.
Validation errors are 400, never FastAPI's 422; bad uploads are 400, never 500.
(Queue full, timeouts and dead workers are covered in test_engine_behaviour.py; errors that
need raw HTTP framing, in test_raw_http.py.) In process, on the fake engine.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


@pytest.fixture(scope="module")
def http_client(api):
    return api.client


def assert_error(response: httpx.Response, status: int, *, param: str | None | type = ..., message: str | None = None) -> dict:
    """The envelope, with ``status``; returns the ``error`` object."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail", "request_id"}, body
    assert response.headers["x-request-id"] == body["request_id"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert body["detail"] == error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["code"] is None or isinstance(error["code"], str)
    if param is not ...:
        assert error["param"] == param, error
    if message is not None:
        assert error["message"] == message
    return error


def _png(width: int = 256, height: int = 256, mode: str = "RGB", fill: object = None) -> bytes:
    if fill is None:
        array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array).convert(mode)
    else:
        image = Image.new(mode, (width, height), fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- generations: validation ----------------------------------------------------------------

VALIDATION_CASES = [
    ("missing prompt", {}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("blank prompt", {"prompt": "   "}, "prompt"),
    ("prompt not a string", {"prompt": 5}, "prompt"),
    ("prompt too long", {"prompt": "x" * 4001}, "prompt"),
    ("n=0", {"prompt": "a cat", "n": 0}, "n"),
    ("n=11", {"prompt": "a cat", "n": 11}, "n"),
    ("n not a number", {"prompt": "a cat", "n": "two"}, "n"),
    ("bad size string", {"prompt": "a cat", "size": "big"}, "size"),
    ("size without height", {"prompt": "a cat", "size": "256x"}, "size"),
    ("size not a multiple of 16", {"prompt": "a cat", "size": "264x256"}, "size"),
    ("size too large", {"prompt": "a cat", "size": "4096x4096"}, "size"),
    ("size too small", {"prompt": "a cat", "size": "128x128"}, "size"),
    ("unknown aspect_ratio", {"prompt": "a cat", "aspect_ratio": "2:1"}, "aspect_ratio"),
    ("width without height", {"prompt": "a cat", "width": 256}, "height"),
    ("height without width", {"prompt": "a cat", "height": 256}, "width"),
    ("width not a multiple of 16", {"prompt": "a cat", "width": 250, "height": 256}, "width"),
    ("bad response_format", {"prompt": "a cat", "response_format": "png"}, "response_format"),
    ("bad output_format", {"prompt": "a cat", "output_format": "gif"}, "output_format"),
    ("output_format in capitals", {"prompt": "a cat", "output_format": "JPG"}, "output_format"),  # as JPEG and PNG are
    ("output_compression 101", {"prompt": "a cat", "output_compression": 101}, "output_compression"),
    ("output_compression -1", {"prompt": "a cat", "output_compression": -1}, "output_compression"),
    ("bad quality", {"prompt": "a cat", "quality": "ultra"}, "quality"),
    ("background transparent", {"prompt": "a cat", "background": "transparent"}, "background"),
    ("bad background", {"prompt": "a cat", "background": "green"}, "background"),
    ("num_inference_steps 0", {"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps"),
    ("num_inference_steps 1", {"prompt": "a cat", "num_inference_steps": 1}, "num_inference_steps"),
    ("num_inference_steps above the maximum", {"prompt": "a cat", "num_inference_steps": 1001}, "num_inference_steps"),
    ("negative seed", {"prompt": "a cat", "seed": -1}, "seed"),
    ("true_cfg_scale too large", {"prompt": "a cat", "true_cfg_scale": 21}, "true_cfg_scale"),
    ("stream with partial_images 4", {"prompt": "a cat", "stream": True, "partial_images": 4}, "partial_images"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES])
def test_generation_validation_errors_are_400(http_client, body, param):
    assert_error(http_client.post(GENERATIONS, json=body), 400, param=param)


def test_missing_prompt_message(http_client):
    error = assert_error(http_client.post(GENERATIONS, json={"n": 1}), 400, param="prompt")
    assert "prompt" in error["message"]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{not json", "application/json"), (b'{"prompt": "a cat",}', "application/json"), (b"[1, 2]", "application/json"),
     (b'"a cat"', "application/json"), (b"prompt=a+cat", "text/plain")],
    ids=["broken", "trailing comma", "array", "string", "text/plain"],
)  # fmt: skip
def test_non_json_or_non_object_body_is_400(http_client, content, content_type):
    assert_error(http_client.post(GENERATIONS, content=content, headers={"content-type": content_type}), 400)


def test_unknown_extra_fields_are_ignored(http_client):
    body = {
        "prompt": "a cat",
        "num_inference_steps": 2,
        "seed": 1,
        "user": "someone",
        "style": "vivid",
        "moderation": "low",
        "totally_unknown_field": {"nested": [1, 2, 3]},
    }
    response = http_client.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["data"]) == 1


# --- models -----------------------------------------------------------------------------------


def test_unknown_model_on_generations(http_client):
    response = http_client.post(GENERATIONS, json={"prompt": "a cat", "model": "no-such-model"})
    error = assert_error(response, 400, param="model", message="Model not available: no-such-model")
    assert error["code"] == "model_not_found"


def test_unknown_model_on_edits(http_client):
    files = {"image": ("a.png", _png(), "image/png")}
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "gpt-image-1"}, files=files)
    assert_error(response, 400, param="model", message="Model not available: gpt-image-1")


@pytest.mark.parametrize("model", ["qwen-image-edit-tiny", "qwen-image-edit-plus-tiny"])
def test_edit_model_on_generations(http_client, model):
    assert_error(http_client.post(GENERATIONS, json={"prompt": "a cat", "model": model}), 400, param="model")


def test_text_to_image_model_on_edits(http_client):
    files = {"image": ("a.png", _png(), "image/png")}
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-tiny"}, files=files)
    assert_error(response, 400, param="model")


# --- edits: bad uploads -------------------------------------------------------------------------


def test_edit_without_image_multipart(http_client):
    response = http_client.post(EDITS, files=[("prompt", (None, "a cat"))])
    assert_error(response, 400, param="image")


def test_edit_without_image_json(http_client):
    assert_error(http_client.post(EDITS, json={"prompt": "a cat"}), 400, param="image")


def test_edit_without_prompt(http_client):
    assert_error(http_client.post(EDITS, files={"image": ("a.png", _png(), "image/png")}), 400, param="prompt")


@pytest.mark.parametrize(
    "data",
    [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, _png()[:200]],
    ids=["text", "png header only", "truncated png"],
)
def test_edit_with_undecodable_multipart_image(http_client, data):
    response = http_client.post(EDITS, data={"prompt": "a cat"}, files={"image": ("a.png", data, "image/png")})
    assert_error(response, 400, param="image")


def test_edit_with_empty_file(http_client):
    response = http_client.post(EDITS, data={"prompt": "a cat"}, files={"image": ("a.png", b"", "image/png")})
    assert_error(response, 400, param="image")


@pytest.mark.parametrize(
    "image",
    [_b64(b"this is not an image"), "data:image/png;base64," + _b64(b"not a png either")],
    ids=["base64", "data url"],
)
def test_edit_with_undecodable_json_base64_image(http_client, image):
    assert_error(http_client.post(EDITS, json={"prompt": "a cat", "image": image}), 400, param="image")


@pytest.mark.parametrize(
    "image", ["@@@ not base64 @@@", "data:image/png;base64,%%%%", "abc"], ids=["symbols", "data url", "bad padding"]
)
def test_edit_with_invalid_base64(http_client, image):
    assert_error(http_client.post(EDITS, json={"prompt": "a cat", "image": image}), 400, param="image")


def test_edit_with_image_url_is_refused_not_fetched(http_client):
    assert_error(http_client.post(EDITS, json={"prompt": "a cat", "image": "http://127.0.0.1:9/x.png"}), 400, param="image")


def test_edit_with_a_file_id_says_files_are_not_served(http_client):
    """OpenAI's JSON edits may name an uploaded file (``{"file_id": ...}``): not served here, and said so (it was
    "must be a base64 string or data URL", as if the object were malformed)."""
    body = {"prompt": "a cat", "images": [{"file_id": "file-abc"}]}
    error = assert_error(http_client.post(EDITS, json=body), 400, param="images[0]")
    assert "file_id references (OpenAI's Files API) are not served here" in error["message"], error


def test_edit_with_image_of_wrong_json_type(http_client):
    assert_error(http_client.post(EDITS, json={"prompt": "a cat", "image": 12345}), 400, param="image")


def test_edit_with_non_json_body(http_client):
    assert_error(http_client.post(EDITS, content=b"{oops", headers={"content-type": "application/json"}), 400)


def test_edit_with_unsupported_content_type(http_client):
    assert_error(http_client.post(EDITS, content=b"prompt=a", headers={"content-type": "text/plain"}), 400)


def test_edit_with_malformed_multipart(http_client):
    response = http_client.post(EDITS, content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 400)


def test_mask_of_a_different_size(http_client):
    files = [
        ("image", ("a.png", _png(256, 256), "image/png")),
        ("mask", ("m.png", _png(128, 128, "RGBA", (0, 0, 0, 0)), "image/png")),
    ]
    error = assert_error(http_client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="mask")
    assert "128x128" in error["message"] and "256x256" in error["message"]


def test_mask_of_a_different_size_in_json(http_client):
    body = {"prompt": "a cat", "image": _b64(_png(256, 256)), "mask": _b64(_png(320, 240, "RGBA", (0, 0, 0, 0)))}
    assert_error(http_client.post(EDITS, json=body), 400, param="mask")


def test_undecodable_mask(http_client):
    files = [("image", ("a.png", _png(), "image/png")), ("mask", ("m.png", b"not a mask", "image/png"))]
    assert_error(http_client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="mask")


@pytest.mark.parametrize(
    ("mode", "fill", "said"),
    [("RGBA", (0, 0, 0, 255), "no transparent pixels"), ("L", 0, "no white pixels"), ("RGB", (0, 0, 0), "no white pixels")],
)
def test_mask_that_marks_nothing(http_client, mode, fill, said):
    """Named by the convention the mask is read with: its transparency, or (without alpha) its white."""
    files = [("image", ("a.png", _png(), "image/png")), ("mask", ("m.png", _png(256, 256, mode, fill), "image/png"))]
    error = assert_error(http_client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="mask")
    assert said in error["message"]


def test_a_mask_with_several_images_is_the_first_images(api, http_client):
    """As OpenAI applies it: to the first image (it was a 400). The job renders at the first image's aspect ratio
    (not the last's, as an edit of several images without a mask does) and comes back at its size; a mask of
    another image's size is refused."""
    files = [
        ("image[]", ("a.png", _png(320, 240), "image/png")),
        ("image[]", ("b.png", _png(128, 256), "image/png")),
        ("mask", ("m.png", _png(320, 240, "RGBA", (0, 0, 0, 0)), "image/png")),
    ]
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-plus-tiny"}, files=files)
    assert response.status_code == 200, response.text[:300]
    _, job = api.engine.jobs[-1]
    assert job.mode == "inpaint" and len(job.images) == 2 and job.mask.shape == (240, 320)
    assert (job.width, job.height) == (336, 256)  # the tiny model's 256x256 area at 4:3, sides at least 256
    files[2] = ("mask", ("m.png", _png(128, 256, "RGBA", (0, 0, 0, 0)), "image/png"))  # the second image's size
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-plus-tiny"}, files=files)
    error = assert_error(response, 400, param="mask")
    assert "128x256" in error["message"] and "320x240" in error["message"]


def test_a_bad_file_among_several_images_is_named_by_its_place(http_client):
    """Several image parts share their field's name (image[]): the error names the file's place, as a JSON list's does."""
    for field in ("image[]", "image"):
        files = [(field, ("a.png", _png(), "image/png")), (field, ("b.png", b"not an image", "image/png"))]
        response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-plus-tiny"}, files=files)
        error = assert_error(response, 400, param="image[1]")
        assert error["message"].startswith("'image[1]' is not a decodable image"), error
    one = [("image[]", ("b.png", b"not an image", "image/png"))]  # a single file keeps its field's name
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-plus-tiny"}, files=one)
    assert_error(response, 400, param="image[]")


def test_too_many_images(http_client):
    files = [("image[]", (f"{i}.png", _png(), "image/png")) for i in range(5)]
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-plus-tiny"}, files=files)
    assert_error(response, 400)


def test_several_images_on_the_plain_edit_model(http_client):
    files = [("image[]", ("a.png", _png(), "image/png")), ("image[]", ("b.png", _png(), "image/png"))]
    response = http_client.post(EDITS, data={"prompt": "a cat", "model": "qwen-image-edit-tiny"}, files=files)
    assert_error(response, 400, param="image")


def test_unexpected_file_field(http_client):
    files = [("image", ("a.png", _png(), "image/png")), ("extra", ("b.png", _png(), "image/png"))]
    assert_error(http_client.post(EDITS, data={"prompt": "a cat"}, files=files), 400, param="extra")


def test_edit_validation_errors_are_400_too(http_client):
    files = {"image": ("a.png", _png(), "image/png")}
    assert_error(http_client.post(EDITS, data={"prompt": "a cat", "n": "0"}, files=files), 400, param="n")
    assert_error(http_client.post(EDITS, data={"prompt": "a cat", "size": "100x100"}, files=files), 400, param="size")
    response = http_client.post(EDITS, data={"prompt": "a cat", "output_format": "bmp"}, files=files)
    assert_error(response, 400, param="output_format")


# --- not found ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/nope"), ("GET", "/v1/nope"), ("POST", "/v1/images/nope"), ("GET", "/v1/images")]
)
def test_unknown_route_is_404_in_the_envelope(http_client, method, path):
    error = assert_error(http_client.request(method, path), 404)
    assert path in error["message"]


@pytest.mark.parametrize(
    "name",
    ["abc.png", "0" * 32 + ".png", "f" * 32 + ".jpeg", "pyproject.toml", "..%2F..%2Fpyproject.toml", "%2e%2e", "..%2Fsomething"],
)
def test_image_that_was_never_generated_is_404(http_client, name):
    assert_error(http_client.get(f"/images/{name}"), 404)


def test_generated_image_under_another_extension_is_404(http_client):
    response = http_client.post(GENERATIONS, json={"prompt": "a cat", "num_inference_steps": 2, "response_format": "url"})
    assert response.status_code == 200, response.text[:300]
    name = response.json()["data"][0]["url"].rsplit("/", 1)[1]
    assert http_client.get(f"/images/{name}").status_code == 200
    stem = name.rsplit(".", 1)[0]
    assert_error(http_client.get(f"/images/{stem}.jpeg"), 404)
    assert_error(http_client.get(f"/images/{stem}"), 404)


def test_unknown_model_card_is_404(http_client):
    error = assert_error(http_client.get("/v1/models/unknown"), 404)
    assert "unknown" in error["message"]


def test_wrong_method_is_405_in_the_envelope(http_client):
    assert_error(http_client.get(GENERATIONS), 405)
    assert_error(http_client.delete("/v1/models"), 405)


# --- request too large ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_api(make_api, tiny_t2i, tiny_edit):
    return make_api({"qwen-image-tiny": tiny_t2i, "qwen-image-edit-tiny": tiny_edit}, max_upload_bytes=2048)


def _chunks(data: bytes, size: int = 512):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_body_too_large_is_413(small_body_api):
    big_json = json.dumps({"prompt": "a cat " * 500}).encode()
    assert len(big_json) > 2048
    client = small_body_api.client
    error = assert_error(client.post(GENERATIONS, content=big_json, headers={"content-type": "application/json"}), 413)
    assert error["code"] == "request_too_large"
    files = {"image": ("a.png", _png(64, 64), "image/png")}  # noise: ~12 kB
    assert_error(client.post(EDITS, data={"prompt": "a cat"}, files=files), 413)
    assert_error(client.post(EDITS, json={"prompt": "a cat", "image": _b64(_png(64, 64))}), 413)
    # Streamed (chunked, no Content-Length) multipart bodies are cut off too.
    request = client.build_request("POST", EDITS, data={"prompt": "a cat"}, files=files)
    body = request.read()
    response = client.post(EDITS, content=_chunks(body), headers={"content-type": request.headers["content-type"]})
    assert_error(response, 413)
    # A small request still goes through on the same server.
    ok = client.post(GENERATIONS, json={"prompt": "a cat", "num_inference_steps": 2})
    assert ok.status_code == 200, ok.text[:300]


def test_chunked_json_generation_body_too_large_is_413(small_body_api):
    big_json = json.dumps({"prompt": "a cat " * 500}).encode()
    client = small_body_api.client
    response = client.post(GENERATIONS, content=_chunks(big_json), headers={"content-type": "application/json"})
    small = json.dumps({"prompt": "a cat", "num_inference_steps": 2}).encode()
    ok = client.post(GENERATIONS, content=_chunks(small), headers={"content-type": "application/json"})
    assert_error(response, 413)
    assert ok.status_code == 200, ok.text[:300]


def test_url_images_that_cannot_be_stored_give_a_clear_500_and_a_warning_at_start(make_api, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="qwen_image_server.api.app"):
        http = make_api(image_output_dir=str(blocked / "images")).client
    warning = (
        f"url responses will fail: Could not store the image for response_format=url (Not a directory: {blocked / 'images'})"
    )
    assert warning in caplog.text
    response = http.post(GENERATIONS, json={"prompt": "a cat", "response_format": "url"})
    error = assert_error(response, 500, param=None, message=(
        "Could not store the image for response_format=url (Not a directory); response_format=b64_json returns it "
        "without storing it"
    ))  # fmt: skip
    assert error["code"] == "storage_failed" and str(tmp_path) not in response.text
    assert http.post(GENERATIONS, json={"prompt": "a cat"}).status_code == 200


def test_work_cut_by_shutdown_is_503_shutting_down_with_retry_after(fresh_api, monkeypatch):
    from qwen_image_server.errors import ShuttingDown

    def stopping(*args, **kwargs):
        raise ShuttingDown()  # what the engine answers for work it still holds when it stops

    monkeypatch.setattr(fresh_api.engine, "submit", stopping)
    response = fresh_api.client.post(GENERATIONS, json={"prompt": "a cat"})
    assert_error(response, 503, message="The server is shutting down; retry shortly")
    assert response.json()["error"]["code"] == "shutting_down" and response.headers["retry-after"] == "5"
