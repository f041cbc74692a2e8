"""Settings: the seeds' environment variable names, our own, and CLI overrides."""

import re

import pytest
from pydantic import ValidationError

from qwen_image_server.config import Settings
from qwen_image_server.config_scoped import SCOPED_NUMBERS


def test_seed_002_names(monkeypatch):
    for name, value in {
        "MODEL_PATH": "/models/qwen-image",
        "MODEL_NAME": "Qwen-Image",
        "NUM_GPUS_TO_USE": "4",
        "TASK_QUEUE_SIZE": "7",
        "TASK_TIMEOUT": "120",
        "IMAGE_OUTPUT_DIR": "/tmp/out",
        "IMAGE_DOWNLOAD_URL_PREFIX": "http://cdn/img",
        "HOST": "0.0.0.0",
        "PORT": "6002",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.workers, s.queue_size, s.task_timeout, s.host, s.port) == (4, 7, 120.0, "0.0.0.0", 6002)
    assert str(s.image_output_dir) == "/tmp/out" and s.image_download_url_prefix == "http://cdn/img"
    assert s.model_entries() == [("Qwen-Image", "/models/qwen-image")]


def test_seed_000_names_and_cli_override(monkeypatch):
    monkeypatch.setenv("QWEN_IMAGE_LOCATION", "Qwen/Qwen-Image")
    monkeypatch.setenv("QWEN_IMAGE_EDIT_LOCATION", "Qwen/Qwen-Image-Edit")
    monkeypatch.setenv("NUM_GPUS_TO_USE", "2")
    s = Settings(workers=1, models=["extra=/x"])
    assert s.workers == 1
    assert s.model_entries() == [("extra", "/x"), (None, "Qwen/Qwen-Image"), (None, "Qwen/Qwen-Image-Edit")]


