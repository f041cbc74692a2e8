"""Request fields at their edges: null means the default, sizes below the server's minimum, numbers that are not
finite, numbers and booleans of the wrong JSON type, a LoRA strength without a model, a variation sent a mask. In
process, on the fake engine (its jobs show what the worker would get)."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil

import pytest
from test_errors import EDITS, GENERATIONS, _png, assert_error

from qwen_image_server.protocol.images import EditRequest, GenerationRequest, VariationRequest

VARIATIONS = "/v1/images/variations"


@pytest.fixture(scope="module")
def http(api):
    return api.client


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _job_fields(job) -> dict:
    """A job's settings, without its pixels (compared on their own)."""
    return {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in ("images", "mask")}


def _nulls(model, *keep: str) -> dict:
    """Every field of a request model as null, but ``keep``."""
    return dict.fromkeys((name for name in model.model_fields if name not in keep), None)


# --- null means the default ------------------------------------------------------------------------


def _as_plain(api, path: str, plain: dict, bodies: list[dict]) -> list:
    """Each of ``bodies`` makes the job ``plain`` makes and gets its images; their jobs (and answers) are returned."""
    answered = []
    for body in bodies:
        response = api.client.post(path, json=body)
        assert response.status_code == 200, response.text[:300]
        nulled = api.engine.jobs[-1][1]
        reference = api.client.post(path, json=plain)
        assert reference.status_code == 200, reference.text[:300]
        assert _job_fields(nulled) == _job_fields(api.engine.jobs[-1][1])
        assert response.json()["data"] == reference.json()["data"]
        answered.append((nulled, response.json()))
    return answered


def test_null_means_the_default_in_a_generation(api):
    plain = {"prompt": "a windmill", "seed": 5}
    bodies = [{**plain, "n": None, "output_format": None}, {**_nulls(GenerationRequest, "prompt", "seed"), **plain}]
    for job, answer in _as_plain(api, GENERATIONS, plain, bodies):
        assert len(job.seeds) == 1 and job.output_format == "png"
        assert answer["output_format"] == "png" and len(answer["data"]) == 1


def test_null_means_the_default_in_a_json_edit(api):
    plain = {"prompt": "make it night", "image": _b64(_png()), "seed": 6}
    bodies = [{**plain, "n": None, "output_format": None}, {**_nulls(EditRequest, "prompt", "seed"), **plain}]
    for job, _ in _as_plain(api, EDITS, plain, bodies):
        assert len(job.seeds) == 1 and job.output_format == "png" and job.mode == "edit"


def test_null_means_the_default_in_a_json_variation(api):
    """``prompt`` and ``strength`` too: a variation's prompt is optional."""
    plain = {"image": _b64(_png()), "seed": 7}
    bodies = [
        {**plain, "n": None, "output_format": None, "strength": None, "prompt": None},
        {**_nulls(VariationRequest, "seed"), **plain},
    ]
    for job, _ in _as_plain(api, VARIATIONS, plain, bodies):
        assert (len(job.seeds), job.output_format, job.strength, job.prompt) == (1, "png", 0.6, "")


@pytest.mark.parametrize("size", ["256x256", " 256 x 256 ", "256X256", "256×256"])
def test_a_size_may_be_spaced_and_written_with_any_x(http, size):
    response = http.post(GENERATIONS, json={"prompt": "a cat", "size": size, "num_inference_steps": 2})
    assert response.status_code == 200 and response.json()["size"] == "256x256"


@pytest.mark.parametrize("size", ["２５６x256", "256x２５６", "٢٥٦x256", "256x256x256", "256", "-256x256", "256.0x256"])
def test_a_size_takes_ascii_digits_only(http, size):
    """Other scripts' digits (full-width, Arabic-Indic) are not read as numbers, as no JSON number could be."""
    message = f"size must be 'auto' or WIDTHxHEIGHT (like 1024x1024), got {size!r}"
    assert_error(http.post(GENERATIONS, json={"prompt": "a cat", "size": size}), 400, param="size", message=message)


