"""Run profiles: defaults, sidecar, flags (scoped to a model or not), and the errors they give."""

import json
import shutil

import pytest

from qwen_image_server.config import Settings
from qwen_image_server.models.profile import ProfileError, RunProfile, build_profile, parse_lora, scoped_value
from qwen_image_server.models.spec import SIDECAR_NAME, ModelConfigError, resolve_configured


def test_defaults_are_plain_diffusers():
    profile = build_profile("m", {}, {})
    assert profile == RunProfile()
    assert (profile.compile, profile.cache, profile.quantize, profile.offload, profile.loras) == (False, None, "none", "none", ())


def test_flag_for_a_named_model_wins_over_one_for_all_and_over_the_sidecar():
    flags = {"offload": ["group@b", "model"], "quantize": ["fp8@a"], "compile": ["true"]}
    a = build_profile("a", {"offload": "sequential", "quantize": "none"}, flags)
    b = build_profile("b", {}, flags)
    assert (a.offload, a.quantize, a.compile) == ("model", "fp8", True)
    assert (b.offload, b.quantize) == ("group", "none")
    assert build_profile("c", {"cfg_batch": "on"}, {}).cfg_batch == "on"


def test_scoped_value_takes_the_last_of_each_kind():
    assert scoped_value(["x", "y@m", "z", "w@m"], "m") == "w"
    assert scoped_value(["x", "y@other"], "m") == "x"
    assert scoped_value([], "m") is None


def test_bad_values_name_the_setting_and_the_model():
    with pytest.raises(ProfileError, match="offload for model a: 'swap' is not one of none, text-encoder"):
        build_profile("a", {}, {"offload": ["swap"]})
    with pytest.raises(ProfileError, match="compile_sizes for model a: '1024' is not WIDTHxHEIGHT"):
        build_profile("a", {"compile_sizes": ["1024"]}, {})
    assert build_profile("a", {}, {"compile_sizes": ["1024x1024,1328X1328"]}).compile_sizes == ("1024x1024", "1328x1328")


def test_parse_lora():
    lora = parse_lora("lightning=/loras/l.safetensors@qwen-image")
    assert (lora.name, lora.path, lora.model) == ("lightning", "/loras/l.safetensors", "qwen-image")
    assert parse_lora("style=rel/s.safetensors").model is None
    with pytest.raises(ProfileError, match="NAME=PATH"):
        parse_lora("no-path")


def test_settings_reach_each_model(tiny_t2i, tiny_lora, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_t2i, other)
    sidecar = json.loads((other / SIDECAR_NAME).read_text())
    (other / SIDECAR_NAME).write_text(json.dumps({**sidecar, "cache": "fbcache:threshold=0.1"}))
    settings = Settings(models=[f"a={tiny_t2i}", f"b={other}"], offload=["text-encoder@a"], loras=[f"l={tiny_lora}"])
    a, b = resolve_configured(settings)
    assert a.profile.offload == "text-encoder" and b.profile.offload == "none"
    assert b.profile.cache == "fbcache:threshold=0.1" and a.profile.cache is None
    assert [lora.name for lora in a.profile.loras] == ["l"] and b.profile.loras == (), (
        "a LoRA without @MODEL goes to the first text-to-image model"
    )


def test_a_flag_naming_a_model_that_is_not_served_is_refused(tiny_t2i):
    with pytest.raises(ModelConfigError, match="--offload names models that are not served: nope"):
        resolve_configured(Settings(models=[f"a={tiny_t2i}"], offload=["group@nope"]))
    with pytest.raises(ModelConfigError, match="--lora l: base model nope is not served"):
        resolve_configured(Settings(models=[f"a={tiny_t2i}"], loras=["l=/x.safetensors@nope"]))


def test_environment_values_split_on_semicolons(monkeypatch):
    monkeypatch.setenv("QIS_CACHE", "fbcache:threshold=0.05,warmup=2;none@b")
    monkeypatch.setenv("QIS_COMPILE", "true")
    settings = Settings()
    assert settings.cache == ["fbcache:threshold=0.05,warmup=2", "none@b"]
    assert settings.profile_flags()["compile"] == ["True"]


def test_vae_tiling_from_flags_environment_and_sidecar(monkeypatch):
    assert build_profile("a", {}, {}).vae_tiling == "off"
    assert build_profile("a", {"vae_tiling": True}, {}).vae_tiling == "on"
    assert build_profile("a", {"vae_tiling": "on"}, {"vae_tiling": ["off@a"]}).vae_tiling == "off"
    with pytest.raises(ProfileError, match="vae_tiling for model a: 'tiles' is not one of off, on"):
        build_profile("a", {}, {"vae_tiling": ["tiles"]})
    monkeypatch.setenv("QIS_VAE_TILING", "on@b;off")
    assert Settings().profile_flags()["vae_tiling"] == ["on@b", "off"]
