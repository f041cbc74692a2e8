"""Start-up refusals of configured values: one clear line naming the flag, variable or file and the value, exit 2
from ``serve`` and ``plan`` before any port opens or model loads (configured defaults are valid request values)."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_image_server import cli, cli_run
from qwen_image_server.cli import app
from qwen_image_server.config import Settings
from qwen_image_server.config_files import directory_problem
from qwen_image_server.limits import LORA_SCALE_LIMITS, TRUE_CFG_SCALE_LIMITS
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.lora import parse_lora_flag
from qwen_image_server.models.profile import ProfileError
from qwen_image_server.models.spec import ModelConfigError, resolve_model


@pytest.fixture
def no_port(monkeypatch):
    """``serve`` must refuse before this: a start that is not refused fails here instead of serving."""

    def opening(host: str, port: int) -> None:
        raise RuntimeError("serve went on to open the port")

    monkeypatch.setattr(cli_run, "_check_port_free", opening)


def refused(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The error of ``serve`` and ``plan`` with ``args`` (both exit 2 with the same message)."""
    outputs = []
    for command in ("plan", "serve"):
        result = CliRunner().invoke(app, [command, *args], env=env)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        outputs.append(result.output)
    plan_out, serve_out = outputs
    assert plan_out.strip() == serve_out.strip()
    assert "Traceback" not in plan_out
    return plan_out.strip().splitlines()


