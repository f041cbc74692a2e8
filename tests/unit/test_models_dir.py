"""QIS_MODELS_DIR: the container's default of serving every model folder mounted at /models."""

import json

import pytest

from qwen_image_server.config import Settings


def _model(folder, name):
    (folder / name).mkdir()
    (folder / name / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))


def test_every_model_folder_is_served_under_its_name(tmp_path, monkeypatch):
    _model(tmp_path, "qwen-image-edit")
    _model(tmp_path, "qwen-image")
    (tmp_path / "hf").mkdir()  # not a model: no model_index.json
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setenv("QIS_MODELS_DIR", str(tmp_path))
    assert Settings().model_entries() == [(None, str(tmp_path / "qwen-image")), (None, str(tmp_path / "qwen-image-edit"))]


@pytest.mark.parametrize(
    "env",
    [
        {"MODEL_PATH": "/m/one", "MODEL_NAME": "Qwen-Image"},
        {"QWEN_IMAGE_LOCATION": "/m/one"},
        {"MODEL_PATH_EDIT": "/m/one"},
        {"QIS_MODELS": "/m/one"},
    ],
)
def test_named_models_win_over_the_folder(tmp_path, monkeypatch, env):
    _model(tmp_path, "qwen-image")
    monkeypatch.setenv("QIS_MODELS_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert [source for _, source in Settings().model_entries()] == ["/m/one"]


def test_an_empty_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QIS_MODELS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"no model to serve: QIS_MODELS_DIR .* holds no model folder"):
        Settings().model_entries()


def test_a_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QIS_MODELS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="is not a folder"):
        Settings().model_entries()


def test_without_the_setting_nothing_is_scanned(monkeypatch):
    monkeypatch.delenv("QIS_MODELS_DIR", raising=False)
    assert Settings().model_entries() == []