def test_a_variation_without_a_prompt_has_no_revised_prompt(http):
    """OpenAI's ``revised_prompt`` is the prompt an image was made from: a variation made from no prompt has none
    (not an empty string), in a plain response and in a stream's completed events; one with a prompt has it."""
    image = _b64(_png())
    for response_format in ("b64_json", "url"):
        body = http.post(VARIATIONS, json={"image": image, "n": 2, "response_format": response_format}).json()
        assert [("revised_prompt" in item, "seed" in item) for item in body["data"]] == [(False, True)] * 2
    with http.stream("POST", VARIATIONS, json={"image": image, "stream": True, "partial_images": 1}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [event["type"] for event in events] == ["image_variation.partial_image", "image_variation.completed"]
    assert "revised_prompt" not in events[-1]
    body = http.post(VARIATIONS, json={"image": image, "prompt": "at night"}).json()
    assert body["data"][0]["revised_prompt"] == "at night"


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
def test_a_null_prompt_is_a_missing_prompt(http, path):
    body = {"prompt": None} if path == GENERATIONS else {"prompt": None, "image": _b64(_png())}
    assert_error(http.post(path, json=body), 400, param="prompt", message="Validation error: 'prompt' is required")


def test_the_published_schemas_say_null_is_accepted(http):
    """/openapi.json (and the edit and variation schemas) mark every field with a default nullable, as OpenAI's do."""
    published = http.get("/openapi.json").json()["components"]["schemas"]["GenerationRequest"]
    for schema in (published, EditRequest.model_json_schema(), VariationRequest.model_json_schema()):
        for name, prop in schema["properties"].items():
            if name == "prompt" and "prompt" in schema.get("required", []):
                assert "anyOf" not in prop, prop
                continue
            assert {"type": "null"} in prop["anyOf"], (name, prop)
    assert published["properties"]["n"] == {
        "title": "N",
        "default": 1,
        "anyOf": [{"minimum": 1, "type": "integer"}, {"type": "null"}],
    }
    assert published["properties"]["output_format"]["anyOf"][0]["enum"] == ["png", "jpeg", "webp"]


# --- lora_scale without a model -------------------------------------------------------------------


def test_lora_scale_without_a_model_names_the_default_model(http):
    error = assert_error(http.post(GENERATIONS, json={"prompt": "a", "lora_scale": 1}), 400, param="lora_scale")
    assert error["message"] == (
        "lora_scale applies to a LoRA model id, not to the default model (qwen-image-tiny); qwen-image-tiny has no "
        "LoRA whose strength a request may set"
    )
    named = assert_error(http.post(GENERATIONS, json={"prompt": "a", "model": "qwen-image-tiny", "lora_scale": 1}), 400)
    assert "not to qwen-image-tiny; " in named["message"]


# --- width and height below the minimum ------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(0, 0), (-16, 256), (256, 0), (16, 16), (240, 256), (256, -1)])
def test_a_width_or_height_below_the_minimum_gets_the_size_range_message(http, width, height):
    expected = f"width: width and height must be between 256 and 2048, got {width}x{height}"
    response = http.post(GENERATIONS, json={"prompt": "a", "width": width, "height": height})
    assert_error(response, 400, param="width", message=expected)
    if width >= 0 and height >= 0:  # the same check as for size
        same = assert_error(http.post(GENERATIONS, json={"prompt": "a", "size": f"{width}x{height}"}), 400, param="size")
        assert same["message"] == "size" + expected.removeprefix("width")


def test_width_and_height_in_edits_too(http):
    expected = "width: width and height must be between 256 and 2048, got 0x0"
    json_edit = http.post(EDITS, json={"prompt": "a", "image": _b64(_png()), "width": 0, "height": 0})
    assert_error(json_edit, 400, param="width", message=expected)
    files = {"image": ("a.png", _png(), "image/png")}
    form_edit = http.post(EDITS, data={"prompt": "a", "width": "0", "height": "0"}, files=files)
    assert_error(form_edit, 400, param="width", message=expected)


def test_the_minimum_is_the_servers_own(make_api, tiny_t2i, tmp_path):
    model = shutil.copytree(tiny_t2i, tmp_path / "tiny-512")  # its sidecar's default size within the new limits
    sidecar = model / "qwen_image_server.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "default_size": "512x512"}))
    api = make_api({"qwen-image-tiny": model}, min_image_side=512)
    response = api.client.post(GENERATIONS, json={"prompt": "a", "width": 256, "height": 256})
    assert_error(response, 400, param="width", message="width: width and height must be between 512 and 2048, got 256x256")
    assert api.client.post(GENERATIONS, json={"prompt": "a", "width": 512, "height": 512}).status_code == 200


def test_a_request_without_size_or_steps_stays_within_lowered_limits(make_api, tiny_t2i, tmp_path):
    """A model without defaults of its own (as the published ones: no sidecar) on a server whose limits are below
    1024x1024 and 50 steps: a request that gives neither is served within them instead of failing on a size it
    never sent."""
    model = shutil.copytree(tiny_t2i, tmp_path / "no-defaults")
    (model / "qwen_image_server.json").unlink()
    api = make_api({"plain": model}, max_image_side=512, max_steps=8)
    response = api.client.post(GENERATIONS, json={"prompt": "a", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    _, job = api.engine.jobs[-1]
    assert (job.width, job.height, job.num_inference_steps) == (512, 512, 8)
    too_big = api.client.post(GENERATIONS, json={"prompt": "a", "size": "1024x1024"})
    assert_error(too_big, 400, param="size", message="size: width and height must be between 256 and 512, got 1024x1024")


# --- numbers that are not finite --------------------------------------------------------------------

NOT_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]  # Python's json reads all four (the last as inf)


@pytest.mark.parametrize("literal", NOT_FINITE)
@pytest.mark.parametrize("field", ["true_cfg_scale", "guidance_scale", "lora_scale"])
def test_a_number_that_is_not_finite_is_refused(http, field, literal):
    content = f'{{"prompt": "a", "{field}": {literal}}}'
    response = http.post(GENERATIONS, content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, param=field, message=f"Validation error: {field}: Input should be a finite number")


@pytest.mark.parametrize("literal", NOT_FINITE)
def test_a_strength_that_is_not_finite_is_refused(http, literal):
    content = f'{{"image": {json.dumps(_b64(_png()))}, "strength": {literal}}}'
    response = http.post(VARIATIONS, content=content, headers={"content-type": "application/json"})
    assert_error(response, 400, param="strength", message="Validation error: strength: Input should be a finite number")


@pytest.mark.parametrize("text", ["nan", "inf", "-infinity"])
def test_a_form_number_that_is_not_finite_is_refused(http, text):
    files = {"image": ("a.png", _png(), "image/png")}
    response = http.post(VARIATIONS, data={"strength": text}, files=files)
    assert_error(response, 400, param="strength", message="Validation error: strength: Input should be a finite number")
    response = http.post(EDITS, data={"prompt": "a", "true_cfg_scale": text}, files=files)
    assert_error(response, 400, param="true_cfg_scale")


# --- a variation sent a mask --------------------------------------------------------------------------


def test_a_variation_with_a_mask_names_the_mask(http):
    mask = _png(256, 256, "RGBA", (0, 0, 0, 0))
    as_json = http.post(VARIATIONS, json={"image": _b64(_png()), "mask": _b64(mask)})
    assert_error(as_json, 400, param="mask")
    files = [("image", ("a.png", _png(), "image/png")), ("mask", ("m.png", mask, "image/png"))]
    assert_error(http.post(VARIATIONS, files=files), 400, param="mask")


# --- JSON types: a JSON body's numbers and booleans are JSON's own ----------------------------------------------------

WRONG_JSON_TYPES = [
    ("n", "2", "a valid integer, got a string"),
    ("n", True, "a valid integer, got a boolean"),
    ("seed", "7", "a valid integer, got a string"),
    ("num_inference_steps", "4", "a valid integer, got a string"),
    ("width", "256", "a valid integer, got a string"),
    ("output_compression", False, "a valid integer, got a boolean"),
    ("partial_images", "1", "a valid integer, got a string"),
    ("true_cfg_scale", "4", "a valid number, got a string"),
    ("guidance_scale", True, "a valid number, got a boolean"),
    ("lora_scale", "0.5", "a valid number, got a string"),
    ("stream", "true", "a valid boolean, got a string"),
    ("stream", 1, "a valid boolean, got a number"),
    ("prompt_rewrite", "false", "a valid boolean, got a string"),
]


@pytest.mark.parametrize(("field", "value", "says"), WRONG_JSON_TYPES)
@pytest.mark.parametrize("path", [GENERATIONS, EDITS, VARIATIONS])
def test_a_json_value_of_the_wrong_json_type_is_refused(http, path, field, value, says):
    """As OpenAI's API does: ``"n": "2"`` is not read as 2, nor ``"guidance_scale": true`` as 1.0 (no CFG)."""
    body = {"prompt": "a", field: value} if path == GENERATIONS else {"prompt": "a", "image": _b64(_png()), field: value}
    assert_error(http.post(path, json=body), 400, param=field, message=f"Validation error: {field}: Input should be {says}")


def test_a_json_strength_of_the_wrong_json_type_is_refused(http):
    response = http.post(VARIATIONS, json={"image": _b64(_png()), "strength": "0.5"})
    assert_error(
        response, 400, param="strength", message="Validation error: strength: Input should be a valid number, got a string"
    )


def test_json_numbers_and_booleans_of_the_right_type_are_read(api):
    body = {"prompt": "a", "n": 2, "seed": 7.0, "true_cfg_scale": 3, "num_inference_steps": 4, "prompt_rewrite": False}
    response = api.client.post(GENERATIONS, json={**body, "stream": False, "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    _, job = api.engine.jobs[-1]
    assert (job.seeds, job.true_cfg_scale, job.num_inference_steps) == ([7, 8], 3.0, 4)


def test_a_forms_text_values_are_read_as_the_types_its_fields_take(api):
    """A multipart form has only text: there "2", "true" and "0.5" are a number, a boolean and a number."""
    form = {"prompt": "a", "n": "2", "seed": "7", "true_cfg_scale": "3", "num_inference_steps": "4", "stream": "false"}
    response = api.client.post(EDITS, data=form, files={"image": ("a.png", _png(), "image/png")})
    assert response.status_code == 200, response.text
    _, job = api.engine.jobs[-1]
    assert (job.seeds, job.true_cfg_scale, job.num_inference_steps) == ([7, 8], 3.0, 4)
    variation = api.client.post(
        VARIATIONS, data={"strength": "0.5", "seed": "3"}, files={"image": ("a.png", _png(), "image/png")}
    )
    assert variation.status_code == 200, variation.text
    assert api.engine.jobs[-1][1].strength == 0.5


# --- OpenAI's fields that change nothing here --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (GENERATIONS, "style", "cinematic"),
        (GENERATIONS, "moderation", "strict"),
        (GENERATIONS, "complexity", "extreme"),
        (GENERATIONS, "frame_count", 40),
        (EDITS, "input_fidelity", "max"),
    ],
)
def test_openai_fields_without_effect_are_checked_as_openai_checks_them(http, path, field, value):
    """Values OpenAI refuses are refused here too (they were taken, whatever they said), naming the field."""
    if path == EDITS:
        response = http.post(path, json={"prompt": "p", "image": _b64(_png(256, 256)), field: value})
    else:
        response = http.post(path, json={"prompt": "p", "size": "256x256", field: value})
    assert_error(response, 400, param=field)


def test_openai_fields_without_effect_are_taken_and_logged_as_ignored(api, caplog):
    """The SDK's fields this server makes nothing of (its safety identifier, complexity, and the settings of GIF and
    SVG outputs, which it does not make) are taken as OpenAI's values, and logged as ignored, by name."""
    import logging

    fields = {"style": "natural", "moderation": "low", "safety_identifier": "user-7", "complexity": "high",
              "frame_count": 9, "frame_duration_ms": 100, "svg": {"reasoning": {"effort": "low"}}}  # fmt: skip
    with caplog.at_level(logging.INFO):
        made = api.client.post(GENERATIONS, json={"prompt": "p", "size": "256x256", **fields})
        edited = api.client.post(EDITS, json={"prompt": "p", "image": _b64(_png(256, 256)), "input_fidelity": "high"})
    assert made.status_code == 200 and edited.status_code == 200, (made.text, edited.text)
    (generation, edit) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring fields: ")]
    assert generation == "ignoring fields: " + ", ".join(fields) and edit == "ignoring fields: input_fidelity"
    refused = api.client.post(GENERATIONS, json={"prompt": "p", "size": "256x256", "output_format": "gif"})
    assert_error(refused, 400, param="output_format")
    # On an endpoint OpenAI does not give it, such a field is an unknown one: not checked, and named once (twice
    # before: as an unknown field and as an ignored OpenAI one)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        unchecked = api.client.post(GENERATIONS, json={"prompt": "p", "size": "256x256", "input_fidelity": "bogus"})
    assert unchecked.status_code == 200, unchecked.text
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")] == [
        "ignoring fields: input_fidelity"
    ]
