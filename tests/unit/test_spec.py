"""Model resolution happens before the port opens and fails clearly."""

import json

import pytest

from conftest import run_cli
from qwen_image_server.models.configured import resolve_models
from qwen_image_server.models.spec import ModelConfigError, default_model_id, resolve_model


def test_tiny_models_resolve_by_class(tiny_t2i, tiny_edit, tiny_edit_plus):
    kinds = [resolve_model(str(p)).kind for p in (tiny_t2i, tiny_edit, tiny_edit_plus)]
    assert kinds == ["text-to-image", "edit", "edit-plus"]
    spec = resolve_model(str(tiny_edit), "my-edit")
    assert spec.id == "my-edit" and spec.can_edit and not spec.multi_image
    assert spec.options["edit_area"] == 256 * 256


def test_missing_folder(tmp_path):
    with pytest.raises(ModelConfigError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "a-file").write_text("x")  # it said "not found" of a file that is there
    with pytest.raises(ModelConfigError, match="a-file is a file, not a model folder"):
        resolve_model(str(tmp_path / "a-file"))


def test_folder_without_index(tmp_path):
    with pytest.raises(ModelConfigError, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_unknown_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelConfigError, match="'StableDiffusionPipeline' is not served"):
        resolve_model(str(tmp_path))


def test_duplicate_ids_and_no_models(tiny_t2i):
    with pytest.raises(ModelConfigError, match="unique"):
        resolve_models([("a", str(tiny_t2i)), ("a", str(tiny_t2i))])
    with pytest.raises(ModelConfigError, match="no model to serve"):
        resolve_models([])


@pytest.mark.parametrize("ident", ["a@b", "a b", "a,b", "a;b", "a=b", "-a"])
def test_a_model_id_that_scoped_values_could_not_name_is_refused(tiny_t2i, ident):
    """``--workers 2@a@b`` split at the first '@' and ``--offload model@a@b`` at the last: such ids are refused, as
    aliases and LoRA names are."""
    with pytest.raises(ModelConfigError, match="a model id is letters, digits"):
        resolve_models([(ident, str(tiny_t2i))])
    assert [spec.id for spec in resolve_models([("org/name:v1.2+x", str(tiny_t2i))])] == ["org/name:v1.2+x"]


def test_default_ids():
    assert default_model_id("Qwen/Qwen-Image-Edit-2509") == "Qwen-Image-Edit-2509"
    assert default_model_id("/models/qwen image/") == "qwen-image"


def test_cli_reports_bad_model_before_serving(tmp_path):
    result = run_cli("serve", "--model", str(tmp_path / "missing"), "--port", "0")
    assert result.returncode == 2
    assert "model folder not found" in result.stderr


def test_a_hub_model_that_cannot_be_reached_says_how_to_read_the_cache_and_logs_each_line_once(monkeypatch):
    """Without a network the hub client retries for about 24 s; each of its warnings came twice (its own handler and
    the server's), and the error did not say that HF_HUB_OFFLINE=1 reads the cache at once."""
    import logging

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    logging.getLogger("huggingface_hub").addHandler(logging.StreamHandler())  # as the hub client's own import adds

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelConfigError, match="HF_HUB_OFFLINE=1 reads the hub cache at once"):
        resolve_model("Qwen/Qwen-Image")
    assert logging.getLogger("huggingface_hub").handlers == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigError) as refused:
        resolve_model("Qwen/Qwen-Image")
    assert "HF_HUB_OFFLINE" not in str(refused.value)
