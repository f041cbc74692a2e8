"""LoRAs in the API process: the flag, presets, file checks before the port opens, routing to the base model."""

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_cli
from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.lora import merge_preset, parse_lora_flag
from qwen_image_server.models.lora_check import transformer_layers
from qwen_image_server.models.spec import ModelConfigError
from qwen_image_server.models.weights_files import read_header
from qwen_image_server.protocol.images import GenerationRequest
from qwen_image_server.serving.service import ImageService


def _resolve(tiny_t2i, *loras, **settings):
    return resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], loras=list(loras), **settings))


def test_flag_options_scale_fuse_and_preset_knobs():
    lora = parse_lora_flag("fast=/l/x.safetensors:preset=lightning,steps=4,fuse=true,scale=0.8,shift_terminal=none@qwen-image")
    assert (lora.name, lora.path, lora.model, lora.fuse, lora.scale) == ("fast", "/l/x.safetensors", "qwen-image", True, 0.8)
    assert lora.preset == {"preset": "lightning", "steps": 4, "scheduler": {"shift_terminal": None}}
    plain = parse_lora_flag("s=/a:b/s.safetensors")
    assert (plain.path, plain.model, plain.fuse, plain.preset) == ("/a:b/s.safetensors", None, False, {})
    with pytest.raises(ValueError, match="--lora s: unknown option 'stepz'"):
        parse_lora_flag("s=/x.safetensors:stepz=4")
    with pytest.raises(ValueError, match=r"LoRA s \(--lora\): steps must be an integer"):
        parse_lora_flag("s=/x.safetensors:steps=many")
    # one step gives Qwen-Image's scheduler NaN sigmas: the preset served an all-black image with a 200
    with pytest.raises(ValueError, match=r"LoRA s \(--lora\): steps must be at least 2, as a request's num_inference_steps"):
        parse_lora_flag("s=/x.safetensors:steps=1")
    with pytest.raises(ValueError, match=r"steps must be an integer, got '4.5'"):
        parse_lora_flag("s=/x.safetensors:steps=4.5")


def test_lora_names_paths_and_scopes_are_read_as_meant(tmp_path, tiny_t2i):
    """Found serving LoRAs: a name with ';' or '@' was served (QIS_LORAS could not spell it, nor a scope name it);
    ``:Scale=0.5`` was taken as part of the path (file not found); a ':' or '@' in the file's own path was taken
    as options or a scope; a LoRA scoped to an alias said the model was not served."""
    for name in ("my lora;x", "a@b", "-x", "x,y"):
        with pytest.raises(ValueError, match=r"a LoRA's name is letters, digits and \. _ : / \+ -"):
            parse_lora_flag(f"{name}=/l/x.safetensors")
    assert parse_lora_flag("s=/l/x.safetensors:Scale=0.5").scale == 0.5  # option names in any case
    odd = tmp_path / "a:b=c"
    odd.mkdir()
    for file in (odd / "s.safetensors", tmp_path / "x:scale=1.safetensors", tmp_path / "v@1.safetensors"):
        file.write_bytes(b"")
        lora = parse_lora_flag(f"s={file}")
        assert (lora.path, lora.model, lora.scale) == (str(file), None, 1.0)
    assert parse_lora_flag("s=hub/lora@V2.SafeTensors").model is None  # the suffix in any case
    assert parse_lora_flag("s=hf:org/name/file.safetensors:revision=abc@tiny").model == "tiny"
    scoped = parse_lora_flag(f"s={tmp_path / 'v@1.safetensors'}:scale=0.5@tiny")
    assert (scoped.path, scoped.model, scoped.scale) == (str(tmp_path / "v@1.safetensors"), "tiny", 0.5)
    with pytest.raises(ModelConfigError, match="--lora names dall-e-3, another name of a served model"):
        _resolve(tiny_t2i, "s=/l/x.safetensors@dall-e-3", model_aliases=["dall-e-3=tiny"])