def test_qis_models_comma_separated(monkeypatch):
    monkeypatch.setenv("QIS_MODELS", "a=/m/a, /m/b")
    assert Settings().model_entries() == [("a", "/m/a"), (None, "/m/b")]


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("TASK_QUEUE_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(
    "field", ["task_timeout", "header_timeout", "body_timeout", "shutdown_grace_seconds", "stuck_task_seconds"]
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_time_that_is_not_a_finite_number_is_refused(field, value):
    """``--task-timeout inf`` was served, and every ``/ready`` was then a 500 (JSON has no infinity)."""
    with pytest.raises(ValidationError, match="finite number"):
        Settings(**{field: value})


def test_seed_000_docker_example_names(monkeypatch):
    monkeypatch.setenv("MODEL_PATH_GENERATION", "/custom/path/to/qwen-image")
    monkeypatch.setenv("MODEL_PATH_EDIT", "/custom/path/to/qwen-image-edit")
    assert Settings().model_entries() == [(None, "/custom/path/to/qwen-image"), (None, "/custom/path/to/qwen-image-edit")]


def test_workers_per_model_from_flags_and_the_environment(monkeypatch):
    from qwen_image_server.cli import settings_from_options

    monkeypatch.setenv("NUM_GPUS_TO_USE", "4")
    settings = settings_from_options({"workers": ["3@t2i", "2", "1@edit", "2@edit"], "log_level": "info"})
    assert settings.workers == 2 and settings.model_workers == ["3@t2i", "1@edit", "2@edit"]
    assert (settings.workers_for("t2i"), settings.workers_for("edit"), settings.workers_for("other")) == (3, 2, 2)
    # only per-model values: every other model keeps the environment's count
    settings = settings_from_options({"workers": ["1@edit"], "log_level": "info"})
    assert (settings.workers, settings.workers_for("edit"), settings.workers_for("t2i")) == (4, 1, 4)
    monkeypatch.setenv("QIS_MODEL_WORKERS", "3@t2i; 1@edit")
    assert Settings().model_workers == ["3@t2i", "1@edit"] and Settings().workers_for("t2i") == 3
    # a flag's value for every model replaces the environment's per-model ones (as --offload none does QIS_OFFLOAD's)
    flagged = settings_from_options({"workers": ["1"], "log_level": "info"})
    assert (flagged.workers_for("t2i"), flagged.workers_for("edit"), flagged.model_workers) == (1, 1, [])
    flagged = settings_from_options({"workers": ["1", "2@edit"], "log_level": "info"})
    assert (flagged.workers_for("t2i"), flagged.workers_for("edit")) == (1, 2)
    # Ray Serve: a model's own count is its number of replicas; the others scale within ray_min/max_replicas
    ray = Settings(workers=3, ray_min_replicas=2, model_workers=["1@edit", "4@t2i"])
    assert (ray.replicas_for("edit"), ray.replicas_for("t2i"), ray.replicas_for("other")) == ((1, 1), (4, 4), (2, 3))


@pytest.mark.parametrize("value", ["3", "x@t2i", "0@t2i", "65@t2i", "3@", "@t2i", "-1@t2i"])
def test_malformed_per_model_workers_are_refused(value):
    with pytest.raises(ValidationError, match=r"expected N@MODEL with N from 1 to 64"):
        Settings(model_workers=[value])


def test_queue_size_task_timeout_and_stuck_seconds_per_model_from_flags_and_the_environment(monkeypatch):
    from qwen_image_server.cli import settings_from_options

    monkeypatch.setenv("TASK_TIMEOUT", "120")
    options = {"queue_size": ["1@fast", "8"], "task_timeout": ["5@fast", "2.5@fast"], "stuck_task_seconds": ["3@fast"]}
    settings = settings_from_options({**options, "log_level": "info"})
    assert (settings.queue_size, settings.model_queue_size) == (8, ["1@fast"])
    assert (settings.queue_size_for("fast"), settings.queue_size_for("slow")) == (1, 8)
    assert (settings.task_timeout_for("fast"), settings.task_timeout_for("slow")) == (2.5, 120.0)  # the last one counts
    assert (settings.stuck_task_seconds_for("fast"), settings.stuck_task_seconds_for("slow")) == (3.0, 300.0)
    monkeypatch.setenv("QIS_MODEL_QUEUE_SIZE", "2@a; 3@b")
    monkeypatch.setenv("QIS_MODEL_TASK_TIMEOUT", "30@a")
    monkeypatch.setenv("QIS_MODEL_STUCK_TASK_SECONDS", "0@b")
    env = Settings()
    assert (env.queue_size_for("a"), env.queue_size_for("b"), env.queue_size_for("c")) == (2, 3, 32)
    assert (env.task_timeout_for("a"), env.task_timeout_for("b")) == (30.0, 120.0)
    assert (env.stuck_task_seconds_for("a"), env.stuck_task_seconds_for("b")) == (300.0, 0.0)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model_queue_size", "0@m", "N@MODEL with N from 1 to 100000"),
        ("model_queue_size", "1.5@m", "N@MODEL with N from 1 to 100000"),
        ("model_queue_size", "4", "N@MODEL with N from 1 to 100000"),
        ("model_task_timeout", "0@m", "S@MODEL with S above 0"),
        ("model_task_timeout", "nan@m", "S@MODEL with S above 0"),
        ("model_task_timeout", "inf@m", "S@MODEL with S above 0"),
        ("model_task_timeout", "5@", "S@MODEL with S above 0"),
        ("model_stuck_task_seconds", "-1@m", "S@MODEL with S from 0"),
    ],
)
def test_malformed_per_model_limits_are_refused(field, value, expected):
    with pytest.raises(ValidationError, match=f"expected {re.escape(expected)}, got '{re.escape(value)}'"):
        Settings(**{field: [value]})


def test_per_model_limits_must_name_served_models_and_not_aliases(tiny_t2i):
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.spec import ModelConfigError

    models = [f"t2i={tiny_t2i}"]
    with pytest.raises(
        ModelConfigError,
        match=r"^--queue-size \(or QIS_MODEL_QUEUE_SIZE\) names models that are not served: nope \(served: t2i\)$",
    ):
        resolve_configured(Settings(models=models, model_queue_size=["1@nope"]))
    with pytest.raises(
        ModelConfigError, match=r"^--task-timeout \(or QIS_MODEL_TASK_TIMEOUT\) names models that are not served: nope"
    ):
        resolve_configured(Settings(models=models, model_task_timeout=["5@nope"]))
    with pytest.raises(ModelConfigError, match=r"^--stuck-task-seconds names dall-e-3, another name of a served model"):
        resolve_configured(Settings(models=models, model_aliases=["dall-e-3=t2i"], model_stuck_task_seconds=["1@dall-e-3"]))
    (spec,) = resolve_configured(Settings(models=models, model_queue_size=["1@t2i"], model_task_timeout=["5@t2i"]))
    assert spec.id == "t2i"


