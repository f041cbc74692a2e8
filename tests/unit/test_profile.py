"""Run profiles: defaults, sidecar, flags (scoped to a model or not), and the errors they give."""

import json
import shutil

import pytest

from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.profile import ProfileError, RunProfile, build_profile, parse_lora, scoped_value
from qwen_image_server.models.spec import SIDECAR_NAME, ModelConfigError


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
    with pytest.raises(ProfileError, match="--offload for model a: 'swap' is not one of none, text-encoder"):
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
    with pytest.raises(ModelConfigError, match=r"--offload \(or QIS_OFFLOAD\) names models that are not served: nope"):
        resolve_configured(Settings(models=[f"a={tiny_t2i}"], offload=["group@nope"]))
    with pytest.raises(ModelConfigError, match="--lora l: base model nope is not served"):
        resolve_configured(Settings(models=[f"a={tiny_t2i}"], loras=["l=/x.safetensors@nope"]))


def test_environment_values_split_on_semicolons(monkeypatch):
    monkeypatch.setenv("QIS_CACHE", "fbcache:threshold=0.05,warmup=2;none@b")
    monkeypatch.setenv("QIS_COMPILE", "true")
    settings = Settings()
    assert settings.cache == ["fbcache:threshold=0.05,warmup=2", "none@b"]
    assert settings.profile_flags()["compile"] == ["True"]


def test_compile_and_deterministic_per_model_from_the_command_line_and_the_environment(tiny_t2i, tiny_edit, monkeypatch):
    """``--compile on|off@MODEL`` and ``--deterministic on|off@MODEL`` (or ``=VALUE``) reach one model, beside the bare
    flags for every model, as every other profile setting's ``VALUE@MODEL`` does; wrong ones are refused naming it."""
    from typer.testing import CliRunner

    from qwen_image_server import cli

    def profiles(*args: str, env: dict | None = None) -> dict[str, tuple[bool, bool]]:
        seen: list[Settings] = []
        monkeypatch.setattr(cli, "run_server", lambda settings, log_level: seen.append(settings))
        result = CliRunner().invoke(cli.app, ["serve", "--model", f"a={tiny_t2i}", "--model", f"b={tiny_edit}", *args], env=env)
        assert result.exit_code == 0, result.output
        return {spec.id: (spec.profile.compile, spec.profile.deterministic) for spec in resolve_configured(seen[0])}

    assert profiles() == {"a": (False, False), "b": (False, False)}
    assert profiles("--compile", "on@a") == {"a": (True, False), "b": (False, False)}
    assert profiles("--compile=on@b", "--deterministic", "on@a") == {"a": (False, True), "b": (True, False)}
    assert profiles("--compile", "--compile", "off@b", "--port", "0") == {"a": (True, False), "b": (False, False)}
    assert profiles("--compile", "off") == {"a": (False, False), "b": (False, False)}  # a value for every model
    assert profiles("--no-compile", "--deterministic") == {"a": (False, True), "b": (False, True)}
    # given twice, whatever the forms, the last one wins (a bare flag lost to any value given with one)
    assert profiles("--compile=off", "--compile") == {"a": (True, False), "b": (True, False)}
    assert profiles("--compile", "on", "--no-compile") == {"a": (False, False), "b": (False, False)}
    assert profiles("--deterministic", "on", "--no-deterministic") == {"a": (False, False), "b": (False, False)}
    assert profiles("--no-compile", env={"QIS_MODEL_COMPILE": "on"}) == {"a": (False, False), "b": (False, False)}
    # the environment: QIS_MODEL_COMPILE (';'-separated) beside QIS_COMPILE, flags winning
    env = {"QIS_COMPILE": "1", "QIS_MODEL_COMPILE": "off@a; on@b", "QIS_MODEL_DETERMINISTIC": "on@b"}
    assert profiles(env=env) == {"a": (False, False), "b": (True, True)}
    assert profiles("--compile", "on@a", env=env) == {"a": (True, False), "b": (True, True)}
    # refused before anything starts, naming the flag or the model
    for args, message in [
        (
            ["--compile", "on@nope"],
            "error: --compile (or QIS_MODEL_COMPILE) names models that are not served: nope (served: a, b)",
        ),
        (["--compile", "maybe@a"], "error: --compile for model a: expected on or off (or true, false, 1, 0), got 'maybe'"),
        (["--deterministic=sure"], "error: --deterministic for model a: expected on or off (or true, false, 1, 0), got 'sure'"),
    ]:
        result = CliRunner().invoke(cli.app, ["plan", "--model", f"a={tiny_t2i}", "--model", f"b={tiny_edit}", *args])
        assert (result.exit_code, result.output.strip()) == (2, message), result.output