def test_a_preset_files_knobs_are_whole_where_they_must_be_and_its_errors_name_the_file(tmp_path):
    """``{"steps": 4.7}`` in the JSON file ran 4 steps without a word; errors of a knob's type named no file."""
    from qwen_image_server.models.lora import read_preset_file

    lora = parse_lora_flag(f"h={tmp_path / 'h.safetensors'}")
    sidecar = tmp_path / "h.json"
    for knobs, message in [
        ({"steps": 4.7}, "steps must be an integer, got 4.7"),
        ({"steps": "abc"}, "steps must be an integer, got 'abc'"),
        ({"steps": 1}, "steps must be at least 2"),
        ({"true_cfg_scale": "x"}, "true_cfg_scale must be a number, got 'x'"),
        ({"scheduler": {"invert_sigmas": "maybe"}}, "invert_sigmas must be true or false, got 'maybe'"),
        ({"scheduler": {"time_shift_type": "cubic"}}, "time_shift_type must be one of exponential, linear"),
        # sigmas of NaN (an all-black image with a 200) or a division by zero at every request
        ({"scheduler": {"shift": 0}}, "shift must be above 0, got 0"),
        ({"scheduler": {"shift": -1}}, "shift must be above 0, got -1"),
        ({"scheduler": {"shift_terminal": 1}}, "shift_terminal must be between 0 and 1 (both excluded), or none, got 1"),
        ({"scheduler": {"max_image_seq_len": 0}}, "max_image_seq_len must be at least 1, got 0"),
    ]:
        sidecar.write_text(json.dumps(knobs))
        with pytest.raises(ValueError) as refused:
            read_preset_file(lora)
        assert str(refused.value).startswith(f"LoRA h ({sidecar}): ") and message in str(refused.value), refused.value
    sidecar.write_text(json.dumps({"steps": 4.0, "true_cfg_scale": 1}))
    assert read_preset_file(lora) == {"steps": 4, "true_cfg_scale": 1.0}


def test_lightning_preset_and_precedence():
    lightning = merge_preset("l", {"preset": "lightning"}, {})
    assert lightning["name"] == "lightning" and lightning["steps"] == 8 and lightning["true_cfg_scale"] == 1.0
    scheduler = lightning["scheduler"]
    assert scheduler["base_shift"] == scheduler["max_shift"] == math.log(3)
    assert (
        scheduler["shift_terminal"] is None
        and scheduler["time_shift_type"] == "exponential"
        and scheduler["use_dynamic_shifting"]
    )
    assert "base_image_seq_len" not in scheduler, "the model's own sequence lengths are kept"
    merged = merge_preset(
        "l", {"steps": 4}, {"preset": "lightning", "steps": 6, "true_cfg_scale": 1.5, "scheduler": {"shift": 2.0}}
    )
    assert (merged["steps"], merged["true_cfg_scale"], merged["scheduler"]["shift"]) == (4, 1.5, 2.0), "flag > file > built-in"
    with pytest.raises(ValueError, match="LoRA l: unknown preset 'turbo'"):
        merge_preset("l", {"preset": "turbo"}, {})


