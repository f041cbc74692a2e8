"""``random:`` model sources: the published architectures with random weights, built on the device."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qwen_image_server.cli import app as cli_app
from qwen_image_server.config import Settings
from qwen_image_server.jobs import EncodedImage, Job, JobResult
from qwen_image_server.models.footprint import GIB, footprint
from qwen_image_server.models.machine import Gpu, HostMemory, discover_host_memory
from qwen_image_server.models.planner import PlanError, make_plan
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.random_arch import (
    build_components,
    init_random_,
    parameter_counts,
    tensor_rows,
    text_encoder_config,
)
from qwen_image_server.models.random_source import SMALL_OVERRIDES, architectures, parse_random_source, tensor_table
from qwen_image_server.models.spec import ModelConfigError, resolve_model, resolve_models
from qwen_image_server.models.tiny import _SPECIAL_TOKENS, _make_tokenizer
from qwen_image_server.models.weights_files import UnknownFootprint, read_tensors

NAMES = ("Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509")
SMALL = f"?{SMALL_OVERRIDES}&seed=3"


# --- the packaged architectures ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_full_sizes_counted_on_meta(name):
    counts = parameter_counts(name)
    assert counts["transformer"] == pytest.approx(20.43e9, rel=0.005)
    assert counts["text_encoder"] == pytest.approx(8.29e9, rel=0.005)
    assert counts["vae"] == pytest.approx(0.13e9, rel=0.05)


def test_published_values():
    arch = architectures()
    assert sorted(arch) == sorted(NAMES)
    assert [arch[n]["pipeline_class"] for n in NAMES] == [
        "QwenImagePipeline",
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
    ]
    for name in NAMES:  # the three differ in weights and pipeline only
        assert {k: v for k, v in arch[name].items() if k not in ("name", "pipeline_class", "image_processor")} == {
            k: v for k, v in arch[NAMES[0]].items() if k not in ("name", "pipeline_class")
        }
    t = arch[NAMES[0]]["transformer"]
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"], t["joint_attention_dim"], t["axes_dims_rope"]) == (
        60, 24, 128, 3584, [16, 56, 56]
    )  # fmt: skip
    s = arch[NAMES[0]]["scheduler"]
    assert (s["max_shift"], s["max_image_seq_len"], s["shift_terminal"], s["use_dynamic_shifting"]) == (0.9, 8192, 0.02, True)
    for name in NAMES[1:]:
        p = arch[name]["image_processor"]
        assert (p["patch_size"], p["merge_size"], p["temporal_patch_size"], p["min_pixels"], p["max_pixels"]) == (
            14,
            2,
            2,
            3136,
            12845056,
        )


def test_special_token_ids_are_the_byte_tokenizers():
    tokenizer = _make_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in _SPECIAL_TOKENS}
    config = text_encoder_config(architectures()["Qwen/Qwen-Image-Edit"], tokenizer)
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert config.text_config.vocab_size == 152064 and not config.tie_word_embeddings


# --- building on a device with random weights ---------------------------------------------------
def _small(name: str = "Qwen/Qwen-Image", seed: int = 3) -> dict:
    return build_components(
        parse_random_source(f"random:{name}?{SMALL_OVERRIDES}").architecture(), "cpu", torch.float32, seed=seed
    )


def test_same_seed_same_weights_and_the_init_scheme():
    first, again, other = _small(seed=3), _small(seed=3), _small(seed=4)
    for key in ("transformer", "text_encoder", "vae"):
        a, b, c = (m[key].state_dict() for m in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), key
        assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()), key
    tr = first["transformer"]
    block = tr.transformer_blocks[0]
    assert torch.all(block.attn.norm_q.weight == 1) and torch.all(block.attn.to_q.bias == 0)
    assert float(block.img_mlp.net[0].proj.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert not any(p.requires_grad for p in tr.parameters()) and not tr.training


def test_modules_are_made_on_the_target_device_in_the_target_dtype(monkeypatch):
    made: list[tuple[torch.device, torch.dtype]] = []
    original = torch.nn.Parameter.__new__

    def record(cls, data=None, requires_grad=True):
        if data is not None:
            made.append((data.device, data.dtype))
        return original(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", record)
    arch = parse_random_source(f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES}").architecture()
    build_components(arch, "meta", torch.bfloat16)
    assert made and {d.type for d, _ in made} == {"meta"}  # never materialised elsewhere first
    assert {t for _, t in made} == {torch.bfloat16}


def test_full_width_transformer_block_stays_finite_in_bf16():
    # One block at full width (3072 = 24 heads x 128), the text encoder shrunk; bf16 as on a GPU.
    arch = parse_random_source(f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES.replace('heads=1&', 'heads=24&', 1)}").architecture()
    arch["transformer"]["joint_attention_dim"] = 3584
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_server.models.random_arch import _config, _constructing

    with _constructing("cpu", torch.bfloat16):
        tr = QwenImageTransformer2DModel(**{**_config(arch["transformer"]), "axes_dims_rope": (16, 56, 56)})
    init_random_(tr, seed=0)
    assert tr.inner_dim == 3072 and next(tr.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        out = tr(
            hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
            encoder_hidden_states=torch.randn(1, 8, 3584, generator=g).bfloat16(),
            encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.bool),
            timestep=torch.tensor([0.5]).bfloat16(),
            img_shapes=[[(1, 4, 4)]],
            return_dict=False,
        )[0]
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all() and 0 < float(out.float().std()) < 100


def test_full_width_vae_round_trip_is_finite_and_not_saturated():
    from diffusers import AutoencoderKLQwenImage

    from qwen_image_server.models.random_arch import _config, _constructing

    with _constructing("cpu", torch.float32):
        vae = AutoencoderKLQwenImage(**_config(architectures()["Qwen/Qwen-Image"]["vae"]))
    init_random_(vae, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        image = vae.decode(torch.randn(1, 16, 1, 4, 4, generator=g), return_dict=False)[0]
        latents = vae.encode(torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1).latent_dist.mode()
    assert image.shape == (1, 3, 1, 32, 32) and latents.shape == (1, 16, 1, 4, 4)
    assert torch.isfinite(image).all() and torch.isfinite(latents).all()
    assert float(image.std()) > 0.01 and float((image.abs() == 1).float().mean()) < 0.5  # not clamped flat


@pytest.mark.parametrize("name", NAMES)
def test_runner_builds_and_runs_each_architecture(name, monkeypatch):
    from diffusers import DiffusionPipeline

    from qwen_image_server.models.runner import PipelineRunner

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("random: sources load nothing"))
    spec = resolve_model(f"random:{name}{SMALL}&edit_area=16384&condition_area=3136")
    torch.set_num_threads(1)
    runner = PipelineRunner(spec, device="cpu")
    assert runner.pipe.__class__.__name__ == spec.pipeline_class
    finite: list[bool] = []
    runner.pipe.transformer.register_forward_hook(lambda m, a, out: finite.append(bool(torch.isfinite(out[0]).all())))
    runner.pipe.vae.decoder.register_forward_hook(lambda m, a, out: finite.append(bool(torch.isfinite(out).all())))
    job = Job(
        mode="generate" if spec.can_generate else "edit",
        prompt="a red fox",
        seeds=[5],
        width=128,
        height=128,
        num_inference_steps=2,
    )
    if spec.can_edit:
        picture = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        job.images = [picture, picture[::-1]] if spec.multi_image else [picture]
    images = runner.run(job)
    assert [image.size for image in images] == [(128, 128)]
    assert len(finite) == 2 * 2 + 1 and all(finite)  # 2 steps x (cond + uncond), then the decoder
    assert runner.count_tokens("abc") == 3  # the byte-level tokenizer


@pytest.mark.parametrize("offload", ["none", "model"])
def test_random_sources_take_the_memory_modes(offload):
    """The full-size benchmark measures memory modes on random: sources, so they must apply there too."""
    from dataclasses import replace

    from qwen_image_server.models.profile import RunProfile
    from qwen_image_server.models.runner import PipelineRunner

    spec = resolve_model(f"random:Qwen/Qwen-Image{SMALL}")
    spec = replace(spec, profile=RunProfile(weights_dtype="fp8", offload=offload))
    torch.set_num_threads(1)
    runner = PipelineRunner(spec, device="cpu")
    summary = runner.memory.summary()
    assert summary["offload"] == offload and summary["fp8_components"] == ["transformer", "text_encoder"]
    assert runner.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    job = Job(mode="generate", prompt="a red fox", seeds=[5], width=128, height=128, num_inference_steps=2)
    image = np.asarray(runner.run(job)[0])
    assert image.shape == (128, 128, 3) and image.std() > 0


# --- resolving random: sources ----------------------------------------------------------------------
def test_resolve_random_sources_without_files():
    spec = resolve_model("random:Qwen/Qwen-Image")
    assert (spec.id, spec.kind, spec.pipeline_class, spec.source) == (
        "Qwen-Image",
        "text-to-image",
        "QwenImagePipeline",
        "random:Qwen/Qwen-Image",
    )
    assert spec.options == {}  # as the published model, which has no sidecar: the server's defaults apply
    assert spec.is_random and not spec.is_hub and spec.revision is None
    edit = resolve_model("random:Qwen/Qwen-Image-Edit-2509?layers=2&seed=7&default_size=512x512&edit_area=65536", "plus")
    assert (edit.id, edit.kind, edit.multi_image) == ("plus", "edit-plus", True)
    assert edit.options == {"default_size": "512x512", "edit_area": 65536}
    random = parse_random_source(edit.source)
    assert (random.seed, random.overrides) == (7, {"layers": 2})
    assert random.architecture()["transformer"]["num_layers"] == 2
    assert architectures()["Qwen/Qwen-Image-Edit-2509"]["transformer"]["num_layers"] == 60  # the packaged one is unchanged


def test_the_memory_plan_sizes_random_sources_from_their_architecture():
    model = read_tensors(resolve_model("random:Qwen/Qwen-Image"))
    assert model.origin == "architecture (random weights)" and not model.counts_only
    assert (model.inner_dim, model.text_encoder["hidden_size"], model.text_encoder["num_hidden_layers"]) == (3072, 3584, 28)
    counts = parameter_counts("Qwen/Qwen-Image")
    for name, tensors in model.components.items():
        assert sum(t.numel for t in tensors) == pytest.approx(counts[name], rel=1e-3)
        assert {t.dtype for t in tensors} <= {"BF16", "F32"}
    assert sum(t.name.startswith("transformer_blocks.59.") for t in model.components["transformer"]) > 0
    # 53.8 GiB of weights and 58.0 GiB peak measured on an H100 at 1024x1024 (bf16) with the text encoder's
    # language-model head, which the server drops once it is loaded (text_encoder_fast): 3584 x 152064 in bf16
    head = sum(t.numel for t in model.components["text_encoder"] if t.name.startswith("lm_head.")) * 2 / GIB
    assert head == pytest.approx(3584 * 152064 * 2 / GIB)
    spec = resolve_model("random:Qwen/Qwen-Image")
    fp = footprint(spec, model, run_bytes=2, max_image_side=1024)
    assert fp.weights / GIB == pytest.approx(53.8 - head, abs=0.2)
    assert (fp.weights + fp.activations) / GIB == pytest.approx(58.0 - head, abs=0.3)
    group = footprint(spec, model, run_bytes=2, max_image_side=1024, profile=RunProfile(offload="group", quantize="fp8"))
    assert group.weights < fp.weights / 10  # per-block figures: group offload keeps one block of each component
    small = read_tensors(resolve_model("random:Qwen/Qwen-Image?layers=2&seed=4"))
    assert sum(t.numel for t in small.components["transformer"]) < counts["transformer"] / 20
    # the plan places and refuses it as the real model: an 80 GB card holds it, a 48 GB one needs a memory mode
    card = {size: (lambda size=size: [Gpu("cuda:0", f"{size} GB card", size * GIB, size * GIB)]) for size in (48, 80)}
    assert make_plan([spec], Settings(max_image_side=1024), discover=card[80]).devices("Qwen-Image") == ["cuda:0"]
    with pytest.raises(PlanError, match=r"not enough GPU memory for model Qwen-Image .* needs 57\.\d GiB"):
        make_plan([spec], Settings(max_image_side=1024), discover=card[48])
    # on the CPU it runs in float32: twice the weights, which a 64 GiB machine refuses, pointing to bfloat16
    host = {size: (lambda size=size: HostMemory(size * GIB, size * GIB, f"{size} GiB machine")) for size in (64, 128)}
    cpu = make_plan([spec], Settings(device="cpu", max_image_side=1024), discover=card[80], host=host[128])
    assert cpu.devices("Qwen-Image") == ["cpu"] and cpu.footprints["Qwen-Image"].weights / GIB == pytest.approx(
        2 * (53.8 - head), abs=0.4
    )
    with pytest.raises(PlanError, match=r"(?s)for model Qwen-Image on the CPU: .*Would fit: --dtype bfloat16"):
        make_plan([spec], Settings(device="cpu", max_image_side=1024), host=host[64])


@pytest.mark.parametrize("name", sorted(architectures()))
def test_the_packaged_tensor_table_is_what_the_model_classes_hold(name):
    """The table the plan reads for an unchanged architecture (random_source.tensor_table) lists exactly the tensors
    of its modules built on the meta device, names, dtypes and sizes."""
    from importlib import metadata

    from qwen_image_server.models.random_source import _tensor_tables

    table = tensor_table(parse_random_source(f"random:{name}"))
    assert table is not None, f"no packaged tensor table for {name}"
    hint = 'after changing an architecture, run: python -c "from qwen_image_server.models.random_arch import write_tensor_tables; write_tensor_tables()"'  # noqa: E501
    built = tensor_rows(f"random:{name}")
    made_with = _tensor_tables()[name]["made_with"]
    if all(metadata.version(package) == version for package, version in made_with.items()):
        assert table == built, hint
    else:  # other versions of the model classes may name tensors otherwise: the sizes still agree
        for component, rows in built.items():
            assert sum(row[2] for row in table[component]) == sum(row[2] for row in rows), (component, made_with, hint)


def test_an_unchanged_random_source_is_sized_from_its_table_without_building_it(monkeypatch):
    """Sizing ``random:Qwen/Qwen-Image`` for the plan builds no module (milliseconds, and no diffusers import in the
    API process); the same source with overrides still is built, as only that tells its tensors."""
    import qwen_image_server.models.random_arch as random_arch

    def build(*args, **kwargs):
        raise RuntimeError("built on the meta device")

    monkeypatch.setattr(random_arch, "build_components", build)
    model = read_tensors(resolve_model("random:Qwen/Qwen-Image?seed=3"))  # a seed changes the weights, not their sizes
    assert model.origin == "architecture (random weights)"
    assert sum(len(tensors) for tensors in model.components.values()) == 1933 + 729 + 194
    assert (model.inner_dim, model.text_encoder["hidden_size"]) == (3072, 3584)
    with pytest.raises(UnknownFootprint, match="built on the meta device"):
        read_tensors(resolve_model("random:Qwen/Qwen-Image?layers=2"))


def test_a_random_source_that_cannot_be_built_has_an_unknown_estimate_not_a_crash(monkeypatch):
    import qwen_image_server.models.random_arch as random_arch

    def refuse(*args, **kwargs):
        raise RuntimeError("the classes refuse these values")

    monkeypatch.setattr(random_arch, "build_components", refuse)
    spec = resolve_model("random:Qwen/Qwen-Image?layers=2")
    with pytest.raises(UnknownFootprint, match="could not be built to size them: the classes refuse these values"):
        read_tensors(spec)
    card = [Gpu("cuda:0", "80 GB card", 80 * GIB, 80 * GIB)]
    plan = make_plan([spec], Settings(), discover=lambda: card)
    assert plan.devices(spec.id) == ["cuda:0"] and plan.model_summary(spec.id)["total_gib"] is None


@pytest.mark.parametrize(
    "source,message",
    [
        (
            "random:Qwen/Qwen-Image-2512",
            r"no architecture named 'Qwen/Qwen-Image-2512' \(known: Qwen/Qwen-Image, Qwen/Qwen-Image-Edit, Qwen/Qwen-Image-Edit-2509\)",
        ),
        ("random:Qwen/Qwen-Image?depth=2", r"unknown key 'depth' \(known: seed, layers"),
        ("random:Qwen/Qwen-Image?layers=0", "layers must be a positive integer, got '0'"),
        ("random:Qwen/Qwen-Image?layers=two", "layers must be a positive integer"),
        ("random:Qwen/Qwen-Image?layers=2&layers=3", "layers is given twice"),
        ("random:Qwen/Qwen-Image?layers", r"expected \?KEY=VALUE"),
        ("random:Qwen/Qwen-Image?text_hidden=512", "text_hidden must be text_heads x 128"),
        ("random:Qwen/Qwen-Image?text_kv_heads=3", "must be a multiple of text_kv_heads"),
        ("random:Qwen/Qwen-Image?vocab=100", "vocab must be at least 264"),
        ("random:Qwen/Qwen-Image?default_size=big", "default_size must be WIDTHxHEIGHT"),
    ],
)
def test_bad_random_sources(source, message):
    with pytest.raises(ModelConfigError, match=message):
        resolve_model(source)


def test_unnamed_random_source_with_overrides_is_not_split_at_its_equals_sign():
    s = Settings(models=["random:Qwen/Qwen-Image?layers=2", "edit=random:Qwen/Qwen-Image-Edit?layers=1"])
    assert s.model_entries() == [(None, "random:Qwen/Qwen-Image?layers=2"), ("edit", "random:Qwen/Qwen-Image-Edit?layers=1")]
    specs = resolve_models(s.model_entries(), s.profile_flags())
    assert [(spec.id, spec.kind) for spec in specs] == [("Qwen-Image", "text-to-image"), ("edit", "edit")]


def test_cli_refuses_a_bad_random_source_with_exit_2():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_image_server.cli",
            "serve",
            "--model",
            "x=random:Qwen/Qwen-Image?layers=1&text_layers=0",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "text_layers must be a positive integer" in result.stderr


def test_plan_command_places_or_refuses_the_full_random_architecture():
    """``qwen-image-server plan`` on fake cards (typer's runner, in this process: the command a user runs, without
    a second import of torch for it): the full-size random Qwen-Image does not fit a 48 GB card, whose plan is
    printed before the refusal; an 80 GB card holds it (make_plan above, same numbers)."""
    args = ["plan", "--model", "random:Qwen/Qwen-Image"]
    refused = CliRunner().invoke(cli_app, args, env={"QIS_FAKE_GPUS": "48GiB", "QIS_MAX_IMAGE_SIDE": "1024"})
    assert refused.exit_code == 2, refused.output
    assert "Qwen-Image: 57.4 GiB per worker at 1024x1024 (from architecture (random weights))" in refused.output
    assert "cuda:0 QIS_FAKE_GPUS (48.0 GiB free of 48.0 GiB): nothing, 48.0 GiB headroom" in refused.output
    assert "error: not enough GPU memory for model Qwen-Image (worker 1 of 1): each worker needs 57.4 GiB" in refused.output
    fits = CliRunner().invoke(cli_app, args, env={"QIS_FAKE_GPUS": "80GiB", "QIS_MAX_IMAGE_SIDE": "1024"})
    assert fits.exit_code == 0 and "the plan fits" in fits.output, fits.output


def test_cli_serve_refuses_on_the_cpu_a_model_this_machine_cannot_hold():
    """``serve`` without a GPU used to start building the full-size model in host memory (115 GB in float32) until
    the kernel killed it; now the plan, on this machine's real memory, refuses before the port opens."""
    host = discover_host_memory()
    if host is None or host.available > 4 * 114 * GIB:
        pytest.skip("this machine's memory is unknown, or large enough to start building four full-size models")
    command = [sys.executable, "-m", "qwen_image_server.cli", "serve", "--model", "random:Qwen/Qwen-Image", "--device", "cpu"]
    command += ["--workers", "4", "--port", "0"]
    env = {**os.environ, "QIS_MAX_IMAGE_SIDE": "1024"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-2000:]
    assert "error: not enough memory on this machine for model Qwen-Image on the CPU: each of its workers needs 114." in output
    assert "(MemAvailable in /proc/meminfo)" in output or "(the container's memory limit (cgroup))" in output
    assert "If the estimate is wrong for this machine, --memory-check warn serves anyway." in output
    assert "Uvicorn running" not in output and "worker" not in output.split("error:")[0].lower()


# --- the response's stats extension ----------------------------------------------------------------
def test_response_stats_give_queue_and_pipeline_seconds(tmp_path):
    from qwen_image_server.protocol.images import GenerationRequest
    from qwen_image_server.serving.service import ImageService

    class Engine:
        models = [resolve_model("random:Qwen/Qwen-Image")]

        async def submit(self, model, job, on_partial=None):
            started = time.time() + 2.0  # as if the job waited two seconds for a worker
            return JobResult([EncodedImage(job.seeds[0], b"png", 64, 64)], started, started + 1.25, ["w0"], prompt_tokens=3)

    service = ImageService(Settings(image_output_dir=tmp_path), Engine(), store=None)
    prepared = asyncio.run(service.prepare_generation(GenerationRequest(prompt="p", size="256x256", seed=1)))
    body, _ = asyncio.run(service.run(prepared, "http://x/"))
    assert body.stats["pipeline_seconds"] == pytest.approx(1.25)
    assert 2.0 <= body.stats["queue_seconds"] < 2.5