def test_a_per_model_setting_scoped_to_a_lora_says_to_scope_it_to_the_lora_s_model(tiny_t2i, tiny_lora):
    """A LoRA runs on its model's workers with its model's settings: ``--queue-size 2@style`` names the model to use
    instead of calling ``style`` not served; the same for a run-profile setting (``--compile on@style``)."""
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.spec import ModelConfigError

    base = {"models": [f"t2i={tiny_t2i}"], "loras": [f"style={tiny_lora}"]}
    expected = "names style, a LoRA of t2i: a LoRA runs on its model's workers with its model's settings; scope it to t2i"
    with pytest.raises(ModelConfigError, match=rf"^--queue-size \(or QIS_MODEL_QUEUE_SIZE\) {re.escape(expected)}$"):
        resolve_configured(Settings(**base, model_queue_size=["2@style"]))
    with pytest.raises(ModelConfigError, match=rf"^--compile \(or QIS_MODEL_COMPILE\) {re.escape(expected)}$"):
        resolve_configured(Settings(**base, model_compile=["on@style"]))


def test_per_model_items_run_together_with_a_comma_are_told_the_separator(tiny_t2i, tiny_edit):
    """``QIS_MODEL_WORKERS="2@edit,3@t2i"`` reads as one item for a model named ``edit,3@t2i``."""
    from qwen_image_server.models.configured import resolve_configured
    from qwen_image_server.models.spec import ModelConfigError

    models = [f"t2i={tiny_t2i}", f"edit={tiny_edit}"]
    with pytest.raises(ModelConfigError) as refused:
        resolve_configured(Settings(models=models, model_workers="2@edit,3@t2i"))
    assert str(refused.value) == (
        "--workers (or QIS_MODEL_WORKERS) names models that are not served: edit,3@t2i (served: t2i, edit); several VALUE@MODEL items are "
        "separated by ';' in an environment variable (2@a;1@b), or given as the flag once each"
    )