@pytest.fixture
def folder(tiny_t2i, tmp_path) -> Path:
    """A copy of the tiny text-to-image model whose files a test may change."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_t2i, copy)
    return copy


# --- 1. configured values held to the limits of requests ----------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("foo", "must be WIDTHxHEIGHT (like 1024x1024), got 'foo'"),
        ("100x100", "width and height must be between 256 and 2048, got 100x100"),
        ("1000x1000", "width and height must be multiples of 16, got 1000x1000"),
    ],
)
def test_a_bad_default_size_is_refused_at_start(tiny_t2i, no_port, value, says):
    lines = refused(["--model", str(tiny_t2i)], env={"QIS_DEFAULT_SIZE": value})
    assert lines == ["error: invalid settings:", f"  QIS_DEFAULT_SIZE: {says} (the size of requests that give none)"]
    assert Settings(default_size="512x512").default_size == "512x512"


@pytest.mark.parametrize(("steps", "max_steps"), [("1", "100"), ("60", "40")])
def test_a_default_step_count_requests_could_not_ask_for_is_refused(tiny_t2i, no_port, steps, max_steps):
    lines = refused(["--model", str(tiny_t2i)], env={"QIS_DEFAULT_STEPS": steps, "QIS_MAX_STEPS": max_steps})
    assert (
        lines[1]
        == f"  QIS_DEFAULT_STEPS={steps} must be from 2 to QIS_MAX_STEPS={max_steps} (the steps of requests that give none)"
    )


@pytest.mark.parametrize(
    ("limits", "size", "steps"),
    [
        ({}, "1024x1024", 50),
        ({"max_image_side": 768, "max_steps": 40}, "768x768", 40),
        ({"max_image_side": 1000}, "992x992", 50),  # a side is a multiple of 16
        ({"min_image_side": 1100, "max_image_side": 2048}, "1104x1104", 50),
        ({"min_image_side": 1100, "max_image_side": 1110}, "1104x1104", 50),
        ({"max_steps": 2}, "1024x1024", 2),
    ],
)
def test_defaults_not_given_follow_the_limits(limits, size, steps):
    """A request that gives no size or steps gets values it could have asked for: the published models' 1024x1024
    and 50 steps, brought within the side and step limits when those are lower (or higher)."""
    settings = Settings(**limits)
    assert (settings.default_size, settings.default_steps) == (size, steps)


def test_side_limits_that_hold_no_valid_side_are_refused(tiny_t2i, no_port):
    lines = refused(["--model", str(tiny_t2i)], env={"QIS_MIN_IMAGE_SIDE": "1000", "QIS_MAX_IMAGE_SIDE": "1005"})
    assert lines[1] == (
        "  QIS_MIN_IMAGE_SIDE=1000 to QIS_MAX_IMAGE_SIDE=1005 holds no multiple of 16: no request size would be valid"
    ), lines
    (line,) = refused(["--model", str(tiny_t2i)], env={"QIS_MAX_STEPS": "1"})[1:]
    assert "QIS_MAX_STEPS" in line and "greater than or equal to 2" in line, line


@pytest.mark.parametrize(
    ("sidecar", "says"),
    [
        ({"default_steps": -3}, "default_steps must be an integer from 2 to 100 (QIS_MAX_STEPS), as requests' "),
        ({"default_steps": "4"}, "default_steps must be an integer from 2 to 100"),
        ({"default_size": "100x100"}, "default_size width and height must be between 256 and 2048, got 100x100"),
        ({"default_size": "foo"}, "default_size must be WIDTHxHEIGHT (like 1024x1024), got 'foo'"),
        ({"default_size": 5}, "default_size must be WIDTHxHEIGHT (like 1024x1024), got 5"),
        ({"edit_area": "big"}, "edit_area must be a positive integer (an area in pixels), got 'big'"),
        ({"edit_area": -5}, "edit_area must be a positive integer (an area in pixels), got -5"),
        ({"condition_area": 0}, "condition_area must be a positive integer (an area in pixels), got 0"),
        ({"condition_area": True}, "condition_area must be a positive integer (an area in pixels), got True"),
    ],
)
def test_a_bad_sidecar_default_is_refused_naming_the_file(folder, no_port, sidecar, says):
    (folder / "qwen_image_server.json").write_text(json.dumps(sidecar))
    (line,) = refused(["--model", str(folder)])
    assert line.startswith(f"error: {folder}/qwen_image_server.json: {says}"), line


def test_a_lora_preset_with_more_steps_than_requests_may_run_is_refused(tiny_t2i, tiny_lora, no_port):
    lightning = f"fast={tiny_lora}:preset=lightning"  # 8 steps
    lines = refused(["--model", f"m={tiny_t2i}", "--lora", lightning], env={"QIS_MAX_STEPS": "6"})
    assert lines == [
        "error: LoRA fast: its preset runs 8 steps, more than QIS_MAX_STEPS=6 allows a request (set steps=N in --lora, "
        "or raise QIS_MAX_STEPS)"
    ]
    specs = resolve_configured(Settings(models=[f"m={tiny_t2i}"], loras=[f"{lightning},steps=4"], max_steps=6))
    assert specs[0].profile.loras[0].preset["steps"] == 4


@pytest.mark.parametrize("size", ["0x0", "100x100", "99999x99999"])
def test_compile_sizes_outside_the_side_limits_are_refused(tiny_t2i, no_port, size):
    (line,) = refused(["--model", f"m={tiny_t2i}", "--compile", "--compile-sizes", size])
    assert line.startswith("error: --compile-sizes (QIS_COMPILE_SIZES) for model m: width and height must be between 256 ")
    assert f"got {size}" in line


def test_compile_sizes_of_a_sidecar_are_refused_naming_it(folder):
    (folder / "qwen_image_server.json").write_text(json.dumps({"compile_sizes": ["512x512", "64x64"]}))
    with pytest.raises(ModelConfigError, match=r"qwen_image_server.json: compile_sizes for model model: .* got 64x64"):
        resolve_configured(Settings(models=[str(folder)]))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ("scale=-5", "scale must be between 0.0 and 2.0, as a request's lora_scale, got -5"),
        ("scale=2.5", "scale must be between 0.0 and 2.0, as a request's lora_scale, got 2.5"),
        ("true_cfg_scale=-1", "true_cfg_scale must be between 0.0 and 20.0, as a request's true_cfg_scale, got -1"),
        ("true_cfg_scale=21", "true_cfg_scale must be between 0.0 and 20.0, as a request's true_cfg_scale, got 21"),
    ],
)
def test_lora_values_outside_what_requests_accept_are_refused(tiny_t2i, tiny_lora, no_port, options, says):
    (line,) = refused(["--model", str(tiny_t2i), "--lora", f"a={tiny_lora}:{options}"])
    assert line == f"error: LoRA a (--lora): {says}"
    with pytest.raises(ProfileError):
        parse_lora_flag(f"a=/x.safetensors:{options}")
    ok = parse_lora_flag("a=/x.safetensors:scale=0,true_cfg_scale=20")
    assert (ok.scale, ok.preset["true_cfg_scale"]) == (0.0, 20.0)


def test_lora_limits_are_those_of_requests():
    from qwen_image_server.protocol.images import GenerationRequest

    def bounds(field: str) -> tuple[float, float]:
        rules = GenerationRequest.model_fields[field].metadata
        return next(r.ge for r in rules if hasattr(r, "ge")), next(r.le for r in rules if hasattr(r, "le"))

    assert (bounds("lora_scale"), bounds("true_cfg_scale")) == (LORA_SCALE_LIMITS, TRUE_CFG_SCALE_LIMITS)


def test_a_lora_preset_file_is_held_to_the_same_limits(tiny_t2i, tiny_lora, tmp_path):
    lora = tmp_path / "l.safetensors"
    shutil.copy(tiny_lora, lora)
    lora.with_suffix(".json").write_text(json.dumps({"true_cfg_scale": -1}))
    with pytest.raises(ModelConfigError, match=r"l.json\): true_cfg_scale must be between 0.0 and 20.0"):
        resolve_configured(Settings(models=[str(tiny_t2i)], loras=[f"a={lora}"]))


def test_an_image_output_dir_that_is_a_file_is_refused(tiny_t2i, tmp_path, no_port):
    file = tmp_path / "taken"
    file.write_text("x")
    lines = refused(["--model", str(tiny_t2i), "--image-output-dir", str(file)])
    assert lines[1] == f"  --image-output-dir: {file} is a file, not a folder (url-format images are stored in this folder)"
    lines = refused(["--model", str(tiny_t2i)], env={"IMAGE_OUTPUT_DIR": str(file)})
    assert lines[1].startswith(f"  IMAGE_OUTPUT_DIR or QIS_IMAGE_OUTPUT_DIR: {file} is a file, not a folder")
    # a folder that does not exist yet is made when the first image is stored
    assert directory_problem(tmp_path / "new" / "deeper") is None and directory_problem(tmp_path) is None
    assert Settings(image_output_dir=tmp_path / "new").image_output_dir == tmp_path / "new"


def test_paths_the_system_refuses_to_look_at_are_one_line_each_not_a_traceback(tiny_t2i, tmp_path, no_port):
    """A name longer than the file system allows (stat() itself fails) as a model folder, a bare model name, a LoRA
    file or the output folder: ``serve`` and ``plan`` end with one line naming the path and the reason."""
    long = tmp_path / ("x" * 300)
    assert refused(["--model", str(long)]) == [f"error: cannot use {long}: File name too long"]
    assert refused(["--model", "x" * 300]) == [f"error: cannot use {'x' * 300}: File name too long"]
    lines = refused(["--model", str(tiny_t2i), "--lora", f"a={long}.safetensors"])
    assert lines == [f"error: cannot use {long}.safetensors: File name too long"]
    lines = refused(["--model", str(tiny_t2i), "--image-output-dir", str(long / "images")])
    assert lines[1] == (
        f"  --image-output-dir: {long}/images cannot be used: File name too long (url-format images are stored in this folder)"
    )


def test_an_address_that_cannot_be_listened_on_is_refused_before_any_worker_starts(tiny_t2i, monkeypatch):
    """A port in use, and an address of no interface here (TEST-NET-1; with --port 0 too: before, that one loaded
    every model and then ended with uvicorn's own error)."""
    import socket

    from typer.testing import CliRunner

    def planned(*args, **kwargs):
        raise AssertionError("serve went on to plan and start workers")

    monkeypatch.setattr("qwen_image_server.models.planner.checked_plan", planned)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--port", "0", "--host", "192.0.2.1"], "error: cannot listen on 192.0.2.1:0: Cannot assign requested address"),
        ]
        for args, message in cases:
            result = CliRunner().invoke(cli.app, ["serve", "--model", str(tiny_t2i), "--host", "127.0.0.1", *args])
            assert result.exit_code == 2 and result.output.startswith(message), result.output


