"""Health, model cards, response echoes, JSON edits, the seeds' extra fields, the url prefix: in process, on the fake engine.

Each image is a pure function of the settings that reach the engine, so equal and different
pixels show which request fields reach it and which are the same setting.
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
MODELS = {"qwen-image-tiny": "text-to-image", "qwen-image-edit-tiny": "edit", "qwen-image-edit-plus-tiny": "edit-plus"}


@pytest.fixture(scope="module")
def http(api):
    return api.client


def each(*calls):
    """The calls' results, in order (one after the other: in process, each is instant)."""
    return [call() for call in calls]


def _generate(http: httpx.Client, **fields) -> dict:
    response = http.post(GENERATIONS, json={"prompt": "a windmill in a field", "num_inference_steps": 2, **fields})
    assert response.status_code == 200, response.text[:300]
    return response.json()


def _image(item: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    image.load()
    return image


def _pixels(item: dict) -> np.ndarray:
    return np.asarray(_image(item).convert("RGB"))


def _png_bytes(seed: int = 0, size: tuple[int, int] = (256, 256)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- health, readiness, models ---------------------------------------------------------------


def test_healthz(http):
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "qwen-image-tiny"}


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_models_list_and_cards(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert set(cards) == set(MODELS)
    for model_id, card in cards.items():
        assert set(card) >= {"id", "object", "created", "owned_by"}
        assert card["object"] == "model" and isinstance(card["created"], int) and isinstance(card["owned_by"], str)
        one = http.get(f"/v1/models/{model_id}")
        assert one.status_code == 200
        assert one.json() == card


# --- echoes and the seeds' fields ---------------------------------------------------------------


def test_response_echoes_size_format_and_quality(http):
    body = _generate(http, size="320x256", output_format="webp", quality="low", seed=2)
    assert body["size"] == "320x256"
    assert body["output_format"] == "webp"
    assert body["quality"] == "low"
    assert body["background"] == "opaque"
    image = _image(body["data"][0])
    assert image.format == "WEBP" and image.size == (320, 256)


def test_jpg_is_jpeg(http):
    body = _generate(http, output_format="jpg", seed=2)
    assert body["output_format"] == "jpeg" and _image(body["data"][0]).format == "JPEG"


def test_default_echoes(http):
    body = _generate(http, seed=2)  # 2 steps: fewer than any level's
    assert (body["size"], body["output_format"], body["quality"]) == ("256x256", "png", "low")


@pytest.mark.parametrize(
    ("fields", "steps", "echoed"),
    [
        ({"quality": "standard"}, 30, "medium"),  # DALL-E 3's names: OpenAI's levels of the same steps
        ({"quality": "hd"}, 50, "high"),
        ({"quality": "xhigh"}, 75, "xhigh"),
        ({"quality": "auto"}, 4, "low"),  # the model's default steps
        ({"num_inference_steps": 8}, 8, "low"),  # fewer steps than any level's
        ({"num_inference_steps": 40, "quality": "max"}, 40, "medium"),  # the steps that ran win over the request's
        ({"num_inference_steps": 100}, 100, "max"),
    ],
)
def test_quality_echoed_is_openais_level_of_the_steps_that_ran(api, fields, steps, echoed):
    """OpenAI echoes the quality used, one of its levels (the SDK's type: low, medium, high, xhigh, max): the level
    whose steps (README, Quality) the run reached, never ``auto`` or DALL-E 3's ``standard`` and ``hd``."""
    response = api.client.post(GENERATIONS, json={"prompt": "a mill", "seed": 3, **fields})
    body, (_, job) = response.json(), api.engine.jobs[-1]
    assert job.num_inference_steps == steps and body["quality"] == echoed
    with api.client.stream("POST", "/v1/images/generations", json={"prompt": "a mill", "stream": True, **fields}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "image_generation.completed" and events[-1]["quality"] == echoed


@pytest.mark.parametrize(
    ("fields", "echoed"),
    [
        ({"quality": "high", "strength": "0.3"}, "low"),  # 15 of the 50 steps of high
        ({"num_inference_steps": "100", "strength": "0.5"}, "high"),
        ({"num_inference_steps": "100", "strength": "1"}, "max"),
    ],
)
def test_a_variations_quality_is_that_of_the_steps_it_ran(api, fields, echoed):
    """A variation (img2img) runs ``steps x strength`` of the steps asked for (diffusers skips the others): its echo
    is the level of those, as the response's transformer calls count them."""
    from conftest import png_bytes

    files = {"image": ("in.png", png_bytes(), "image/png")}
    response = api.client.post("/v1/images/variations", files=files, data={"seed": "3", **fields})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["quality"] == echoed


@pytest.mark.parametrize(("given", "returned"), [((256, 192), (336, 256)), ((192, 256), (256, 336)), ((512, 64), (2048, 256))])
def test_a_variation_without_a_size_keeps_the_inputs_aspect_ratio_within_the_side_limits(api, given, returned):
    """At the tiny model's default area (256x256) a 4:3 input would have a side under the least (256): the size is
    scaled as a whole until both sides fit (each side clamped alone gave 288x256 for 4:3, and 736x256 for 8:1)."""
    from conftest import png_bytes

    files = {"image": ("in.png", png_bytes(given), "image/png")}
    response = api.client.post("/v1/images/variations", files=files, data={"seed": "3", "model": "qwen-image-tiny"})
    assert response.status_code == 200, response.text[:300]
    assert _image(response.json()["data"][0]).size == returned and response.json()["size"] == "{}x{}".format(*returned)


def test_an_edit_of_a_long_thin_input_keeps_its_ratio_within_the_side_limits(api):
    """The edit pipeline would render a 6:1 input at the tiny model's edit area (256x256) as 640x96; within the side
    limits it is 1536x256, still 6:1 (each side clamped alone gave 640x256)."""
    from conftest import png_bytes

    files = {"image": ("in.png", png_bytes((1200, 200)), "image/png")}
    data = {"seed": "3", "model": "qwen-image-edit-tiny", "prompt": "make it blue"}
    response = api.client.post(EDITS, files=files, data=data)
    assert response.status_code == 200, response.text[:300]
    assert _image(response.json()["data"][0]).size == (1536, 256)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_a_variation_without_a_prompt_or_with_a_blank_one_echoes_none_and_counts_no_tokens(api, prompt):
    from conftest import png_bytes

    data = {"seed": "3"} | ({} if prompt is None else {"prompt": prompt})
    response = api.client.post("/v1/images/variations", files={"image": ("in.png", png_bytes(), "image/png")}, data=data)
    assert response.status_code == 200, response.text[:300]
    body, (_, job) = response.json(), api.engine.jobs[-1]
    assert "revised_prompt" not in body["data"][0] and body["usage"]["input_tokens_details"]["text_tokens"] == 0
    usage = body["usage"]  # the output's tokens are image tokens (OpenAI's output_tokens_details, in its SDK's types)
    assert (
        usage["output_tokens_details"] == {"text_tokens": 0, "image_tokens": usage["output_tokens"]}
        and usage["output_tokens"] > 0
    )
    assert job.prompt == "" and job.true_cfg_scale == 1.0


def test_quality_low_is_accepted_without_explicit_steps(http):
    response = http.post(GENERATIONS, json={"prompt": "a windmill", "quality": "low", "seed": 4})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["quality"] == "low"
    assert _image(response.json()["data"][0]).size == (256, 256)


def test_seed_000_width_and_height(http):
    body, same = each(
        lambda: _generate(http, width=320, height=256, seed=3),
        lambda: _generate(http, size="320x256", seed=3),
    )
    assert body["size"] == "320x256"
    assert _image(body["data"][0]).size == (320, 256)
    # width/height are the size: the same seed at size=320x256 is the same image.
    assert np.array_equal(_pixels(body["data"][0]), _pixels(same["data"][0]))


def test_seed_000_fields_are_honoured(http):
    base, other_cfg, other_negative = each(
        lambda: _generate(http, seed=8, true_cfg_scale=4.0, negative_prompt="blurry"),
        lambda: _generate(http, seed=8, true_cfg_scale=1.0, negative_prompt="blurry"),
        lambda: _generate(http, seed=8, true_cfg_scale=4.0, negative_prompt="sharp, colourful"),
    )
    assert base["data"][0]["seed"] == 8
    assert not np.array_equal(_pixels(base["data"][0]), _pixels(other_cfg["data"][0]))
    assert not np.array_equal(_pixels(base["data"][0]), _pixels(other_negative["data"][0]))


def test_seed_002_guidance_scale_is_accepted_and_used(http):
    guided, same_as_true_cfg, unguided = each(
        lambda: _generate(http, seed=9, guidance_scale=5.0),
        lambda: _generate(http, seed=9, true_cfg_scale=5.0),
        lambda: _generate(http, seed=9, guidance_scale=1.0),
    )
    assert guided["data"][0]["seed"] == 9
    assert np.array_equal(_pixels(guided["data"][0]), _pixels(same_as_true_cfg["data"][0]))
    assert not np.array_equal(_pixels(guided["data"][0]), _pixels(unguided["data"][0]))


# --- JSON edits -------------------------------------------------------------------------------------


def test_json_edit_with_base64_and_data_url_and_multipart_agree(http):
    data = _png_bytes(seed=6)
    common = {"prompt": "make it brighter", "seed": 13, "num_inference_steps": 2, "size": "256x256", "unknown_field": 1}
    plain, data_url, multipart = each(
        lambda: http.post(EDITS, json={**common, "image": base64.b64encode(data).decode()}),
        lambda: http.post(EDITS, json={**common, "image": "data:image/png;base64," + base64.b64encode(data).decode()}),
        lambda: http.post(EDITS, data={k: str(v) for k, v in common.items()}, files={"image": ("in.png", data, "image/png")}),
    )
    for response in (plain, data_url, multipart):
        assert response.status_code == 200, response.text[:300]
    first = plain.json()
    assert first["size"] == "256x256" and len(first["data"]) == 1 and first["data"][0]["seed"] == 13
    assert _image(first["data"][0]).size == (256, 256)
    assert np.array_equal(_pixels(first["data"][0]), _pixels(data_url.json()["data"][0]))
    assert np.array_equal(_pixels(first["data"][0]), _pixels(multipart.json()["data"][0]))


def test_json_edit_with_several_images_on_edit_plus(http):
    images = [base64.b64encode(_png_bytes(seed=s)).decode() for s in (1, 2)]
    response = http.post(
        EDITS,
        json={
            "model": "qwen-image-edit-plus-tiny",
            "prompt": "combine",
            "images": images,
            "num_inference_steps": 2,
            "size": "256x256",
        },
    )
    assert response.status_code == 200, response.text[:300]
    assert _image(response.json()["data"][0]).size == (256, 256)


def test_edit_response_format_url(http):
    response = http.post(
        EDITS,
        data={"prompt": "make it red", "num_inference_steps": "2", "response_format": "url", "output_format": "jpeg"},
        files={"image": ("in.png", _png_bytes(seed=2), "image/png")},
    )
    assert response.status_code == 200, response.text[:300]
    url = response.json()["data"][0]["url"]
    assert url.startswith(str(http.base_url) + "/images/") and url.endswith(".jpeg")
    fetched = http.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).format == "JPEG"


# --- IMAGE_DOWNLOAD_URL_PREFIX ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "says"),
    [
        ("images.example.com/img", r"expected http\(s\)://HOST\[/PATH\]"),
        ("/images", r"expected http\(s\)://HOST\[/PATH\]"),
        ("ftp://files.example/img", r"expected http\(s\)://HOST\[/PATH\]"),
        ("https://", r"expected http\(s\)://HOST\[/PATH\]"),
        ("http://:80", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://cdn.example:eighty/img", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://exa mple.com/img", "it holds spaces, backslashes or control characters"),
        ("http://cdn.example/img\nevil", "it holds spaces, backslashes or control characters"),
        ("http://user:secret@cdn.example/img", r"credentials \(user@\) have no place in it"),
        ("http://@", r"credentials \(user@\) have no place in it"),
        ("https://cdn.example/img?sig=abc", "a query or fragment would hold the image's name"),
        ("https://cdn.example/img#top", "a query or fragment would hold the image's name"),
        ("http://cdn.example/a\\b", "it holds spaces, backslashes or control characters"),
        # hosts no client can fetch from (taken), and malformed IPv6 (refused in urllib's words)
        ("http://-/", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://h;x/", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://cdn.example:99999/", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://[::1/img", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
        ("http://[zz]/img", r"expected http\(s\)://HOST\[:PORT\]\[/PATH\]"),
    ],
)
def test_an_image_url_prefix_clients_could_not_fetch_is_refused_at_start(prefix, says):
    from pydantic import ValidationError

    from qwen_image_server.config import Settings

    with pytest.raises(ValidationError, match=f"is not an absolute URL clients can fetch images under: {says}"):
        Settings(image_download_url_prefix=prefix)
    assert Settings(image_download_url_prefix=" ").image_download_url_prefix is None  # blank: unset
    for good in ("https://cdn.example", "http://10.0.0.1:8080/images/", "https://[2001:db8::1]/img"):
        assert Settings(image_download_url_prefix=f" {good} ").image_download_url_prefix == good


def test_image_download_url_prefix(make_api, tiny_t2i):
    prefixed = make_api({"qwen-image-tiny": tiny_t2i}, image_download_url_prefix="http://cdn.example/img")
    client = prefixed.client
    body = _generate(client, response_format="url", seed=1)
    url = body["data"][0]["url"]
    assert url.startswith("http://cdn.example/img/")
    name = url[len("http://cdn.example/img/") :]
    assert "/" not in name and name.endswith(".png")
    served = client.get(f"/images/{name}")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(served.content))
    assert image.format == "PNG" and image.size == (256, 256)
    # It is the image the same request makes as b64_json.
    same = _generate(client, seed=1)
    assert np.array_equal(np.asarray(image.convert("RGB")), _pixels(same["data"][0]))