def test_invalid_settings_are_named_as_the_user_set_them(monkeypatch):
    from qwen_image_server.cli import settings_from_options

    def problem(**options) -> str:
        with pytest.raises(ValueError) as refused:
            settings_from_options({"log_level": "info", **options})
        assert not isinstance(refused.value, ValidationError)  # one readable message, not pydantic's report
        return str(refused.value)

    assert problem(queue_size=["0"]) == "invalid settings:\n  --queue-size: Input should be greater than or equal to 1 (got '0')"
    assert problem(workers=["x@y"]) == "invalid settings:\n  --workers: expected N@MODEL with N from 1 to 64, got 'x@y'"
    assert (
        problem(task_timeout=["soon@m"]) == "invalid settings:\n  --task-timeout: expected S@MODEL with S above 0, got 'soon@m'"
    )
    assert problem(queue_size=["x"]).splitlines()[1].startswith("  --queue-size: Input should be a valid integer")
    # a flag spelled otherwise than its setting (shutdown_grace_seconds), and one of another name (image_url_prefix)
    assert problem(shutdown_grace_seconds=-5.0).splitlines()[1].startswith("  --shutdown-grace: Input should be greater")
    assert problem(image_url_prefix=5).splitlines()[1].startswith("  --image-url-prefix: ")
    monkeypatch.setenv("QIS_QUEUE_SIZE", "0")  # a seed's name and ours: both are listed, whichever was used
    monkeypatch.setenv("QIS_MAX_N", "many")
    assert problem().splitlines()[1:] == [
        "  TASK_QUEUE_SIZE or QIS_QUEUE_SIZE: Input should be greater than or equal to 1 (got '0')",
        "  QIS_MAX_N: Input should be a valid integer, unable to parse string as an integer (got 'many')",
    ]
    monkeypatch.delenv("QIS_QUEUE_SIZE")
    monkeypatch.delenv("QIS_MAX_N")
    monkeypatch.setenv("QIS_MODEL_QUEUE_SIZE", "x@edit")  # its message quotes the value once
    assert problem().splitlines()[1:] == ["  QIS_MODEL_QUEUE_SIZE: expected N@MODEL with N from 1 to 100000, got 'x@edit'"]
    monkeypatch.delenv("QIS_MODEL_QUEUE_SIZE")
    monkeypatch.setenv("QIS_MIN_IMAGE_SIDE", "2048")
    monkeypatch.setenv("QIS_MAX_IMAGE_SIDE", "512")
    assert problem() == "invalid settings:\n  QIS_MIN_IMAGE_SIDE=2048 must not exceed QIS_MAX_IMAGE_SIDE=512"
    monkeypatch.delenv("QIS_MIN_IMAGE_SIDE")
    monkeypatch.delenv("QIS_MAX_IMAGE_SIDE")
    monkeypatch.setenv("QIS_RAY_MIN_REPLICAS", "3")  # named by its variables: there are no such flags
    monkeypatch.setenv("QIS_RAY_MAX_REPLICAS", "2")
    assert problem().splitlines()[1] == "  QIS_RAY_MIN_REPLICAS must not exceed QIS_RAY_MAX_REPLICAS (by default --workers)"
    monkeypatch.delenv("QIS_RAY_MIN_REPLICAS")
    monkeypatch.delenv("QIS_RAY_MAX_REPLICAS")
    # QIS_DEFAULT_STEPS goes up to QIS_MAX_STEPS, as the README says (it stopped at 200 whatever QIS_MAX_STEPS was)
    monkeypatch.setenv("QIS_MAX_STEPS", "1000")
    monkeypatch.setenv("QIS_DEFAULT_STEPS", "500")
    assert Settings().default_steps == 500
    monkeypatch.setenv("QIS_DEFAULT_STEPS", "1001")
    assert "QIS_DEFAULT_STEPS=1001 must be from 2 to QIS_MAX_STEPS=1000" in problem()


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_host_is_refused_not_every_interface(monkeypatch, host):
    with pytest.raises(ValidationError, match="is empty: give the address to listen on"):
        Settings(host=host)
    monkeypatch.setenv("QIS_HOST", host)  # HOST=${HOST} in a compose file, with HOST unset
    with pytest.raises(ValidationError, match="is empty"):
        Settings()
    assert Settings(host=" 0.0.0.0 ").host == "0.0.0.0"


def test_a_blank_api_key_is_refused_and_an_empty_variable_is_no_keys(monkeypatch):
    with pytest.raises(ValidationError, match="an API key is empty"):
        Settings(api_keys=[""])  # --api-key '': no client could get in
    monkeypatch.setenv("QIS_API_KEYS", " , ")  # looks set, holds no key: keys would be off
    with pytest.raises(ValidationError, match="an API key is empty"):
        Settings()
    monkeypatch.setenv("QIS_API_KEYS", "")
    assert Settings().all_api_keys() == []
    monkeypatch.setenv("QIS_API_KEYS", "k1, k2")
    assert Settings().all_api_keys() == ["k1", "k2"]


def test_keys_in_both_variables_of_the_setting_are_refused_unless_the_same(monkeypatch):
    """Only the first variable was read: an empty QWEN_IMAGE_API_KEYS beside QIS_API_KEYS=k1 served with no key."""
    from qwen_image_server.cli import settings_from_options

    monkeypatch.setenv("QWEN_IMAGE_API_KEYS", "")
    monkeypatch.setenv("QIS_API_KEYS", "secret-k1")
    with pytest.raises(ValueError) as refused:
        settings_from_options({"log_level": "info"})
    assert str(refused.value) == (
        "invalid settings:\n  QWEN_IMAGE_API_KEYS and QIS_API_KEYS are both set, to different keys: only "
        "QWEN_IMAGE_API_KEYS would be read (they are not merged); keep one of them"
    )
    monkeypatch.setenv("qwen_image_api_keys", "old")  # the names are read in any case
    monkeypatch.delenv("QWEN_IMAGE_API_KEYS")
    with pytest.raises(ValueError) as refused_too:
        settings_from_options({"log_level": "info"})
    assert str(refused_too.value) == str(refused.value)  # no key shown
    # --api-key replaces both variables: nothing to choose between (a warning names them)
    assert settings_from_options({"log_level": "info", "api_key": ["flag-key"]}).all_api_keys() == ["flag-key"]
    monkeypatch.setenv("qwen_image_api_keys", " secret-k2,secret-k1")
    monkeypatch.setenv("QIS_API_KEYS", "secret-k1, secret-k2")  # the same keys, written otherwise: nothing lost
    assert settings_from_options({"log_level": "info"}).all_api_keys() == ["secret-k2", "secret-k1"]
    monkeypatch.delenv("qwen_image_api_keys")
    assert Settings().all_api_keys() == ["secret-k1", "secret-k2"]