def test_scheduler_settings_the_scheduler_refuses_at_a_call_are_refused_at_start(monkeypatch):
    """Two sigma spacings at once, or beta sigmas without scipy, started fine and then failed every request of the
    LoRA with a 500 (diffusers checks them when the scheduler is built, per request). Checked on the merged preset:
    the flag's knob joins the file's."""
    import importlib.util

    with pytest.raises(ValueError, match="LoRA l: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                       "may be true, got use_karras_sigmas, use_exponential_sigmas"):  # fmt: skip
        merge_preset("l", {"scheduler": {"use_karras_sigmas": True}}, {"scheduler": {"use_exponential_sigmas": True}})
    assert merge_preset("l", {"scheduler": {"use_karras_sigmas": True}}, {})["scheduler"] == {"use_karras_sigmas": True}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else object())
    with pytest.raises(ValueError, match=r"LoRA l: use_beta_sigmas needs scipy, which is not installed \(pip install scipy\)"):
        merge_preset("l", {"scheduler": {"use_beta_sigmas": True}}, {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert merge_preset("l", {"scheduler": {"use_beta_sigmas": True}}, {})["scheduler"] == {"use_beta_sigmas": True}


def test_resolved_lora_with_its_preset_file(tiny_t2i, tiny_lora, tmp_path):
    lora_file = tmp_path / "fast.safetensors"
    lora_file.write_bytes(tiny_lora.read_bytes())
    (tmp_path / "fast.json").write_text(json.dumps({"preset": "lightning", "steps": 4}))
    (spec,) = _resolve(tiny_t2i, f"fast={lora_file}:true_cfg_scale=1.2", f"style={tiny_lora}:fuse=true")
    fast, style = spec.profile.loras
    assert (fast.model, fast.rank, fast.preset["steps"], fast.preset["true_cfg_scale"], fast.preset["name"]) == (
        "tiny",
        4,
        4,
        1.2,
        "lightning",
    )
    assert style.fuse and style.preset == {}
    summary = spec.profile.summary()["loras"]
    assert (
        summary[0]["name"] == "fast"
        and summary[0]["preset"]["scheduler"]["shift_terminal"] is None
        and summary[1]["fuse"] is True
    )


def test_layer_table_matches_the_real_transformer(tiny_t2i):
    config = json.loads((tiny_t2i / "transformer" / "config.json").read_text())
    top, block, layers = transformer_layers(config)
    header = read_header(tiny_t2i / "transformer" / "diffusion_pytorch_model.safetensors")
    linear = {k.removesuffix(".weight"): (v["shape"][1], v["shape"][0]) for k, v in header.items() if len(v["shape"]) == 2}
    expected = dict(top) | {f"transformer_blocks.{i}.{name}": dims for i in range(layers) for name, dims in block.items()}
    assert expected == linear


def _fake_lora(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: np.ones(shape, dtype=np.float32) for k, shape in keys.items()}, str(path))
    return path


def _pair(module: str, rank: int, inputs: int, outputs: int, a: str = ".lora_A.weight", b: str = ".lora_B.weight") -> dict:
    return {module + a: (rank, inputs), module + b: (outputs, rank)}


def test_kohya_style_keys_are_accepted(tiny_t2i, tmp_path):
    a, b = ".lora_down.weight", ".lora_up.weight"
    keys = _pair("lora_unet_transformer_blocks_0_attn_to_q", 2, 16, 16, a, b)
    keys |= _pair("lora_unet_transformer_blocks_1_img_mlp_net_2", 2, 64, 16, a, b)
    keys["lora_unet_transformer_blocks_0_attn_to_q.alpha"] = ()
    (spec,) = _resolve(tiny_t2i, f"k={_fake_lora(tmp_path / 'k.safetensors', keys)}")
    assert spec.profile.loras[0].rank == 2


def test_a_base_config_that_cannot_be_read_leaves_the_names_checked(tiny_t2i, tiny_lora, tmp_path):
    """A transformer config that is not JSON, not an object, or has sizes that are not whole numbers is read as
    missing (as a hub model's offline): the LoRA's names are still checked, the start goes on (the model's load then
    says what is wrong with its config). Each of these was a traceback before the port opened."""
    for content in ("not json", "[1, 2]", '{"num_attention_heads": "x"}', '{"num_layers": 0}'):
        folder = tmp_path / f"base{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_t2i, folder)
        (folder / "transformer" / "config.json").write_text(content)
        (spec,) = _resolve(folder, f"style={tiny_lora}")
        assert spec.profile.loras[0].rank > 0, content
        flux = _fake_lora(tmp_path / "flux.safetensors", _pair("transformer.single_transformer_blocks.0.attn.to_q", 4, 48, 48))
        with pytest.raises(ModelConfigError, match=r"LoRA flux .*seems to be for Flux"):
            _resolve(folder, f"flux={flux}")


def test_bad_loras_are_start_up_errors(tiny_t2i, tiny_lora, tmp_path):
    with pytest.raises(ModelConfigError, match=r"LoRA gone \(/nowhere/x.safetensors\) for model tiny: file not found"):
        _resolve(tiny_t2i, "gone=/nowhere/x.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights at all, just some text that is long enough")
    with pytest.raises(ModelConfigError, match=r"LoRA notes .*: not a safetensors file"):
        _resolve(tiny_t2i, f"notes={text}")
    flux = _fake_lora(tmp_path / "flux.safetensors", _pair("transformer.single_transformer_blocks.0.attn.to_q", 4, 48, 48))
    expected = r"expected keys like transformer\.transformer_blocks\.N\.attn\.to_q"
    with pytest.raises(ModelConfigError, match=r"LoRA flux .*seems to be for Flux .*" + expected):
        _resolve(tiny_t2i, f"flux={flux}")
    sdxl = _fake_lora(tmp_path / "sdxl.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)})
    with pytest.raises(ModelConfigError, match=r"LoRA sdxl .*seems to be for Stable Diffusion / SDXL"):
        _resolve(tiny_t2i, f"sdxl={sdxl}")
    big = _fake_lora(tmp_path / "big.safetensors", _pair("transformer.transformer_blocks.0.attn.to_q", 4, 3072, 3072))
    with pytest.raises(
        ModelConfigError, match=r"LoRA big .*layer transformer_blocks\.0\.attn\.to_q has LoRA factors of shapes \[4, 3072\]"
    ):
        _resolve(tiny_t2i, f"big={big}")
    with pytest.raises(ModelConfigError, match="--lora tiny: the name is already a served model's id"):
        _resolve(tiny_t2i, f"tiny={tiny_lora}")
    with pytest.raises(ModelConfigError, match="--lora a: given twice"):
        _resolve(tiny_t2i, f"a={tiny_lora}", f"a={tiny_lora}")


def test_a_lora_for_a_random_weight_model_is_checked_against_its_packaged_architecture(tmp_path):
    """``random:Qwen/Qwen-Image`` has no config file to read: a tiny model's LoRA (16 wide) passed the check there
    ("the plan fits") and would fail in the worker. Its packaged architecture, overrides applied, is the config."""
    small = _fake_lora(tmp_path / "small.safetensors", _pair("transformer.transformer_blocks.0.attn.to_q", 4, 16, 16))
    with pytest.raises(ModelConfigError, match=r"factors of shapes \[4, 16\] .* needs \[r, 3072\] and \[3072, r\]"):
        resolve_configured(Settings(models=["random:Qwen/Qwen-Image"], loras=[f"small={small}"]))
    deep = _fake_lora(tmp_path / "deep.safetensors", _pair("transformer.transformer_blocks.5.attn.to_q", 4, 3072, 3072))
    with pytest.raises(ModelConfigError, match="with more layers"):
        resolve_configured(Settings(models=["random:Qwen/Qwen-Image?layers=2"], loras=[f"deep={deep}"]))
    # a layer of a block that is not linear (the query norm): not a deeper model's, which it was said to be
    norm = _fake_lora(tmp_path / "norm.safetensors", _pair("transformer.transformer_blocks.0.attn.norm_q", 4, 128, 128))
    with pytest.raises(ModelConfigError, match="seems to be for layers of a Qwen-Image transformer that are not its linear"):
        resolve_configured(Settings(models=["random:Qwen/Qwen-Image"], loras=[f"norm={norm}"]))
    fits = _fake_lora(tmp_path / "fits.safetensors", _pair("transformer.transformer_blocks.5.attn.to_q", 4, 3072, 3072))
    (spec,) = resolve_configured(Settings(models=["random:Qwen/Qwen-Image"], loras=[f"fits={fits}"]))
    assert [lora.name for lora in spec.profile.loras] == ["fits"]


def test_cli_refuses_a_bad_lora_before_serving(tiny_t2i, tmp_path):
    flux = _fake_lora(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.lora_A.weight": (4, 48)})
    result = run_cli("serve", "--model", f"tiny={tiny_t2i}", "--lora", f"flux={flux}", "--port", "0")
    assert result.returncode == 2
    assert "LoRA flux" in result.stderr and "seems to be for Flux" in result.stderr


class _Engine:
    def __init__(self, models):
        self.models = models


def _generation_job(service: ImageService, **fields):
    """The job the service makes of a generation request with ``fields``."""
    req = GenerationRequest(prompt="p", **fields)
    return service._job(req, service._model(req.model, edit=False), "generate", None)


def test_lora_ids_route_to_the_base_model_with_the_preset(tiny_t2i, tiny_lora, tmp_path):
    specs = _resolve(tiny_t2i, f"fast={tiny_lora}:preset=lightning,steps=4", f"style={tiny_lora}")
    service = ImageService(Settings(image_output_dir=tmp_path), _Engine(specs), store=None)
    job = functools.partial(_generation_job, service)

    fast = job(model="fast", quality="high")
    assert service._model("fast", edit=False).id == "tiny"
    assert (fast.lora, fast.num_inference_steps, fast.true_cfg_scale) == ("fast", 4, 1.0), "the preset's steps win over quality"
    overridden = job(model="fast", num_inference_steps=12, true_cfg_scale=3.0)
    assert (overridden.num_inference_steps, overridden.true_cfg_scale) == (12, 3.0), "request fields win over the preset"
    style = job(model="style", quality="low")
    assert (style.lora, style.num_inference_steps, style.true_cfg_scale) == ("style", 20, 4.0), "no preset: as for the base model"
    base = job(model="tiny")
    assert base.lora is None and base.num_inference_steps == 4


def test_a_fused_lora_preset_applies_to_the_base_id(tiny_t2i, tiny_lora, tmp_path):
    specs = _resolve(tiny_t2i, f"fast={tiny_lora}:preset=lightning,fuse=true")
    service = ImageService(Settings(image_output_dir=tmp_path), _Engine(specs), store=None)
    job = service._job(GenerationRequest(prompt="p", model="tiny"), specs[0], "generate", None)
    assert (job.lora, job.num_inference_steps, job.true_cfg_scale) == (None, 8, 1.0)


def test_a_request_may_set_a_swapped_loras_strength_only(tiny_t2i, tiny_lora, tmp_path):
    from qwen_image_server.errors import InvalidRequest

    specs = _resolve(tiny_t2i, f"style={tiny_lora}", f"merged={tiny_lora}:fuse=true,scale=0.7")
    other = resolve_configured(Settings(models=[f"other={tiny_t2i}"], loras=[f"elsewhere={tiny_lora}@other"]))
    service = ImageService(Settings(image_output_dir=tmp_path), _Engine(specs + other), store=None)
    job = functools.partial(_generation_job, service)

    assert (job(model="style", lora_scale=0.25).lora_scale, job(model="style").lora_scale) == (0.25, None)
    # the model's own LoRAs whose strength a request may set: not the fused one, nor another model's
    with pytest.raises(InvalidRequest, match=r"lora_scale applies to a LoRA model id, not to tiny \(style\)$") as base:
        job(model="tiny", lora_scale=0.5)
    with pytest.raises(
        InvalidRequest, match=r"LoRA merged is fused into its base model's weights: its strength is fixed \(0.7\)"
    ):
        job(model="merged", lora_scale=0.5)
    assert base.value.param == "lora_scale"
    for bad in (-0.1, 2.5):
        with pytest.raises(ValueError):
            GenerationRequest(prompt="p", model="style", lora_scale=bad)


@pytest.fixture
def offline_hub(lora_hub_cache, monkeypatch) -> Path:
    """The hub cache of ``lora_hub_cache``, offline, as ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=...`` set it at start-up."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(lora_hub_cache))
    return lora_hub_cache


def test_a_hub_lora_is_read_offline_from_the_hub_cache_at_each_revision(tiny_t2i, offline_hub):
    from model_files import HUB_LORA, LORA_MAIN_REV, LORA_V2_REV

    [lora] = _resolve(tiny_t2i, f"fast={HUB_LORA}")[0].profile.loras
    snapshots = offline_hub / "models--test-org--tiny-loras" / "snapshots"
    assert (lora.hub, Path(lora.path)) == (HUB_LORA, snapshots / LORA_MAIN_REV / "lightning" / "fast.safetensors")
    assert lora.rank == 4 and lora.preset["name"] == "lightning" and lora.preset["steps"] == 2, "with its preset file"
    [v2] = _resolve(tiny_t2i, f"fast={HUB_LORA}:revision=v2,scale=0.5@tiny")[0].profile.loras
    assert Path(v2.path) == snapshots / LORA_V2_REV / "lightning" / "fast.safetensors"
    assert (v2.rank, v2.preset, v2.scale, v2.revision) == (8, {}, 0.5, "v2")


@pytest.mark.parametrize(
    "flag,message",
    [
        ("hf:test-org/tiny-loras/lightning/slow.safetensors", r"LoRA x \(hf:test-org/tiny-loras/lightning/slow.safetensors\): "
         r"not in the hub cache \(.*hub\) and the hub cannot be reached \(HF_HUB_OFFLINE is set\)"),
        ("hf:test-org/tiny-loras/lightning/fast.safetensors:revision=v9", r"\(hf:.* at v9\): not in the hub cache"),
        ("hf:test-org/tiny-loras", r"expected hf:ORG/NAME/FILE.safetensors \(a file of a hub repository\)"),
        ("hf:test-org//fast.safetensors", r"expected hf:ORG/NAME/FILE.safetensors"),
        ("/loras/x.safetensors:revision=v2", r"--lora x: revision= needs a value and a hub LoRA"),
    ],
)  # fmt: skip
def test_hub_loras_that_cannot_be_had_are_start_up_errors(tiny_t2i, offline_hub, flag, message):
    with pytest.raises(ValueError, match=message):
        _resolve(tiny_t2i, f"x={flag}")