# --- 2. one source given twice is one model ---------------------------------------------------------------------
def test_one_folder_spelled_twice_is_one_model(tiny_t2i, monkeypatch):
    monkeypatch.chdir(tiny_t2i.parent)
    relative = f"./{tiny_t2i.name}"
    for second in (f"{tiny_t2i}/", relative, f"{relative}/", str(tiny_t2i)):
        (spec,) = resolve_configured(Settings(models=[str(tiny_t2i), second]))
        assert spec.id == "text-to-image" and spec.aliases == ()
    (named,) = resolve_configured(Settings(models=[f"a={tiny_t2i}", f"b={relative}/", f"c={tiny_t2i.parent}/{tiny_t2i.name}"]))
    assert named.id == "a" and named.aliases == (("b", "a"), ("c", "a")), "served once, answering to every id"
    assert Settings(models=["Org/Name", "Org/Name@v1"]).model_entries() == [(None, "Org/Name"), (None, "Org/Name@v1")]


# --- 3. clear messages ------------------------------------------------------------------------------------------
def test_a_model_index_that_is_not_an_object_is_named(folder, no_port):
    (folder / "model_index.json").write_text("[]")
    assert refused(["--model", str(folder)]) == [f"error: {folder}/model_index.json must hold a JSON object, not list []"]