def test_keys_in_the_environment_that_api_key_replaces_are_named_in_a_warning(monkeypatch, caplog):
    from qwen_image_server.cli import settings_from_options
    from qwen_image_server.cli_settings import keys_replaced_by_flag

    monkeypatch.setenv("QIS_API_KEYS", "env-key")
    with caplog.at_level("WARNING"):
        settings = settings_from_options({"log_level": "info", "api_key": ["flag-key"]})
    assert settings.all_api_keys() == ["flag-key"]
    assert "--api-key replaces the keys in QIS_API_KEYS" in caplog.text and "env-key" not in caplog.text
    assert keys_replaced_by_flag(False, {"QIS_API_KEYS": "k"}) is None  # the keys in use
    assert keys_replaced_by_flag(True, {"QIS_API_KEYS": " "}) is None  # none there to lose
    assert keys_replaced_by_flag(True, {"qwen_image_api_keys": "k", "QIS_API_KEYS": "k"}) == (
        "--api-key replaces the keys in QWEN_IMAGE_API_KEYS and QIS_API_KEYS: only the --api-key keys (and "
        "--api-keys-file's) are accepted"
    )


@pytest.mark.parametrize("device", ["", ",", "gpu", "mps", "cpu:0", "cuda:x", "cuda:0,,cuda:1", "auto,cpu"])
def test_an_unknown_device_is_refused(device):
    with pytest.raises(ValidationError, match="must be auto, or cpu, cuda or cuda:N"):
        Settings(device=device)


@pytest.mark.parametrize(
    ("device", "kept"), [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), (" cuda:1 , cuda:0 ", "cuda:1,cuda:0")]
)
def test_known_devices_are_kept(device, kept):
    assert Settings(device=device).device == kept


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback():
    from typer.testing import CliRunner

    from qwen_image_server.cli import app

    for command in ("serve", "plan"):
        result = CliRunner().invoke(app, [command, "--log-level", "verbose"])
        assert result.exit_code == 2, result.output
        assert "'verbose' is not one of debug, info, warning, error" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["serve", "plan"])
def test_every_option_names_its_environment_variables_in_the_help(command):
    import typer

    from qwen_image_server.cli import _env_names, app

    options = typer.main.get_command(app).commands[command].params
    named = {"model": "models", "lora": "loras", "model_alias": "model_aliases", "api_key": "api_keys"}
    named |= {"cors_origin": "cors_origins", "image_url_prefix": "image_download_url_prefix"}
    checked = 0
    for option in options:
        field = named.get(option.name, option.name)
        if field in Settings.model_fields:
            # the on/off flags and the N@MODEL ones also name their per-model variable (QIS_MODEL_COMPILE: on|off@MODEL,
            # QIS_MODEL_WORKERS: N@MODEL;N@MODEL)
            scoped = _env_names(f"model_{field}") if field in ("compile", "deterministic", *SCOPED_NUMBERS) else []
            assert f"[env: {', '.join(_env_names(field) + scoped)}]" in option.help, (option.name, option.help)
            checked += 1
    assert checked >= 30 and "HOST, QIS_HOST" in next(o.help for o in options if o.name == "host")
    assert "QIS_COMPILE, QIS_MODEL_COMPILE]" in next(o.help for o in options if o.name == "compile")
    assert "NUM_GPUS_TO_USE, QIS_WORKERS, QIS_MODEL_WORKERS]" in next(o.help for o in options if o.name == "workers")
    helps = {option.name: option.help for option in options}  # the defaults of plain values, from Settings
    assert helps["port"].endswith("[env: PORT, QIS_PORT] [default: 8000]"), helps["port"]
    assert helps["host"].endswith("[default: 127.0.0.1]") and helps["header_timeout"].endswith("[default: 10]")
    assert helps["image_output_dir"].endswith("[default: generated_images]")
    assert "[default:" not in helps["model"] + helps["compile"] + helps["api_key"]  # lists, switches, unset values


