"""``random:`` model sources resolved, sized and refused, without building them on a device (building them:
test_random_arch.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from typer.testing import CliRunner

from conftest import run_cli
from qwen_image_server.cli import app as cli_app
from qwen_image_server.config import Settings
from qwen_image_server.jobs import EncodedImage, JobResult
from qwen_image_server.models.configured import resolve_models
from qwen_image_server.models.footprint import GIB, footprint
from qwen_image_server.models.machine import Gpu, HostMemory, discover_host_memory
from qwen_image_server.models.plan_result import PlanError
from qwen_image_server.models.planner import make_plan
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.random_arch import (
    parameter_counts,
    tensor_rows,
)
from qwen_image_server.models.random_source import architectures, parse_random_source, tensor_table
from qwen_image_server.models.spec import ModelConfigError, resolve_model
from qwen_image_server.models.weights_files import UnknownFootprint, read_tensors

NAMES = ("Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509")


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
    API process), nor does the same source with fewer or more blocks (``layers``, ``text_layers``, ``vision_depth``);
    one whose widths change still is built, as only that tells its tensors."""
    import qwen_image_server.models.random_arch as random_arch

    def build(*args, **kwargs):
        raise RuntimeError("built on the meta device")

    monkeypatch.setattr(random_arch, "build_components", build)
    model = read_tensors(resolve_model("random:Qwen/Qwen-Image?seed=3"))  # a seed changes the weights, not their sizes
    assert model.origin == "architecture (random weights)"
    assert sum(len(tensors) for tensors in model.components.values()) == 1933 + 729 + 194
    assert (model.inner_dim, model.text_encoder["hidden_size"]) == (3072, 3584)
    shallow = read_tensors(resolve_model("random:Qwen/Qwen-Image?layers=2&text_layers=1&vision_depth=3"))

    def blocks(component: str, prefix: str) -> set[str]:
        return {t.name.removeprefix(prefix).split(".")[0] for t in shallow.components[component] if t.name.startswith(prefix)}

    assert blocks("transformer", "transformer_blocks.") == {"0", "1"}
    assert blocks("text_encoder", "model.language_model.layers.") == {"0"}
    assert blocks("text_encoder", "model.visual.blocks.") == {"0", "1", "2"}
    with pytest.raises(UnknownFootprint, match="built on the meta device"):
        read_tensors(resolve_model("random:Qwen/Qwen-Image?layers=2&heads=4"))


@pytest.mark.parametrize("overrides", ["layers=2&text_layers=1&vision_depth=1", "layers=70&vision_depth=40", "text_layers=3"])
def test_a_random_source_of_other_depths_has_the_table_the_model_classes_hold(overrides):
    """The table of a source with depth overrides, made from the packaged one without building anything, lists
    exactly what its modules built on the meta device hold, in the same order (the fewer blocks of tests and the
    more of larger runs)."""
    from importlib import metadata

    from qwen_image_server.models.random_source import _tensor_tables

    source = f"random:Qwen/Qwen-Image?{overrides}"
    made_with = _tensor_tables()["Qwen/Qwen-Image"]["made_with"]
    if any(metadata.version(package) != version for package, version in made_with.items()):
        pytest.skip(f"the packaged table names tensors as {made_with} do")
    assert tensor_table(parse_random_source(source)) == tensor_rows(source)


def test_a_random_source_that_cannot_be_built_has_an_unknown_estimate_not_a_crash(monkeypatch):
    import qwen_image_server.models.random_arch as random_arch

    def refuse(*args, **kwargs):
        raise RuntimeError("the classes refuse these values")

    monkeypatch.setattr(random_arch, "build_components", refuse)
    spec = resolve_model("random:Qwen/Qwen-Image?layers=2&heads=4")  # other widths: only building tells
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
        # larger than the real model: plan sized 99999999 blocks for minutes, growing in memory
        (
            "random:Qwen/Qwen-Image?layers=99999999",
            "layers \\(transformer blocks\\) must be at most 240, 4 times Qwen/Qwen-Image's own 60",
        ),
        ("random:Qwen/Qwen-Image-Edit?vision_depth=129", "vision_depth \\(vision encoder blocks\\) must be at most 128"),
        ("random:Qwen/Qwen-Image?seed=99999999999999999999", "seed must be at most 9223372036854775807"),
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
    result = run_cli("serve", "--model", "x=random:Qwen/Qwen-Image?layers=1&text_layers=0", "--port", "0")
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
    args = ["serve", "--model", "random:Qwen/Qwen-Image", "--device", "cpu", "--workers", "4", "--port", "0"]
    refused = run_cli(*args, env={"QIS_MAX_IMAGE_SIDE": "1024"})
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-2000:]
    assert "error: not enough memory on this machine for model Qwen-Image on the CPU: each of its workers needs 114." in output
    assert "(MemAvailable in /proc/meminfo)" in output or "(the container's memory limit (cgroup))" in output
    assert "If the estimate is wrong for this machine, --memory-check warn serves anyway." in output
    assert "Uvicorn running" not in output and "worker" not in output.split("error:")[0].lower()


# --- the response's stats extension ----------------------------------------------------------------
def test_response_stats_give_queue_and_pipeline_seconds(tmp_path):
    from qwen_image_server.engine.base import EngineDefaults
    from qwen_image_server.protocol.images import GenerationRequest
    from qwen_image_server.serving.service import ImageService

    class Engine(EngineDefaults):
        models = [resolve_model("random:Qwen/Qwen-Image")]

        async def submit(self, model, job, on_partial=None):
            started = time.time() + 2.0  # as if the job waited two seconds for a worker
            return JobResult([EncodedImage(job.seeds[0], b"png", 64, 64)], started, started + 1.25, ["w0"], prompt_tokens=3)

    service = ImageService(Settings(image_output_dir=tmp_path), Engine(), store=None)
    prepared = asyncio.run(service.prepare_generation(GenerationRequest(prompt="p", size="256x256", seed=1)))
    body, _ = asyncio.run(service.run(prepared, "http://x/"))
    assert body.stats["pipeline_seconds"] == pytest.approx(1.25)
    assert 2.0 <= body.stats["queue_seconds"] < 2.5


def test_depth_rows_are_repeated_in_place_and_a_table_without_such_blocks_is_built_instead():
    from qwen_image_server.models.random_source import _repeat_block

    rows = [["embed.w", "BF16", 4, 2], ["blocks.0.a", "BF16", 2, 1], ["blocks.0.b", "BF16", 3, 1], ["blocks.1.a", "BF16", 2, 1],
            ["blocks.1.b", "BF16", 3, 1], ["norm.w", "BF16", 1, 1]]  # fmt: skip
    names = [row[0] for row in _repeat_block(rows, "blocks.", 3) or []]
    assert names == ["embed.w", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "blocks.2.a", "blocks.2.b", "norm.w"]
    assert [row[0] for row in _repeat_block(rows, "blocks.", 1) or []] == ["embed.w", "blocks.0.a", "blocks.0.b", "norm.w"]
    assert _repeat_block(rows, "model.layers.", 2) is None