def test_boolean_profile_flags_take_a_value_only_where_one_follows():
    from qwen_image_server.cli import scoped_boolean_args

    assert scoped_boolean_args(["--compile", "--port", "0"]) == ["--compile-for", "on", "--port", "0"]
    assert scoped_boolean_args(["--compile", "on@a", "--compile=off@b"]) == ["--compile-for", "on@a", "--compile-for", "off@b"]
    assert scoped_boolean_args(["--deterministic", "on@a", "--no-compile"]) == [
        "--deterministic-for", "on@a", "--compile-for", "off",
    ]  # fmt: skip
    assert scoped_boolean_args(["--compile"]) == ["--compile-for", "on"]
    assert scoped_boolean_args(["--", "--compile", "on@a"]) == ["--", "--compile", "on@a"]  # after --: as given
    assert scoped_boolean_args(["--compile-sizes", "256x256@a"]) == ["--compile-sizes", "256x256@a"]


def test_vae_tiling_from_flags_environment_and_sidecar(monkeypatch):
    assert build_profile("a", {}, {}).vae_tiling == "off"
    assert build_profile("a", {"vae_tiling": True}, {}).vae_tiling == "on"
    assert build_profile("a", {"vae_tiling": "on"}, {"vae_tiling": ["off@a"]}).vae_tiling == "off"
    with pytest.raises(ProfileError, match="^--vae-tiling for model a: 'tiles' is not one of off, on$"):
        build_profile("a", {}, {"vae_tiling": ["tiles"]})  # a flag's value: the flag is named
    with pytest.raises(ProfileError, match="^vae_tiling for model a: 'tiles' is not one of off, on .from the model folder's"):
        build_profile("a", {"vae_tiling": "tiles"}, {})  # the sidecar's: its key is
    monkeypatch.setenv("QIS_VAE_TILING", "on@b;off")
    assert Settings().profile_flags()["vae_tiling"] == ["on@b", "off"]


def test_cfg_batch_auto_and_deterministic_are_refused_together():
    """``auto`` batches a request or not by the memory free when it starts, and batched and unbatched passes round
    differently: under ``--deterministic`` the same seed could give other pixels."""
    from qwen_image_server.models.profile import ProfileError, build_profile

    with pytest.raises(ProfileError, match="model m: cfg_batch=auto does not combine with deterministic"):
        build_profile("m", {}, {"cfg_batch": ["auto"], "deterministic": ["true"]})
    for mode in ("on", "off"):
        assert build_profile("m", {}, {"cfg_batch": [mode], "deterministic": ["true"]}).cfg_batch == mode
    assert build_profile("m", {}, {"cfg_batch": ["auto"]}).cfg_batch == "auto"
    # on and off spelled as every other on/off setting takes them (QIS_CFG_BATCH=true was refused)
    assert [build_profile("m", {}, {"cfg_batch": [v]}).cfg_batch for v in ("true", "1", "false", "no")] == [
        "on",
        "on",
        "off",
        "off",
    ]
    assert build_profile("m", {"cfg_batch": True}, {}).cfg_batch == "on"
    with pytest.raises(ProfileError, match="--cfg-batch for model m: 'sometimes' is not one of"):
        build_profile("m", {}, {"cfg_batch": ["sometimes"]})