@pytest.mark.parametrize("name", ["model_index.json", "qwen_image_server.json"])
def test_invalid_json_names_the_file(folder, no_port, name):
    (folder / name).write_text("{bad")
    assert refused(["--model", str(folder)]) == [
        f"error: {folder}/{name} is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    ]


def test_a_sidecar_that_is_not_an_object_is_named(folder):
    (folder / "qwen_image_server.json").write_text("[1]")
    with pytest.raises(ModelConfigError, match=r"qwen_image_server.json must hold a JSON object, not list \[1\]$"):
        resolve_model(str(folder))


@pytest.mark.parametrize(("given", "shown"), [("=", "'='"), ("", "''"), ("a=", "'a='")])
def test_an_empty_model_source_is_said_so(no_port, given, shown):
    expected = f"error: --model {shown} (or QIS_MODELS): the model source is empty (expected [ID=]PATH_OR_HUB_ID)"
    assert refused(["--model", given]) == [expected]


def test_min_side_above_max_side_names_both_variables_and_values(tiny_t2i, no_port):
    lines = refused(["--model", str(tiny_t2i)], env={"QIS_MIN_IMAGE_SIDE": "3000"})
    assert lines == ["error: invalid settings:", "  QIS_MIN_IMAGE_SIDE=3000 must not exceed QIS_MAX_IMAGE_SIDE=2048"]


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("127.0.0.1", [], False),
        ("::1", [], False),
        ("localhost", [], False),
        ("127.0.0.2", [], False),
        ("0.0.0.0", ["sk-a"], False),
        ("0.0.0.0", [], True),
        ("::", [], True),
        ("192.168.1.5", [], True),
        ("myhost.example", [], True),
    ],
)
def test_listening_beyond_this_machine_without_a_key_is_warned(host, keys, warned):
    """README: the server binds 127.0.0.1 by default, and a key is the first thing to give before binding 0.0.0.0;
    serve says so when it listens beyond loopback with none."""
    from qwen_image_server.cli_run import open_without_keys

    warning = open_without_keys(Settings(host=host, api_keys=keys))
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"listening on {host}:8000 with no API key: anyone who can reach this port can run jobs")
        assert "--api-key" in warning


def test_an_api_keys_file_that_cannot_be_read_or_holds_no_key_is_refused_before_anything_starts(tiny_t2i, no_port, tmp_path):
    """``plan`` made no such check and ``serve`` made it only once the app started (its workers' forkserver running)."""
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n\n")
    missing = refused(["--model", str(tiny_t2i), "--api-keys-file", str(tmp_path / "none.txt")])
    assert missing == [f"error: cannot read the API keys file {tmp_path / 'none.txt'}: No such file or directory"]
    assert refused(["--model", str(tiny_t2i), "--api-keys-file", str(empty)]) == [
        f"error: the API keys file {empty} holds no key"
    ]


@pytest.mark.parametrize(
    ("remove", "says"),
    [
        ("transformer/config.json", "transformer/config.json"),
        ("transformer/diffusion_pytorch_model.safetensors", "transformer/*.safetensors"),
        ("vae", "vae/"),
        ("tokenizer", "tokenizer/"),
    ],
)
def test_a_model_folder_without_a_component_it_lists_is_refused_naming_it(folder, no_port, remove, says):
    """Without its transformer's config the plan sized it from reference values (33 GiB: "not enough memory"), and
    without its weights it was served and failed in its worker, naming the model's folder."""
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert refused(["--model", str(folder)]) == [f"error: {folder} is incomplete: no {says} (of what its model_index.json lists)"]


def test_a_link_to_a_missing_blob_or_a_missing_shard_of_an_index_is_no_weights(folder):
    """A hub snapshot whose blob is gone keeps its link; a sharded model lists its shards in an index."""
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(folder / "gone")
    with pytest.raises(ModelConfigError, match="incomplete: no transformer/\\*.safetensors"):
        resolve_model(str(folder))
    weights.unlink()
    (folder / "transformer" / "part-1.safetensors").write_bytes(b"")
    index = {"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelConfigError, match="incomplete: no transformer/part-2.safetensors "):
        resolve_model(str(folder))
    (folder / "transformer" / "part-2.safetensors").write_bytes(b"")
    resolve_model(str(folder))  # complete as far as files go (their content is the plan's and the worker's to read)


def test_the_api_keys_file_is_read_once_at_start(tiny_t2i, tmp_path):
    """``--api-keys-file <(vault read ...)`` (a pipe, empty once read) served no key when the app read it again."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-one\n# comment\nsk-two\n")
    settings = Settings(models=[f"a={tiny_t2i}"], api_keys=["sk-flag"], api_keys_file=keys)
    cli_run.checked_specs(settings)
    keys.unlink()  # what a second read of a pipe finds: nothing
    assert settings.all_api_keys() == ["sk-flag", "sk-one", "sk-two"]
