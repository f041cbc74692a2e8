"""``plan`` refuses what ``serve`` refuses before anything loads (the same check, the same message, exit 2), its
refusals suggest no flag that is itself refused, and the command line answers mistakes with one line, not a
traceback (``tiny-model``, an unreachable Ray cluster, ``--help``, ``--version``)."""

from __future__ import annotations

import re
import sys

import pytest
from typer.testing import CliRunner

from qwen_image_server import __version__, cli_run
from qwen_image_server.cli import app

REFUSED_BY_SERVE = [
    (["--weights-dtype", "fp8", "--quantize", "fp8"], "both convert the transformer's weights; choose one"),
    (["--offload", "sequential"], "offload=sequential needs a CUDA device"),
    (["--share-components", "--engine", "ray"], "--share-components needs the embedded engine"),
]


@pytest.fixture
def no_serving(monkeypatch):
    """serve stops where it would open its port (a check it failed to make would serve a model otherwise)."""

    def refuse(host, port):
        raise ValueError("would serve")

    monkeypatch.setattr(cli_run, "_check_port_free", refuse)


def _error_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("error: "))


@pytest.mark.parametrize(
    ("flags", "reason"), REFUSED_BY_SERVE, ids=["fp8-twice", "sequential-on-cpu", "shared-components-elsewhere"]
)
def test_plan_refuses_what_serve_refuses_with_the_same_message(tiny_t2i, no_serving, flags, reason):
    args = ["--model", str(tiny_t2i), "--device", "cpu", *flags]
    served = CliRunner().invoke(app, ["serve", *args])
    planned = CliRunner().invoke(app, ["plan", *args])
    assert served.exit_code == 2 and reason in _error_line(served.output)
    assert planned.exit_code == 2, planned.output
    assert _error_line(planned.output) == _error_line(served.output)


def test_plan_under_ray_makes_no_plan_as_serve_makes_none(tiny_t2i):
    """``serve --engine ray`` lets Ray place the replicas; ``plan`` refused 64 workers for this machine's memory."""
    planned = CliRunner().invoke(app, ["plan", "--model", f"tiny={tiny_t2i}", "--engine", "ray", "--workers", "64"])
    assert planned.exit_code == 0, planned.output
    assert planned.output.startswith("tiny: the start checks pass. Under --engine ray no plan is made")
    refused = CliRunner().invoke(app, ["plan", "--model", f"tiny={tiny_t2i}", "--engine", "ray", "--share-components"])
    assert refused.exit_code == 2 and "--share-components needs the embedded engine" in refused.output


def test_plan_for_fake_gpus_refuses_fp8_twice_and_allows_sequential_offload(tiny_t2i):
    env = {"QIS_FAKE_GPUS": "80GiB,24GiB"}
    twice = CliRunner().invoke(app, ["plan", "--model", str(tiny_t2i), "--weights-dtype", "fp8", "--quantize", "fp8"], env=env)
    assert twice.exit_code == 2 and "choose one" in twice.output
    sequential = CliRunner().invoke(app, ["plan", "--model", str(tiny_t2i), "--offload", "sequential"], env=env)
    assert sequential.exit_code == 0 and "the plan fits" in sequential.output  # the fake GPUs are CUDA devices


def test_a_refusal_suggests_only_flags_that_are_accepted():
    env = {"QIS_FAKE_GPUS": "24GiB"}
    args = ["plan", "--model", "random:Qwen/Qwen-Image", "--compile"]  # plan loads nothing: no weights are made
    refused = CliRunner().invoke(app, args, env=env)
    assert refused.exit_code == 2
    advice = next(line for line in refused.output.splitlines() if line.startswith("Would fit: "))
    flags = [s.split(" (")[0].split() for s in advice.removeprefix("Would fit: ").split("; ") if s.startswith("--")]
    assert flags and not any("sequential@Qwen-Image" in flag for flag in flags)
    for flag in flags:
        tried = CliRunner().invoke(app, [*args, *flag], env=env)
        assert tried.exit_code == 0 and "does not combine" not in tried.output, (flag, tried.output)


def test_tiny_model_into_a_file_is_one_line(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = CliRunner().invoke(app, ["tiny-model", str(target)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"{target} is a file, not a folder" in result.output


def test_tiny_model_refuses_a_seed_torch_cannot_take(tmp_path):
    """A seed past 64 bits was a traceback from torch (and an empty folder left behind): a usage error, exit 2."""
    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--seed", "99999999999999999999"])
    assert result.exit_code == 2 and "Invalid value for '--seed'" in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_tiny_model_into_a_folder_that_holds_files_needs_force(tmp_path, monkeypatch):
    """A folder with files in it (a model already, with a hand-edited sidecar) is not overwritten silently: one line
    and exit 2, before any heavy import; ``--force`` writes the model there. An empty folder is fine."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "qwen_image_server.json").write_text('{"default_steps": 8}')
    for heavy in ("torch", "diffusers", "transformers"):
        monkeypatch.setitem(sys.modules, heavy, None)
    result = CliRunner().invoke(app, ["tiny-model", str(target), "--kind", "edit"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == (
        f"error: {target} is not empty (qwen_image_server.json): pass --force to write a tiny model there, replacing "
        "the files it writes"
    )
    assert (target / "qwen_image_server.json").read_text() == '{"default_steps": 8}'
    monkeypatch.undo()
    written: list = []
    monkeypatch.setattr("qwen_image_server.models.tiny.build_tiny_model", lambda d, k, seed: written.append((d, k, seed)))
    for folder, extra in ((target, ["--force"]), (tmp_path / "empty", [])):
        folder.mkdir(exist_ok=True)
        result = CliRunner().invoke(app, ["tiny-model", str(folder), "--kind", "edit", *extra])
        assert result.exit_code == 0, result.output
    assert written == [(target, "edit", 0), (tmp_path / "empty", "edit", 0)]


def test_tiny_model_where_no_folder_can_be_made_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "model"  # like /proc/x: the folder cannot be created
    for heavy in ("torch", "diffusers", "transformers"):  # refused before their seconds of imports: none is reached
        monkeypatch.setitem(sys.modules, heavy, None)
    result = CliRunner().invoke(app, ["tiny-model", str(target)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"error: cannot write a model to {target}" in result.output


def test_an_unreachable_ray_cluster_is_one_line(tiny_t2i, monkeypatch):
    pytest.importorskip("ray.serve")
    import ray

    def unreachable(**kwargs):
        raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(ray, "init", unreachable)
    args = ["serve", "--model", str(tiny_t2i), "--engine", "ray", "--ray-address", "ray://127.0.0.1:1", "--port", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert "the Ray cluster at ray://127.0.0.1:1 could not be reached: ray client connection timeout" in result.output


@pytest.mark.parametrize("command", ["serve", "plan"])
def test_help_shows_readable_metavars(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert not re.search(r"<list\[", result.output), result.output
    assert "--workers N or N@MODEL" in result.output and "--model [ID=]SOURCE" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"qwen-image-server {__version__}"