def test_a_setting_may_be_scoped_to_a_model_id_with_a_slash(tiny_t2i, tiny_edit):
    """``--model Qwen/Qwen-Image=/srv/...`` answers clients that send OpenAI-style hub names; ``--cache
    fbcache@Qwen/Qwen-Image`` was read as an unknown policy ``fbcache@Qwen/Qwen-Image``. A LoRA's path keeps an '@'
    followed by a '/' (a folder named ``x@v2``)."""
    from qwen_image_server.models.lora import parse_lora_flag
    from qwen_image_server.models.spec import ModelConfigError

    models = [f"Qwen/Qwen-Image={tiny_t2i}", f"edit={tiny_edit}"]
    specs = {
        spec.id: spec.profile
        for spec in resolve_configured(
            Settings(models=models, cache=["fbcache@Qwen/Qwen-Image"], offload=["model@Qwen/Qwen-Image"])
        )
    }
    assert specs["Qwen/Qwen-Image"].cache.startswith("fbcache") and specs["Qwen/Qwen-Image"].offload == "model"
    assert specs["edit"].cache is None and specs["edit"].offload == "none"
    with pytest.raises(
        ModelConfigError, match=r"--cache \(or QIS_CACHE\) names models that are not served: Qwen/Qwen-Image-Edit"
    ):
        resolve_configured(Settings(models=models, cache=["fbcache@Qwen/Qwen-Image-Edit"]))
    lora = parse_lora_flag("style=/loras/style@v2/style.bin")
    assert (str(lora.path), lora.model) == ("/loras/style@v2/style.bin", None)
    # after a .safetensors file (and its options), an '@' scopes the LoRA, to an id with a '/' too
    for text in ("style=/loras/a.safetensors@Qwen/Qwen-Image", "style=/loras/a.safetensors:scale=0.5@Qwen/Qwen-Image"):
        lora = parse_lora_flag(text)
        assert (str(lora.path), lora.model) == ("/loras/a.safetensors", "Qwen/Qwen-Image"), text
    assert parse_lora_flag("style=/loras/a@b/c.safetensors").model is None


def test_a_flag_replaces_a_bad_value_of_the_folders_file_and_a_bad_one_there_is_named_as_its(tmp_path, tiny_t2i):
    """A broken shared model folder's ``qwen_image_server.json`` (``"cache": "fbcache:threshold=5"``): ``--cache
    none`` serves it anyway (its value was checked first), and without the flag the error says where the value is."""
    folder = tmp_path / "shared"
    shutil.copytree(tiny_t2i, folder)
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    (folder / SIDECAR_NAME).write_text(json.dumps({**sidecar, "cache": "fbcache:threshold=5"}))
    (spec,) = resolve_configured(Settings(models=[f"m={folder}"], cache=["none"]))
    assert spec.profile.cache is None
    with pytest.raises(
        ModelConfigError, match=r"threshold: '5' is not in \[0, 1\];.* \(from the model folder's qwen_image_server.json; a flag"
    ):
        resolve_configured(Settings(models=[f"m={folder}"]))


def test_loras_in_the_folders_file_are_refused_pointing_to_the_flag(tmp_path, tiny_t2i):
    """LoRAs are flags only: a ``loras`` key in the folder's file said only "unknown keys ['loras']"."""
    folder = tmp_path / "with-loras"
    shutil.copytree(tiny_t2i, folder)
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    (folder / SIDECAR_NAME).write_text(json.dumps({**sidecar, "loras": ["style=/l/a.safetensors"]}))
    with pytest.raises(ModelConfigError, match=r"unknown keys \['loras'\] \(LoRAs are given with --lora NAME=PATH@MODEL"):
        resolve_configured(Settings(models=[f"m={folder}"]))


def test_compile_sizes_without_compile_are_said_to_do_nothing(tiny_t2i, caplog):
    """``--compile-sizes`` without ``--compile`` was taken without a word (and shown in /v1/models as if warmed)."""
    import logging

    with caplog.at_level(logging.WARNING):
        resolve_configured(Settings(models=[f"m={tiny_t2i}"], compile_sizes=["512x512"]))
        resolve_configured(Settings(models=[f"c={tiny_t2i}"], compile_sizes=["512x512"], compile=True))
    assert [r.getMessage() for r in caplog.records] == [
        "m: compile sizes are given but compile is off: nothing is compiled or warmed"
    ]