def test_model_name_without_model_path_is_named_in_a_warning(monkeypatch, caplog):
    """Seed 002's MODEL_NAME names MODEL_PATH's model: set alone, it was ignored without a word."""
    from qwen_image_server.cli import settings_from_options

    monkeypatch.setenv("MODEL_NAME", "Qwen-Image")
    with caplog.at_level("WARNING"):
        settings_from_options({"log_level": "info", "demo": True})
    assert "MODEL_NAME=Qwen-Image is set without MODEL_PATH: it names MODEL_PATH's model only" in caplog.text
    caplog.clear()
    monkeypatch.setenv("MODEL_PATH", "/models/qwen-image")
    with caplog.at_level("WARNING"):
        settings_from_options({"log_level": "info"})
    assert "MODEL_NAME" not in caplog.text


def test_a_refused_url_is_shown_without_credentials_or_query():
    """An URL setting refused at start is repeated in the error, but never its credentials or query (a key in either
    reached the terminal and the logs), however malformed it is."""
    from pydantic import ValidationError

    from qwen_image_server.cli_settings import settings_problem

    for field, value in [
        ("image_download_url_prefix", "http://user:pa/ss@cdn.example/img?sig=SECRET1"),
        ("image_download_url_prefix", "cdn.example/img?sig=SECRET1"),
        ("openai_base_url", "http://u:SECRET1@chat/v1 x"),
    ]:
        try:
            Settings(**{field: value, "enable_prompt_rewrite": True})
        except ValidationError as exc:
            problem = settings_problem(exc, set())
        else:
            raise AssertionError(f"{value!r} was accepted")
        assert "SECRET1" not in problem and "pa/ss" not in problem and "***" in problem, problem


def test_no_demo_overrides_qis_demo(monkeypatch, tiny_t2i):
    """Flags override the environment, ``--no-demo`` too (it was read as not given)."""
    from qwen_image_server.cli import settings_from_options

    monkeypatch.setenv("QIS_DEMO", "1")
    served = settings_from_options({"log_level": "info", "model": [f"mine={tiny_t2i}"], "demo": False}).models
    assert served == [f"mine={tiny_t2i}"]
    with_demo = settings_from_options({"log_level": "info", "model": [f"mine={tiny_t2i}"], "demo": None}).models
    assert len(with_demo) > 1 and with_demo[-1] == f"mine={tiny_t2i}"


def test_a_blank_folder_or_file_variable_is_unset(monkeypatch, tmp_path):
    """``QIS_MODELS_DIR=`` (compose's ``${VAR:-}``) served every model folder of the working directory, and
    ``QIS_API_KEYS_FILE=`` read the working directory as the keys file ("Is a directory"): blank is unset, as for
    the other optional settings."""
    monkeypatch.setenv("QIS_MODELS_DIR", "")
    monkeypatch.setenv("QIS_API_KEYS_FILE", " ")
    settings = Settings()
    assert settings.models_dir is None and settings.api_keys_file is None
    monkeypatch.setenv("QIS_MODELS_DIR", f" {tmp_path} ")
    assert Settings().models_dir == tmp_path


def test_an_ipv6_host_in_url_brackets_is_the_address():
    """``--host '[::1]'`` (as URLs write it) was "Name or service not known"; ``::1`` worked."""
    assert Settings(host="[::1]").host == "::1" and Settings(host=" ::1 ").host == "::1"


def test_a_blank_image_output_dir_is_the_default_folder_not_the_working_directory(monkeypatch):
    """``IMAGE_OUTPUT_DIR=`` (an env file's blank) or ``--image-output-dir ''`` stored url images in the working
    directory; blank is the default folder, as the other blank paths are unset."""
    from typer.testing import CliRunner

    from qwen_image_server import cli

    default = Settings.model_fields["image_output_dir"].default
    monkeypatch.setenv("IMAGE_OUTPUT_DIR", "")
    assert Settings().image_output_dir == default
    assert Settings(image_output_dir=" ").image_output_dir == default
    monkeypatch.delenv("IMAGE_OUTPUT_DIR")
    seen = []
    monkeypatch.setattr(cli, "run_server", lambda settings, log_level: seen.append(settings.image_output_dir))
    done = CliRunner().invoke(cli.app, ["serve", "--image-output-dir", "", "-m", "m=/nowhere"])
    assert done.exit_code == 0, done.output
    assert seen == [default]


