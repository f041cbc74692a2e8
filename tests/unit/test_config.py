"""Settings: the seeds' environment variable names, our own, and CLI overrides."""

import pytest
from pydantic import ValidationError

from qwen_image_server.config import Settings


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


def test_seed_000_docker_example_names(monkeypatch):
    monkeypatch.setenv("MODEL_PATH_GENERATION", "/custom/path/to/qwen-image")
    monkeypatch.setenv("MODEL_PATH_EDIT", "/custom/path/to/qwen-image-edit")
    assert Settings().model_entries() == [(None, "/custom/path/to/qwen-image"), (None, "/custom/path/to/qwen-image-edit")]
