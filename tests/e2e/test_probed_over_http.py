"""The fixes of the probing rounds, over real HTTP on the shared tiny server: HEAD, slash redirects, null fields
through the ``openai`` SDK's raw path, one mask at most, uploads cut short, non-JSON generation bodies, and JSON
numbers against a form's text (their logic and every case are tested in process in tests/api)."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from conftest import png_bytes

pytestmark = pytest.mark.e2e
EDITS = "/v1/images/edits"
GENERATIONS = "/v1/images/generations"


def _mask() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (256, 256), (0, 0, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_head_answers_like_get_and_slashes_redirect(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        got, head = http.get("/v1/models"), http.head("/v1/models")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert http.head(GENERATIONS).status_code == 405
        moved = http.get("/v1/models/qwen-image-tiny/", follow_redirects=False)
        assert moved.status_code == 307 and moved.headers["location"].endswith("/v1/models/qwen-image-tiny")


def test_null_fields_are_defaults_through_the_sdk(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    body = {"n": None, "output_format": None, "num_inference_steps": 2, "seed": 3}
    result = client.images.generate(model="qwen-image-tiny", prompt="a kite", extra_body=body)
    assert len(result.data) == 1 and Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == "PNG"


def test_a_second_mask_and_a_body_cut_short_are_400s(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        files = [("image", ("a.png", png_bytes(), "image/png")), ("mask", ("m.png", _mask(), "image/png"))]
        files.append(("mask", ("n.png", _mask(), "image/png")))
        twice = http.post(EDITS, data={"prompt": "a hat", "model": "qwen-image-edit-tiny"}, files=files)
        assert twice.status_code == 400 and twice.json()["error"]["code"] == "too_many_files", twice.text
        boundary = "probe-boundary"
        whole = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na hat\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode() + png_bytes()
        cut = http.post(EDITS, content=whole[:-100], headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert cut.status_code == 400 and "cut short" in cut.json()["error"]["message"], cut.text


def test_a_generation_sent_as_a_form_is_told_to_send_json(server):
    response = httpx.post(server.base_url + GENERATIONS, data={"prompt": "a"}, timeout=30)  # curl -d 'prompt=a'
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


def test_json_numbers_must_be_json_numbers_while_form_text_is_read(server):
    """Through the SDK: ``"n": "2"`` and ``"guidance_scale": true`` in JSON are 400s naming the field; an edit's form
    (all text, as the SDK sends it) with text numbers is served."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    for field, value, says in [
        ("n", "2", "a valid integer, got a string"),
        ("guidance_scale", True, "a valid number, got a boolean"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model="qwen-image-tiny", prompt="a", extra_body={field: value, "num_inference_steps": 2})
        assert refused.value.body["param"] == field, refused.value.body
        assert refused.value.body["message"] == f"Validation error: {field}: Input should be {says}"
    edited = client.images.edit(
        model="qwen-image-edit-tiny", prompt="blue", image=("a.png", png_bytes(), "image/png"),
        extra_body={"num_inference_steps": "2", "seed": "4", "stream": "false"},
    )  # fmt: skip
    assert len(edited.data) == 1 and edited.data[0].model_extra["seed"] == 4
