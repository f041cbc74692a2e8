"""Other names of served models (``--model-alias``, or one source given under two ids): in process, on the fake engine."""

from __future__ import annotations

import pytest

from conftest import EDIT, T2I
from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.spec import ModelConfigError

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
SMALL = {"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def aliased(make_api):
    return make_api(model_aliases=[f"dall-e-3={T2I}", f"gpt-image-1={T2I}", f"dall-e-2={EDIT}"])


def test_a_request_naming_an_alias_runs_on_its_model(aliased):
    r = aliased.client.post(GENERATIONS, json={**SMALL, "model": "dall-e-3", "seed": 7})
    assert r.status_code == 200, r.text
    assert aliased.engine.jobs[-1][0] == T2I  # the engine is handed the model's own id
    same = aliased.client.post(GENERATIONS, json={**SMALL, "model": T2I, "seed": 7})
    assert same.json()["data"][0]["b64_json"] == r.json()["data"][0]["b64_json"]


def test_an_alias_keeps_what_its_model_can_do(aliased):
    r = aliased.client.post(EDITS, data={"model": "dall-e-3", "prompt": "x"}, files={"image": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and "does not do image edits" in r.json()["error"]["message"]
    assert "dall-e-3" in r.json()["error"]["message"]


def test_models_list_each_alias_with_the_model_it_names(aliased):
    cards = {card["id"]: card for card in aliased.client.get("/v1/models").json()["data"]}
    assert cards["dall-e-3"]["alias_of"] == cards["gpt-image-1"]["alias_of"] == T2I
    assert cards["dall-e-2"]["alias_of"] == EDIT and cards["dall-e-2"]["kind"] == cards[EDIT]["kind"]
    assert "alias_of" not in cards[T2I]
    one = aliased.client.get("/v1/models/gpt-image-1").json()
    assert (one["id"], one["alias_of"], one["object"]) == ("gpt-image-1", T2I, "model")


def test_metrics_count_requests_to_an_alias_under_the_model_it_names(aliased):
    """Not under the alias (nor ``other``): the jobs' metrics (images, calls, timings) count under the model, and one
    model's requests in two series left its error rate without the aliased ones."""
    aliased.client.post(GENERATIONS, json={**SMALL, "model": "gpt-image-1"})
    lines = aliased.client.get("/metrics").text.splitlines()
    counted = [line for line in lines if line.startswith("qis_requests_total{") and 'status="200"' in line]
    assert not any("gpt-image-1" in line or 'model="other"' in line for line in counted), counted
    assert any(f'model="{T2I}"' in line and "generations" in line for line in counted), counted


def test_one_folder_under_two_ids_is_one_model_with_two_names(make_api, tiny_t2i):
    api = make_api(models={"fast": tiny_t2i, "hq": tiny_t2i})
    assert [spec.id for spec in api.engine.models] == ["fast"]  # loaded once
    cards = {card["id"]: card for card in api.client.get("/v1/models").json()["data"]}
    assert set(cards) == {"fast", "hq"} and cards["hq"]["alias_of"] == "fast"
    assert api.client.post(GENERATIONS, json={**SMALL, "model": "hq"}).status_code == 200
    assert api.engine.jobs[-1][0] == "fast"


@pytest.mark.parametrize(
    "aliases,message",
    [
        (["dall-e-3"], "expected ALIAS=MODEL, got 'dall-e-3'"),
        (["dall-e-3=no-such-model"], "--model-alias dall-e-3: no-such-model is not a served model or LoRA id"),
        ([f"{EDIT}={T2I}"], f"--model-alias {EDIT}: {EDIT} is a served model or LoRA id already"),
        ([f"x={T2I}", f"x={EDIT}"], f"--model-alias x names two models: {T2I} and {EDIT}"),
        ([f"x@y={T2I}"], "--model-alias 'x@y': an alias is letters, digits and"),
        ([f"two words={T2I}"], "--model-alias 'two words': an alias is"),
    ],
)
def test_bad_aliases_are_refused_before_anything_loads(tiny_models, aliases, message):
    settings = Settings(models=[f"{name}={folder}" for name, folder in tiny_models.items()], model_aliases=aliases)
    with pytest.raises(ModelConfigError) as refused:
        resolve_configured(settings)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (("a", "b", "a"), "--model a={edit} (the source of b again): a is a served model or LoRA id already"),
        (("a", "../x", None), "--model '../x'={t2i} (the source of a again): a model id is letters, digits and"),
    ],
)
def test_a_source_given_again_under_a_bad_id_names_the_model_flag_not_model_alias(tiny_t2i, tiny_edit, ids, message):
    """A source given twice under a second id becomes another name of its model; when that id is bad, the message
    named --model-alias, a flag the user never typed."""
    first, second, third = ids
    models = [f"{first}={tiny_t2i}", f"{second}={tiny_edit if third else tiny_t2i}"] + ([f"{third}={tiny_edit}"] if third else [])
    with pytest.raises(ModelConfigError) as refused:
        resolve_configured(Settings(models=models))
    assert message.format(edit=tiny_edit, t2i=tiny_t2i) in str(refused.value)
    assert "--model-alias" not in str(refused.value)


def test_aliases_come_from_the_environment_separated_by_semicolons(monkeypatch, tiny_models):
    monkeypatch.setenv("QIS_MODEL_ALIASES", f"dall-e-3={T2I}; dall-e-2={EDIT}")
    specs = resolve_configured(Settings(models=[f"{name}={folder}" for name, folder in tiny_models.items()]))
    assert {spec.id: spec.aliases for spec in specs}[T2I] == (("dall-e-3", T2I),)
    assert {spec.id: spec.aliases for spec in specs}[EDIT] == (("dall-e-2", EDIT),)


def test_an_alias_of_a_lora_id_runs_the_lora_with_its_preset(make_api, tiny_models, tiny_lora):
    api = make_api(loras=[f"fast={tiny_lora}:preset=lightning,steps=3"], model_aliases=["dall-e-3=fast"])
    r = api.client.post(GENERATIONS, json={"model": "dall-e-3", "prompt": "a lighthouse", "size": "256x256"})
    assert r.status_code == 200, r.text
    model, job = api.engine.jobs[-1]
    assert (model, job.lora, job.num_inference_steps, job.true_cfg_scale) == (T2I, "fast", 3, 1.0)
    card = api.client.get("/v1/models/dall-e-3").json()
    assert (card["alias_of"], card["base_model"], card["preset"]["steps"]) == ("fast", T2I, 3)
    scaled = api.client.post(GENERATIONS, json={"model": "dall-e-3", "prompt": "x", "size": "256x256", "lora_scale": 0.5})
    assert scaled.status_code == 200 and api.engine.jobs[-1][1].lora_scale == 0.5


@pytest.mark.parametrize("setting", [{"cache": ["fbcache@dall-e-3"]}, {"model_workers": ["2@dall-e-3"]}])
def test_a_setting_scoped_to_an_alias_says_to_name_the_model(tiny_models, setting):
    entries = [f"{name}={folder}" for name, folder in tiny_models.items()]
    settings = Settings(models=entries, model_aliases=[f"dall-e-3={T2I}"], **setting)
    with pytest.raises(ModelConfigError) as refused:
        resolve_configured(settings)
    assert "names dall-e-3, another name of a served model" in str(refused.value)
    assert "scope it to the model's own id" in str(refused.value)


def test_a_setting_scoped_to_the_second_id_of_a_repeated_source_says_so_too(tiny_t2i):
    settings = Settings(models=[f"fast={tiny_t2i}", f"hq={tiny_t2i}"], quantize=["fp8@hq"])
    with pytest.raises(ModelConfigError, match="--quantize names hq, another name of a served model"):
        resolve_configured(settings)