def test_setting_words_are_read_in_any_case_as_the_profile_settings_are():
    """``--offload GROUP`` and ``--quantize FP8`` were taken, ``--device CPU``, ``--dtype BFLOAT16``, ``--engine RAY``
    and ``--memory-check ON`` refused."""
    s = Settings(device="CPU,CUDA:1", dtype="BFLOAT16", engine="Ray", memory_check="ON", worker_start=" Spawn ")
    assert (s.device, s.dtype, s.engine, s.memory_check, s.worker_start) == ("cpu,cuda:1", "bfloat16", "ray", "on", "spawn")
    with pytest.raises(ValueError, match="must be auto, or cpu, cuda or cuda:N"):
        Settings(device="GPU")


def test_a_home_folder_in_the_image_output_dir_is_the_folder_checked_and_used(monkeypatch, tmp_path):
    """``QIS_IMAGE_OUTPUT_DIR=~/images`` (compose files and unit files do not expand ``~``): the start check looked at
    the home folder's, and the images went to a folder named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("IMAGE_OUTPUT_DIR", raising=False)  # the first of its names (the Ray tests set it in this process)
    monkeypatch.setenv("QIS_IMAGE_OUTPUT_DIR", "~/images")
    assert Settings().image_output_dir == tmp_path / "images"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Settings(image_output_dir="~/file")


def test_an_s3_bucket_or_endpoint_the_client_cannot_use_is_refused_at_start(monkeypatch):
    """A bucket name the S3 client refuses started quietly, then failed every url request with "the object store
    could not be reached"; an endpoint without a scheme failed ``serve`` without naming the setting (and passed
    ``plan``). Blank is unset, as an env file writes it."""
    from qwen_image_server.cli_settings import settings_from_options

    with pytest.raises(ValidationError, match="'Bad_Bucket!' is not a bucket name"):
        Settings(s3_bucket="Bad_Bucket!")
    with pytest.raises(ValidationError, match="'127.0.0.1:9000' is not an S3 endpoint URL: expected http"):
        Settings(s3_bucket="images", s3_endpoint_url="127.0.0.1:9000")
    monkeypatch.setenv("QIS_S3_ENDPOINT_URL", "minio:9000")
    with pytest.raises(ValueError, match="QIS_S3_ENDPOINT_URL: 'minio:9000' is not an S3 endpoint URL"):
        settings_from_options({"log_level": "info"})
    monkeypatch.setenv("QIS_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("QIS_S3_BUCKET", " ")
    assert (Settings().s3_bucket, Settings().s3_endpoint_url) == (None, "http://minio:9000")
    for bucket in ("images", "my.bucket-1", "Legacy_Bucket", "arn:aws:s3:us-east-1:123456789012:accesspoint/images"):
        assert Settings(s3_bucket=bucket).s3_bucket == bucket


def test_an_api_key_no_client_can_send_is_refused_at_start(tmp_path):
    """A key that is not printable ASCII started the server and could never match: an HTTP header carries no such
    characters (a browser cannot even send them; curl's bytes are read as Latin-1)."""
    with pytest.raises(ValidationError, match="an API key holds characters an HTTP header cannot carry"):
        Settings(api_keys=["ключ-é"])
    keys = tmp_path / "keys"
    keys.write_text("sk-fine\nsk-\u200bzero-width\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"an API key in {keys} holds characters an HTTP header cannot carry"):
        Settings(api_keys_file=keys).all_api_keys()
    assert Settings(api_keys=['p@ss w:rd<>"&']).api_keys == ['p@ss w:rd<>"&']


def test_a_keys_file_saved_with_a_byte_order_mark_gives_its_keys(tmp_path):
    """Windows editors start a UTF-8 file with a byte-order mark: it is not part of the first key (which no client
    could send)."""
    keys = tmp_path / "keys"
    keys.write_bytes("\ufeffsk-first\r\n# a comment\r\nsk-second\r\n".encode())
    assert Settings(api_keys_file=keys).all_api_keys() == ["sk-first", "sk-second"]
