"""LoRA ids and model aliases over HTTP: one server serves the base id, LoRA ids and another name of the base model
from the same workers."""

import httpx
import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lora_server(options_server):
    """The shared server of model options (tests/model_files.py): ``tiny`` with the LoRAs ``style``, ``fast`` (Lightning
    preset) and ``hub`` (from the hub cache, revision v2), and the aliases ``dall-e-3`` and ``quick``."""
    return options_server


def _image(server, model: str, **fields) -> str:
    body = {
        "model": model,
        "prompt": "a lighthouse",
        "seed": 11,
        "num_inference_steps": 2,
        "response_format": "b64_json",
        **fields,
    }
    response = server.http.post("/v1/images/generations", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["b64_json"]


def test_models_list_the_lora_ids(lora_server):
    from model_files import HUB_LORA, OPTIONS_SERVER_IDS

    cards = {card["id"]: card for card in httpx.get(f"{lora_server.base_url}/v1/models", timeout=10).json()["data"]}
    assert set(cards) == OPTIONS_SERVER_IDS and {"tiny", "dall-e-3", "quick", "style", "fast", "hub"} <= set(cards)
    assert cards["dall-e-3"]["alias_of"] == "tiny" and cards["dall-e-3"]["profile"] == cards["tiny"]["profile"]
    assert cards["quick"]["alias_of"] == "fast" and cards["quick"]["preset"] == cards["fast"]["preset"]
    assert cards["style"]["base_model"] == cards["style"]["parent"] == "tiny" and cards["style"]["kind"] == "text-to-image"
    assert cards["fast"]["preset"]["name"] == "lightning" and cards["fast"]["preset"]["steps"] == 2
    assert [lora["name"] for lora in cards["tiny"]["profile"]["loras"]] == ["style", "fast", "hub"]
    assert cards["hub"]["base_model"] == "tiny" and cards["hub"]["preset"] == {}, "v2 has no preset file"
    assert cards["hub"]["lora"] == {"scale": 1.0, "mode": "hot-swap", "hub": HUB_LORA, "revision": "v2"}
    assert "hub" not in cards["style"]["lora"]
    one = httpx.get(f"{lora_server.base_url}/v1/models/fast", timeout=10).json()
    assert one["base_model"] == "tiny" and one["preset"]["scheduler"]["shift_terminal"] is None


def test_base_and_lora_ids_give_different_images_and_the_base_stays(lora_server):
    base = _image(lora_server, "tiny")
    style = _image(lora_server, "style")
    again = _image(lora_server, "tiny")
    assert style != base
    assert again == base
    assert _image(lora_server, "fast", num_inference_steps=None) not in (base, style)
    assert _image(lora_server, "hub") not in (base, style), "the hub LoRA, loaded by the workers from the hub cache"
    assert _image(lora_server, "tiny") == base
    # a request's own strength: 0 is the base image, and the LoRA's own strength comes back after it
    assert _image(lora_server, "style", lora_scale=0.0) == base
    assert _image(lora_server, "style") == style
    refused = httpx.post(
        f"{lora_server.base_url}/v1/images/generations", json={"model": "tiny", "prompt": "p", "lora_scale": 0.5}, timeout=10
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_scale"


def test_an_unknown_id_is_still_refused(lora_server):
    response = httpx.post(f"{lora_server.base_url}/v1/images/generations", json={"model": "nope", "prompt": "p"}, timeout=10)
    assert response.status_code == 400


def test_an_sdk_client_asking_for_an_alias_gets_its_models_image(lora_server):
    import openai

    client = openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="dall-e-3", prompt="a lighthouse", response_format="b64_json", extra_body={"seed": 11, "num_inference_steps": 2}
    )
    assert result.data[0].b64_json == _image(lora_server, "tiny")
    quick = client.images.generate(model="quick", prompt="a lighthouse", response_format="b64_json", extra_body={"seed": 11})
    assert quick.data[0].b64_json == _image(lora_server, "fast", num_inference_steps=None)  # the LoRA and its preset


def test_serve_refuses_an_alias_of_nothing_before_the_port_opens(tiny_t2i):
    refused = run_cli("serve", "--model", f"tiny={tiny_t2i}", "--port", "0", "--model-alias", "dall-e-3=nope")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--model-alias dall-e-3: nope is not a served model or LoRA id (served: tiny)" in refused.stderr
    assert "Uvicorn running" not in refused.stderr + refused.stdout
