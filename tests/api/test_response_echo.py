"""What answers echo of a request beyond the images: OpenAI's ``safety_identifier`` (the request's, or its ``user``),
and the usage of a stream's completed events, which add up to the answer's without a stream. In process, on the fake
engine."""

from __future__ import annotations

import base64
import json

import pytest

from conftest import png_bytes

GENERATIONS = "/v1/images/generations"


def _events(api, path: str, **kwargs) -> list[dict]:
    with api.client.stream("POST", path, **kwargs) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("fields", "echoed"),
    [
        ({"safety_identifier": "user-7f3a"}, "user-7f3a"),
        ({"user": "alice"}, "alice"),
        ({"safety_identifier": "", "user": "alice"}, "alice"),  # empty: the old name's value, as OpenAI's
        ({"safety_identifier": "user-7f3a", "user": "alice"}, "user-7f3a"),
        ({}, None),
    ],
)
def test_the_safety_identifier_is_echoed_in_the_answer_and_the_completed_events(api, fields, echoed):
    """The openai SDK's ImagesResponse and completed events have ``safety_identifier``: the request's non-empty one,
    or its deprecated ``user``. Left out when neither is given, and never in previews (OpenAI's have none)."""
    body = {"prompt": "a mill", "num_inference_steps": 2, **fields}
    answer = api.client.post(GENERATIONS, json=body).json()
    assert answer.get("safety_identifier") == echoed and ("safety_identifier" in answer) == (echoed is not None)
    events = _events(api, GENERATIONS, json={**body, "stream": True, "partial_images": 1})
    assert [event["type"] for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert "safety_identifier" not in events[0] and events[1].get("safety_identifier") == echoed


def test_a_variation_has_no_safety_identifier_of_its_own_only_user(api):
    """OpenAI's variations take ``user`` but no ``safety_identifier``: there it is an unknown field, ignored; its value
    was echoed, and one of another type (a number) failed the finished job with a 500."""
    image = ("in.png", png_bytes(), "image/png")
    for fields in ({"safety_identifier": "s-1"}, {"safety_identifier": 123}):
        body = {"image": base64.b64encode(png_bytes()).decode(), "num_inference_steps": 2, **fields}
        answer = api.client.post("/v1/images/variations", json=body)
        assert answer.status_code == 200, answer.text[:300]
        assert "safety_identifier" not in answer.json()
    both = api.client.post("/v1/images/variations", files={"image": image}, data={"user": "bob", "safety_identifier": "s-1"})
    assert both.status_code == 200 and both.json()["safety_identifier"] == "bob"


def test_edits_and_variations_echo_their_form_fields_identifier(api):
    image = ("in.png", png_bytes(), "image/png")
    edit = api.client.post("/v1/images/edits", files={"image": image}, data={"prompt": "a hat", "safety_identifier": "s-1"})
    assert edit.status_code == 200 and edit.json()["safety_identifier"] == "s-1"
    variation = api.client.post("/v1/images/variations", files={"image": image}, data={"user": "bob"})
    assert variation.status_code == 200 and variation.json()["safety_identifier"] == "bob"


@pytest.mark.parametrize("path", [GENERATIONS, "/v1/images/edits"])
def test_a_streams_completed_events_add_up_to_the_usage_of_the_answer_without_a_stream(api, path):
    """With n=2 every completed event carried the whole request's input tokens (its prompt, its input images): a
    client that added them up counted the input twice. The first event carries them; each event its own output."""
    fields = {"prompt": "a red mill by a river", "n": 2, "seed": 5, "num_inference_steps": 2}
    form = {key: str(value) for key, value in fields.items()}
    kwargs = {"data": form, "files": {"image": ("in.png", png_bytes(), "image/png")}} if "edits" in path else {"json": fields}
    usage = api.client.post(path, **kwargs).json()["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    if "edits" in path:
        assert usage["input_tokens_details"]["image_tokens"] > 0
    kwargs = {**kwargs, "data": {**form, "stream": "true"}} if "edits" in path else {"json": {**fields, "stream": True}}
    completed = [event for event in _events(api, path, **kwargs) if event["type"].endswith(".completed")]
    assert [event["image_index"] for event in completed] == [0, 1]
    first, second = (event["usage"] for event in completed)
    assert first["input_tokens_details"] == usage["input_tokens_details"] and first["input_tokens"] == usage["input_tokens"]
    assert second["input_tokens"] == 0 and second["input_tokens_details"] == {"text_tokens": 0, "image_tokens": 0}
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert first[key] + second[key] == usage[key], key
    assert first["output_tokens"] == second["output_tokens"] == usage["output_tokens"] // 2
