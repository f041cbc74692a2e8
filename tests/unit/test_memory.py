"""Memory modes on CPU: each mode loads, runs generation, a variation and edits like the resident model; FP8 is really FP8."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import imported_modules
from qwen_image_server.jobs import Job
from qwen_image_server.models.memory import MemoryMode
from qwen_image_server.models.memory_modes import OFFLOADED, check_memory_modes, check_mode
from qwen_image_server.models.profile import ProfileError, RunProfile
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model

SIZE = 128
GENERATE = Job(mode="generate", prompt="a red cube", seeds=[7], width=SIZE, height=SIZE, num_inference_steps=2)


def _runner(folder, **profile) -> PipelineRunner:
    spec = resolve_model(str(folder), "tiny")
    return PipelineRunner(replace(spec, profile=RunProfile(**profile)), device="cpu")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _source_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)


def _variation() -> Job:
    return Job(mode="variation", prompt="a red cube", seeds=[3], width=SIZE, height=SIZE, num_inference_steps=2,
               images=[_source_image()], strength=0.8)  # fmt: skip


def _outputs(runner: PipelineRunner, jobs: list[Job]) -> list[np.ndarray]:
    return [_pixels(runner.run(job)[0]) for job in jobs]


@pytest.fixture(scope="module")
def t2i_reference(tiny_t2i) -> list[np.ndarray]:
    return _outputs(_runner(tiny_t2i), [GENERATE, _variation()])


def _fp8_layers(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: param.dtype for name, param in module.named_parameters()}


@pytest.mark.parametrize(
    "profile",
    [{"offload": "text-encoder"}, {"offload": "group"}, {"offload": "model"}],
    ids=lambda p: "-".join(p.values()),
)
def test_offload_modes_give_the_resident_images(tiny_t2i, t2i_reference, profile):
    runner = _runner(tiny_t2i, **profile)
    assert runner.memory.summary()["offload"] == profile["offload"]
    outputs = _outputs(runner, [GENERATE, _variation()])
    for got, want in zip(outputs, t2i_reference, strict=True):
        assert got.shape == want.shape == (SIZE, SIZE, 3)
        assert np.abs(got - want).max() <= 1, "onload = offload = CPU must not change the computation"


def test_offload_hooks_are_installed_and_variants_share_them(tiny_t2i):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    group = _runner(tiny_t2i, offload="group")
    assert _is_group_offload_enabled(group.pipe.transformer) and _is_group_offload_enabled(group.pipe.text_encoder)
    assert _is_group_offload_enabled(group.img2img_pipe.transformer), "the variant uses the same hooked modules"
    assert not _is_group_offload_enabled(group.pipe.vae), "the VAE stays resident"

    text = _runner(tiny_t2i, offload="text-encoder")
    assert _is_group_offload_enabled(text.pipe.text_encoder) and not _is_group_offload_enabled(text.pipe.transformer)

    model = _runner(tiny_t2i, offload="model")
    assert model.pipe._all_hooks, "model CPU offload is on"
    variant = model.img2img_pipe
    assert variant._all_hooks and variant._offload_device == model.pipe._offload_device
    model.run(_variation())
    model.run(GENERATE)  # the main pipeline still runs after the variant re-hooked the shared modules


def _dtypes(runner: PipelineRunner) -> dict[str, set[torch.dtype]]:
    modules = {name: getattr(runner.pipe, name) for name in ("transformer", "text_encoder", "vae")}
    return {f"{name}.{kind}": {t.dtype for t in getattr(module, kind)()} for name, module in modules.items() for kind in ("parameters", "buffers")}  # fmt: skip


@pytest.mark.parametrize("profile", [{}, {"weights_dtype": "fp8"}, {"quantize": "fp8"}], ids=["plain", "fp8-stored", "fp8"])
def test_variants_run_a_bf16_model_as_it_is(tiny_t2i, tiny_edit, profile):
    """The variation (img2img) and masked-edit (inpaint) pipelines share the model's modules without casting them:
    built by diffusers' ``from_pipe``, the first variation of a bf16 model turned it into float32 (twice its memory on
    a GPU; FP8 weights cast back), and the generations after it failed on mixed dtypes."""
    image, mask = _source_image(1), np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    edit = Job(mode="edit", prompt="make it blue", seeds=[2], width=SIZE, height=SIZE, num_inference_steps=2, images=[image])
    inpaint = Job(mode="inpaint", prompt="a hole", seeds=[2], num_inference_steps=2, images=[image], mask=mask)
    for folder, jobs in ((tiny_t2i, [_variation(), GENERATE]), (tiny_edit, [inpaint, edit])):
        spec = resolve_model(str(folder), "tiny")
        runner = PipelineRunner(replace(spec, profile=RunProfile(**profile)), device="cpu", dtype="bfloat16")
        before = _dtypes(runner)
        assert torch.bfloat16 in before["transformer.parameters"]
        for job in jobs:
            assert runner.run(job)[0].size == (SIZE, SIZE)
        assert _dtypes(runner) == before


def test_fp8_storage_is_float8_and_close(tiny_t2i, t2i_reference):
    runner = _runner(tiny_t2i, weights_dtype="fp8")
    transformer, text_encoder = _fp8_layers(runner.pipe.transformer), _fp8_layers(runner.pipe.text_encoder)
    assert transformer["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn
    assert transformer["transformer_blocks.0.img_mlp.net.2.weight"] == torch.float8_e4m3fn
    assert transformer["norm_out.linear.weight"] == torch.float32, "norms stay in the run dtype"
    assert text_encoder["model.language_model.layers.0.mlp.gate_proj.weight"] == torch.float8_e4m3fn
    assert text_encoder["model.language_model.embed_tokens.weight"] == torch.float32, "token embeddings stay in the run dtype"
    assert {p.dtype for p in runner.pipe.vae.parameters()} == {torch.float32}, "the VAE is not stored in FP8"
    assert runner.pipe.transformer.dtype == torch.float32, "diffusers reports the compute dtype"
    assert runner.memory.fp8_components == ("transformer", "text_encoder")
    outputs = _outputs(runner, [GENERATE, _variation()])
    for got, want in zip(outputs, t2i_reference, strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 6, "FP8 storage changes pixels only a little"
    assert np.abs(outputs[0] - t2i_reference[0]).max() > 0, "the weights really were rounded to FP8"


def test_fp8_with_group_offload(tiny_t2i, t2i_reference):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    runner = _runner(tiny_t2i, weights_dtype="fp8", offload="group")
    assert _is_group_offload_enabled(runner.pipe.transformer)
    assert _fp8_layers(runner.pipe.transformer)["transformer_blocks.1.attn.to_k.weight"] == torch.float8_e4m3fn
    got = _outputs(runner, [GENERATE])[0]
    assert np.abs(got - t2i_reference[0]).mean() < 6


@pytest.mark.parametrize(
    "profile", [{"offload": "model"}, {"offload": "group", "weights_dtype": "fp8"}], ids=["model", "group-fp8"]
)
def test_edits_under_memory_modes(tiny_edit, profile):
    image, mask = _source_image(1), np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    jobs = [
        Job(mode="edit", prompt="make it blue", seeds=[2], width=SIZE, height=SIZE, num_inference_steps=2, images=[image]),
        Job(mode="inpaint", prompt="a hole", seeds=[2], num_inference_steps=2, images=[image], mask=mask),
    ]
    want = _outputs(_runner(tiny_edit), jobs)
    got = _outputs(_runner(tiny_edit, **profile), jobs)
    tolerance = 6 if profile.get("weights_dtype") == "fp8" else 1
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.abs(g - w).mean() <= tolerance
    assert np.array_equal(got[1][mask == 0], image[mask == 0]), "the masked edit keeps the unmasked pixels"


def test_placement_per_mode():
    mode = MemoryMode(device="cuda:1", offload="text-encoder")
    assert [mode.load_device(c) for c in ("transformer", "text_encoder", "vae")] == ["cuda:1", "cpu", "cuda:1"]
    assert MemoryMode(device="cuda", offload="group").load_device("vae") == "cuda"
    assert MemoryMode(device="cuda", offload="group").load_device("transformer") == "cpu"
    assert all(MemoryMode(device="cuda", offload=o).load_device("transformer") == "cpu" for o in ("model", "sequential"))
    assert set(OFFLOADED) == {"none", "text-encoder", "group", "model", "sequential"}


def test_invalid_combinations_name_the_model():
    with pytest.raises(ProfileError, match="model qi: weights_dtype=fp8 .* and quantize=fp8 .* choose one"):
        check_mode("qi", "fp8", "none", "fp8", "cuda")
    with pytest.raises(ProfileError, match="model qi: weights_dtype=fp8 does not combine with offload=sequential"):
        check_mode("qi", "fp8", "sequential", "none", "cuda")
    with pytest.raises(ProfileError, match="model qi: quantize=fp8 does not combine with offload=sequential"):
        check_mode("qi", "auto", "sequential", "fp8", "cuda")
    check_mode("qi", "auto", "group", "fp8", "cuda")
    with pytest.raises(ProfileError, match="model qi: offload=sequential needs a CUDA device .*cpu"):
        check_mode("qi", "auto", "sequential", "none", "cpu")
    with pytest.raises(ProfileError, match="model qi: offload=group supports CUDA devices and the CPU, not mps"):
        check_mode("qi", "auto", "group", "none", "mps")
    check_mode("qi", "fp8", "group", "none", "cpu")  # allowed on CPU, where it runs as a test of the hooks


def test_start_up_check_refuses_before_loading(tiny_t2i):
    spec = replace(resolve_model(str(tiny_t2i), "qi"), profile=RunProfile(offload="sequential"))
    with pytest.raises(ProfileError, match="model qi: offload=sequential needs a CUDA device"):
        check_memory_modes([spec], "cpu")
    check_memory_modes([spec], "cuda:0")


def test_cli_exits_2_with_the_message(tiny_t2i):
    from typer.testing import CliRunner

    from qwen_image_server.cli import app

    result = CliRunner().invoke(
        app, ["serve", "--model", f"qi={tiny_t2i}", "--device", "cpu", "--offload", "sequential@qi", "--port", "0"]
    )
    assert result.exit_code == 2
    assert "model qi: offload=sequential needs a CUDA device" in result.output


def test_worker_reports_its_memory_mode(tiny_t2i):
    import multiprocessing
    import threading

    from qwen_image_server.engine.worker import Ready, Stop, worker_main

    spec = replace(resolve_model(str(tiny_t2i), "qi"), profile=RunProfile(offload="group", weights_dtype="fp8"))
    parent, child = multiprocessing.Pipe()
    thread = threading.Thread(target=worker_main, args=(spec, "cpu", "auto", 1, child, "w0"), daemon=True)
    thread.start()
    ready = parent.recv()
    parent.send(Stop())
    thread.join(timeout=60)
    assert isinstance(ready, Ready), ready
    info = ready.info
    assert info["device"] == "cpu"
    memory = info["memory"]
    assert (memory["offload"], memory["weights_dtype"]) == ("group", "fp8")
    assert memory["placement"] == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}
    assert memory["fp8_components"] == ["transformer", "text_encoder"]
    assert "cuda_allocated_gib" not in memory


def test_batched_cfg_streams_the_offloaded_transformer_once_per_step(tiny_t2i, monkeypatch):
    """Under group offload every transformer call moves each block group onto the device: true CFG's two calls a
    step move the transformer twice, one batched call (``--cfg-batch on``) once, with the same image."""
    from diffusers.hooks.group_offloading import ModuleGroup

    onloads: list[ModuleGroup] = []
    original = ModuleGroup.onload_

    def counting(group):
        onloads.append(group)
        return original(group)

    monkeypatch.setattr(ModuleGroup, "onload_", counting)
    moved, images = {}, {}
    for mode in ("off", "on"):
        runner = _runner(tiny_t2i, weights_dtype="fp8", offload="group", cfg_batch=mode)
        blocks = {id(g) for m in runner.pipe.transformer.transformer_blocks.modules() if (g := _group_of(m)) is not None}
        assert blocks, "the transformer's blocks are offloaded in groups"
        onloads.clear()
        images[mode] = _outputs(runner, [GENERATE])[0]
        moved[mode] = sum(id(group) in blocks for group in onloads)
    assert GENERATE.true_cfg_scale > 1 and GENERATE.negative_prompt, "the job runs true CFG"
    steps = GENERATE.num_inference_steps
    assert moved["off"] == 2 * moved["on"] == 2 * steps * len(blocks), moved
    assert np.abs(images["on"] - images["off"]).max() <= 1


def _group_of(module: torch.nn.Module):
    """The group offload ``ModuleGroup`` whose hook sits on ``module``, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("group_offloading") if registry is not None else None
    return getattr(hook, "group", None)


def test_memory_bench_without_cuda_says_so_and_exits_0(tiny_t2i):
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "memory_modes.py"
    command = [sys.executable, "-X", "importtime", str(bench), str(tiny_t2i)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stdout and "nothing was run" in done.stdout
    imported = imported_modules(done.stderr)
    assert "qwen_image_server.models.machine" in imported and "torch" not in imported  # no driver: torch not needed


def _memory_bench():
    """``bench/memory_modes.py`` as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "memory_modes.py"
    module_spec = importlib.util.spec_from_file_location("memory_modes", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    return bench


class _BenchRunner:
    """What ``bench/memory_modes.py``'s ``run_one`` uses of a ``PipelineRunner``: loads nothing, runs nothing."""

    last_stats: dict = {}

    def __init__(self, spec, device, warm):
        pass

    def run(self, job):
        pass


def _stub_cuda(monkeypatch, **overrides) -> None:
    """``torch.cuda``'s calls that ``run_one`` makes, stubbed for an 80 GiB card with nothing on it; ``overrides``
    replaces some of them."""
    from types import SimpleNamespace

    cuda = {
        "get_device_properties": lambda index: SimpleNamespace(total_memory=80 * 1024**3),
        "mem_get_info": lambda index=None: (80 * 1024**3, 80 * 1024**3),
        "memory_reserved": lambda index=None: 0,
        "set_per_process_memory_fraction": lambda fraction, index: None,
        "get_device_name": lambda index: "stub",
        "memory_allocated": lambda index: 0,
        "max_memory_allocated": lambda index: 0,
        "max_memory_reserved": lambda index: 0,
        "synchronize": lambda: None,
        "reset_peak_memory_stats": lambda index: None,
        "memory_stats": lambda index: {"allocated_bytes.all.peak": 0, "reserved_bytes.all.peak": 0},
        **overrides,
    }
    for name, stub in cuda.items():
        monkeypatch.setattr(torch.cuda, name, stub)


def _partial_lines(stdout: str) -> list[dict]:
    import json

    return [json.loads(line.removeprefix("PARTIAL ")) for line in stdout.splitlines() if line.startswith("PARTIAL ")]


def test_memory_bench_table_marks_modes_that_do_not_fit():

    bench = _memory_bench()
    rows = [
        {
            "mode": "none",
            "card": "H100 80GB",
            "s_8_steps": 1.4,
            "s_50_steps": 8.0,
            "peak_gib": 58.0,
            "peak_reserved_gib": 60.1,
            "load_s": 30.0,
        },
        {"mode": "none", "card": "RTX 4090 24GB", "oom": "CUDA out of memory"},
    ]
    lines = bench.table(rows, [8, 50]).splitlines()
    assert lines[0].startswith("| mode | card | s/image (8 steps) | s/image (50 steps) | peak GiB")
    assert lines[2] == "| none | H100 80GB | 1.4 | 8.0 | 58.0 | 60.1 | 30.0 |"
    assert lines[3] == "| none | RTX 4090 24GB | oom | oom | oom | oom | oom |"
    assert bench.pairs("none@80, fp8@48,group+fp8@24") == [("none", 80), ("fp8", 48), ("group+fp8", 24)]
    assert bench.pairs("fp8@big") == [("fp8", -1)]  # then refused as an unknown card


def test_every_mode_of_the_memory_bench_is_a_profile_the_server_takes(tiny_t2i):
    """Each mode's settings, given as the server's flags, pass its start checks on a GPU device (a mode the server
    refused would only show as an error in a GPU run)."""
    from qwen_image_server.config import Settings
    from qwen_image_server.models.configured import resolve_configured

    for mode, settings in _memory_bench().MODES.items():
        flags = {key: [str(value)] for key, value in settings.items()}
        (spec,) = resolve_configured(Settings(models=[f"tiny={tiny_t2i}"], **flags))
        check_memory_modes([spec], "cuda:0")
        assert {key: getattr(spec.profile, key) for key in settings} == settings, mode


def test_memory_bench_times_each_image_with_a_prompt_of_its_own(monkeypatch):
    """The runner keeps the embeddings of prompts it has seen: a timed image with the warm-up's prompt would leave out
    the text encoder's pass, which is what text-encoder and group offload make slow. (CUDA's calls are stubbed.)"""
    from qwen_image_server.models import runner as runner_module

    bench = _memory_bench()
    prompts = []

    class Runner(_BenchRunner):
        def run(self, job):
            prompts.append(job.prompt)

    monkeypatch.setattr(runner_module, "PipelineRunner", Runner)
    _stub_cuda(monkeypatch)
    out = bench.run_one("random:Qwen/Qwen-Image", "none", 80, [8, 50], 1024)
    assert "s_8_steps" in out and "s_50_steps" in out
    assert len(prompts) == 3 and len(set(prompts)) == 3  # the warm-up's and each timed image's
    assert len({len(p) for p in prompts}) == 1


def test_memory_bench_writes_each_row_once_measured(monkeypatch, tmp_path):
    """A run stopped midway (gpu-check.sh's budget) keeps the rows it measured: each lands in ``--json`` before the
    next mode starts. (The GPU and each mode's process are stubbed.)"""
    import json

    bench = _memory_bench()
    out = tmp_path / "memory.jsonl"
    out.write_text('{"mode": "from an earlier run"}\n')
    seen_before_each_run = []

    def run_child(cmd, timeout, stopped):
        seen_before_each_run.append([json.loads(line)["mode"] for line in out.read_text().splitlines()])
        mode = cmd[cmd.index("--one") + 1]
        return {"mode": mode, "s_8_steps": 1.0, "peak_gib": 1.0, "peak_reserved_gib": 1.0, "load_s": 1.0, "status": "ok"}

    monkeypatch.setattr(bench, "visible_gpu_name", lambda: "stub")
    monkeypatch.setattr(bench, "run_child", run_child)
    assert (
        bench.main(["random:Qwen/Qwen-Image", "--pairs", "none@80,fp8@48,group+fp8@24", "--steps", "8", "--json", str(out)]) == 0
    )
    assert seen_before_each_run == [[], ["none"], ["none", "fp8"]]
    assert [json.loads(line)["mode"] for line in out.read_text().splitlines()] == ["none", "fp8", "group+fp8"]


def test_memory_bench_rows_carry_the_package_versions_and_the_date(monkeypatch, tmp_path):
    """A row is a benchmark record on its own: the versions of torch, diffusers and transformers and when (UTC) it was
    measured, also for a pair that did not finish. (The GPU and each mode's process are stubbed.)"""
    import datetime
    import importlib.metadata
    import json

    bench = _memory_bench()
    out = tmp_path / "memory.jsonl"
    measured = {"status": "ok", "s_8_steps": 1.0, "peak_gib": 1.0, "peak_reserved_gib": 1.0, "load_s": 1.0}
    results = iter([measured, {"status": "error", "error": "exited with -9"}])
    monkeypatch.setattr(bench, "visible_gpu_name", lambda: "stub")
    monkeypatch.setattr(bench, "run_child", lambda cmd, timeout, stopped: next(results))
    assert bench.main(["random:Qwen/Qwen-Image", "--pairs", "none@80,fp8@48", "--steps", "8", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["mode"], row["status"]) for row in rows] == [("none", "ok"), ("fp8", "error")]
    for row in rows:
        assert row["versions"] == {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")}
        date = datetime.datetime.fromisoformat(row["date"])
        assert date.utcoffset() == datetime.timedelta(0)
        assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(hours=1)


def test_memory_bench_records_the_load_peak_and_each_image_s_transformer_calls(monkeypatch, capsys):
    """FP8 storage has the bf16 weights on the GPU before it converts them: the load's peak (read before any reset of
    the peak counters) is what decides whether a card can load the model, not what is allocated once loaded. Each
    timed image's row has the runner's counters (``last_stats``): the transformer calls it made. (CUDA's calls and the
    runner are stubbed: the load peaks at 30 GiB and leaves 20.)"""
    from qwen_image_server.models import runner as runner_module

    bench = _memory_bench()
    gib = 1024**3
    memory = {"allocated": 0, "peak": 0}

    class Runner:
        def __init__(self, spec, device, warm):
            memory.update(allocated=20 * gib, peak=30 * gib)  # bf16 weights, then converted to FP8
            self.last_stats: dict = {}

        def run(self, job):
            calls = 2 * job.num_inference_steps  # true CFG: two calls per step
            self.last_stats = {"transformer_calls": calls, "cached_calls": 0, "prompt_encodings": 1, "prompt_cache_hits": 0}

    monkeypatch.setattr(runner_module, "PipelineRunner", Runner)
    _stub_cuda(
        monkeypatch,
        memory_allocated=lambda index: memory["allocated"],
        max_memory_allocated=lambda index: memory["peak"],
        max_memory_reserved=lambda index: memory["peak"] + gib,
        reset_peak_memory_stats=lambda index: memory.update(peak=memory["allocated"]),
    )
    out = bench.run_one("random:Qwen/Qwen-Image", "fp8", 48, [8, 50], 1024)
    assert (out["after_load_gib"], out["load_peak_gib"], out["load_peak_reserved_gib"]) == (20.0, 30.0, 31.0)
    assert out["stats_8_steps"]["transformer_calls"] == 16 and out["stats_50_steps"]["transformer_calls"] == 100
    assert out["stats_8_steps"]["prompt_encodings"] == 1
    # the figures so far go to the parent as they come: once loaded, and after each image
    loaded = [line for line in _partial_lines(capsys.readouterr().out) if "load_s" in line]
    assert loaded[0]["load_peak_gib"] == 30.0 and "s_8_steps" not in loaded[0]
    assert loaded[-1]["stats_50_steps"]["transformer_calls"] == 100


def test_memory_bench_caps_the_emulated_card_less_the_cuda_context(monkeypatch):
    """``set_per_process_memory_fraction`` caps only torch's allocator: the CUDA context lies outside it, so it is
    measured once CUDA is up and before the cap (``mem_get_info``'s total minus free minus torch's reserved memory)
    and taken off the card's size. (CUDA's calls are stubbed: the context takes 1 GiB, torch has reserved 0.5.)"""
    from qwen_image_server.models import runner as runner_module

    bench = _memory_bench()
    gib = 1024**3
    events: list = []

    Runner = _BenchRunner

    def mem_get_info(index=None):
        events.append("mem_get_info")
        return 80 * gib - int(1.5 * gib), 80 * gib

    monkeypatch.setattr(runner_module, "PipelineRunner", Runner)
    _stub_cuda(
        monkeypatch,
        mem_get_info=mem_get_info,
        memory_reserved=lambda index=None: gib // 2,
        set_per_process_memory_fraction=lambda fraction, index: events.append(("cap", fraction)),
    )
    out = bench.run_one("random:Qwen/Qwen-Image", "group+fp8", 24, [8], 1024)
    mib = bench.CARDS[24][1]
    fraction = (mib * 1024**2 - gib) / (80 * gib)
    assert events[0] == "mem_get_info" and events[1] == ("cap", fraction)
    assert out["context_gib"] == 1.0 and out["memory_fraction"] == round(fraction, 4)
    assert out["context_end_gib"] == 1.0  # measured again after the timed images


def test_memory_bench_pair_process_reports_what_it_had_when_it_fails(monkeypatch, capsys):
    """The pair's process (``--one``) prints its figures as it goes, so that a pair that fails after loading still
    leaves its load figures, its error (``RESULT``) and its traceback on stderr (the stage's log); stopped with
    SIGTERM, it writes its Python stack there too (faulthandler). (CUDA's calls and the runner are stubbed.)"""
    import json
    import signal

    from qwen_image_server.models import runner as runner_module

    bench = _memory_bench()
    registered = []

    class Runner(_BenchRunner):
        def run(self, job):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner_module, "PipelineRunner", Runner)
    monkeypatch.setattr(bench.faulthandler, "register", lambda signum, **kwargs: registered.append((signum, kwargs)))
    _stub_cuda(monkeypatch, max_memory_allocated=lambda index: 30 * 1024**3)
    assert bench.main(["random:Qwen/Qwen-Image", "--one", "fp8", "48", "--steps", "8"]) == 0
    captured = capsys.readouterr()
    assert _partial_lines(captured.out)[-1]["load_peak_gib"] == 30.0
    (result,) = [json.loads(line[7:]) for line in captured.out.splitlines() if line.startswith("RESULT ")]
    assert result == {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert "Traceback" in captured.err and "illegal memory access" in captured.err
    assert registered == [(signal.SIGTERM, {"all_threads": True, "chain": True})]


#: Stands in for a pair's process: ``none`` finishes; any other mode loads and then runs until it is ended.
_PAIR_PROCESS = """
import json, os, sys, time
mode, pids = sys.argv[1], sys.argv[2]
print("PARTIAL " + json.dumps({"mode": mode, "context_gib": 0.6}), flush=True)
print(f"{mode}: loading the model", file=sys.stderr, flush=True)
if mode == "none":
    print("RESULT " + json.dumps({"mode": mode, "load_s": 1.0, "s_8_steps": 1.0, "peak_gib": 1.0, "peak_reserved_gib": 1.0}))
    sys.exit(0)
print("PARTIAL " + json.dumps({"mode": mode, "context_gib": 0.6, "load_s": 2.0, "load_peak_gib": 40.0}), flush=True)
print(f"{mode}: warming up", file=sys.stderr, flush=True)
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(600)
"""

#: Runs the benchmark with the GPU's name and each pair's command stubbed.
_BENCH_RUN = """
import importlib.util, sys
bench_path, pair_process, pids, out = sys.argv[1:5]
sys.path.insert(0, str(__import__("pathlib").Path(bench_path).parent))
spec = importlib.util.spec_from_file_location("memory_modes", bench_path)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
bench.visible_gpu_name = lambda: "stub GPU"
bench.child_command = lambda args, mode, card: [sys.executable, pair_process, mode, pids]
sys.exit(bench.main(["stub-model", "--pairs", "none@80,fp8@48,group+fp8@24", "--steps", "8", "--json", out]))
"""


@pytest.mark.parametrize("to", ["benchmark", "process group"])
def test_memory_bench_stopped_by_sigterm_writes_the_cut_off_pair_and_ends_its_process(tmp_path, to):
    """gpu-check.sh's budget ends the stage with SIGTERM (to its whole process group; SIGKILL 15 s later): the pair
    that was running is recorded as stopped with the figures it had sent (its load), its stderr has gone to the
    stage's log all along, its process is ended, and no further pair starts. (Each pair's process is a stand-in.)"""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    bench_path = Path(__file__).resolve().parents[2] / "bench" / "memory_modes.py"
    (tmp_path / "pair.py").write_text(_PAIR_PROCESS)
    (tmp_path / "run.py").write_text(_BENCH_RUN)
    pids, out = tmp_path / "pids", tmp_path / "memory.jsonl"
    command = [sys.executable, str(tmp_path / "run.py"), str(bench_path), str(tmp_path / "pair.py"), str(pids), str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids.exists(), "the second pair's process did not start"
        if to == "benchmark":
            run.send_signal(signal.SIGTERM)
        else:
            os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=30)
        (pid,) = [int(line) for line in pids.read_text().split()]
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the run, the stand-in included
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, stdout + stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["mode"], row["status"]) for row in rows] == [("none", "ok"), ("fp8", "stopped")]
    assert (rows[1]["load_s"], rows[1]["load_peak_gib"], rows[1]["context_gib"]) == (2.0, 40.0, 0.6)
    assert rows[1]["versions"]["torch"] and rows[1]["date"]
    assert "fp8: warming up" in stderr  # the pair's stderr reached the benchmark's
    assert "not run: group+fp8@24" in stdout and "| fp8 | L40S 48GB | stopped |" in stdout
    assert gone, "the pair's process was ended"


@pytest.mark.parametrize(("offload", "kind"), [("group", "generate"), ("group", "edit"), ("text-encoder", "edit")])
def test_group_offload_has_every_weight_on_the_device_when_it_is_used(tiny_t2i, tiny_edit, monkeypatch, offload, kind):
    """Group offload with the CUDA options (side stream, prefetching), emulated on the CPU: no operation uses a weight
    whose group is off the device, on the first call (traced) or later ones (prefetched). The text encoder's token
    embeddings run before its language model's own forward (Qwen2.5-VL embeds the prompt first): in the language
    model's group they were still on the CPU when used, which on a GPU fails every prompt encoding."""
    from offload_emulation import OffloadEmulation

    emulation = OffloadEmulation(monkeypatch)
    runner = _runner(tiny_edit if kind == "edit" else tiny_t2i, offload=offload)
    for index in range(3):  # new prompts: each is encoded (the prompt cache would skip the text encoder)
        job = replace(GENERATE, prompt=f"a red cube, take {index}")
        if kind == "edit":
            job = replace(job, mode="edit", images=[_source_image(index)])
        with emulation.watching():
            (image,) = runner.run(job)
        assert image.size == (SIZE, SIZE)
        assert emulation.used_offloaded == [], f"call {index}: {sorted(set(emulation.used_offloaded))}"
        assert emulation.left_on_device() == []
    assert runner.last_stats["prompt_encodings"] >= 1
    # The token embeddings stay on the device, in no group: as a group of their own they were moved without pinned
    # memory or the side stream, twice per prompt encoding (by their own hook, then by the language model's prefetch)
    embeddings = runner.pipe.text_encoder.model.language_model.embed_tokens
    assert emulation.resident == [embeddings] and id(embeddings.weight) not in emulation.owner


@pytest.mark.parametrize(
    "profile", [{"offload": "group"}, {"offload": "text-encoder", "quantize": "int4"}], ids=["group", "te-int4"]
)
def test_group_offload_pins_each_weight_once_and_keeps_no_unpinned_copy(tiny_t2i, monkeypatch, profile):
    """Group offload on CUDA pins a copy of every weight of the blocks it streams (what is outside them moves whole,
    unpinned), and diffusers made all its copies before the first call freed any original: while loading, the host held each streamed weight twice (for Qwen-Image's FP8
    setting 25 GiB of weights beside 43 GiB of pinned copies). The server pins each weight in place first, one at a
    time, and diffusers keeps that pinned tensor as its copy. Group offload with CUDA's options, emulated."""
    from offload_emulation import OffloadEmulation

    emulation = OffloadEmulation(monkeypatch)
    runner = _runner(tiny_t2i, **profile)
    groups = {id(group): group for group in emulation.owner.values() if group.stream is not None}  # streamed blocks
    grouped = [t for g in groups.values() for m in g.modules for t in (*m.parameters(), *m.buffers())]
    assert grouped and emulation.pinned_copies == len({id(t) for t in grouped})  # one pinned copy a weight
    # each weight's unpinned memory was gone before the next copy was made (diffusers alone: all of it until the end)
    assert emulation.unpinned_beside_copies == 0
    for tensor in grouped:  # the module's weight is its pinned copy
        copy = next(g for g in groups.values() if tensor in g.cpu_param_dict).cpu_param_dict[tensor]
        assert tensor.untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()
    assert runner.run(GENERATE)[0].size == (SIZE, SIZE)
    assert emulation.pinned_copies == len({id(t) for t in grouped}) and emulation.left_on_device() == []


def test_fp8_layers_made_after_group_offload_are_offloaded_with_their_block(tiny_t2i, tiny_lora, monkeypatch):
    """With a LoRA, ``--quantize fp8`` converts the linear layers after the adapters are in, so after group offload's
    hooks: the new layers' weights must join their block's group (with CUDA's options a group's copy found no
    pinned copy of them: KeyError on the first transformer call)."""
    from offload_emulation import OffloadEmulation
    from qwen_image_server.config import Settings
    from qwen_image_server.models import fp8, offload
    from qwen_image_server.models.configured import resolve_configured

    emulation = OffloadEmulation(monkeypatch)
    released: list[bool] = []
    monkeypatch.setattr(offload, "release_host_cache", lambda: released.append(True))
    settings = Settings(models=[f"tiny={tiny_t2i}"], loras=[f"style={tiny_lora}"], quantize="fp8", offload="group")
    (spec,) = resolve_configured(settings)
    runner = PipelineRunner(spec, device="cpu")
    assert any(isinstance(m, fp8.FP8Linear) for m in runner.pipe.transformer.transformer_blocks.modules())
    assert released, "the pinned copies of the layers the FP8 ones replaced went back to the system"
    for lora in (None, "style"):
        with emulation.watching():
            (image,) = runner.run(replace(GENERATE, lora=lora))
        assert image.size == (SIZE, SIZE)
        assert emulation.used_offloaded == [], sorted(set(emulation.used_offloaded))
        assert emulation.left_on_device() == []  # FP8 layers' weights are buffers: they go back to the CPU too


def test_layers_replaced_under_group_offload_are_pinned_one_at_a_time_too(tiny_t2i, monkeypatch):
    """Layers replaced after group offload's groups are made (FP8 or 4-bit layers made after a LoRA's adapters) join
    their blocks' groups when diffusers makes them again, and it pinned every new weight before it freed any: the
    new weights are pinned one at a time first, as at the start. Group offload with CUDA's options, emulated."""
    from offload_emulation import OffloadEmulation
    from qwen_image_server.models import fp8

    emulation = OffloadEmulation(monkeypatch)
    runner = _runner(tiny_t2i, offload="group")
    emulation.unpinned_beside_copies, before = 0, emulation.pinned_copies
    transformer = runner.pipe.transformer
    names = [name for name, _ in fp8.quantizable_linears(transformer, "cpu")]
    assert fp8.replace_layers(transformer, names, lambda linear: fp8.FP8Linear(linear, torch.float32, "dequant"), "cpu")
    assert emulation.pinned_copies - before >= 2 * len(names)  # each layer's weight and scale (and bias) pinned
    assert emulation.unpinned_beside_copies == 0
    with emulation.watching():
        assert runner.run(GENERATE)[0].size == (SIZE, SIZE)
    assert emulation.used_offloaded == [] and emulation.left_on_device() == []


def test_a_call_stopped_midway_under_model_offload_puts_the_components_back(tiny_t2i, monkeypatch):
    """diffusers offloads the last component of a model-offloaded pipeline at the end of its call: a call stopped
    midway (client gone, out of memory) never got there, and on a GPU the next call would start with the transformer
    still on it and add the text encoder. The runner does that step itself when a call fails."""
    from qwen_image_server.errors import TaskCancelled

    runner = _runner(tiny_t2i, offload="model")
    real, reset = runner.pipe.maybe_free_model_hooks, []
    monkeypatch.setattr(runner.pipe, "maybe_free_model_hooks", lambda: (reset.append(True), real())[1])
    asked = iter([False])  # running at the start, stopped at the first step's end
    with pytest.raises(TaskCancelled):
        runner.run(GENERATE, should_stop=lambda: next(asked, True))
    assert reset == [True]
    (image,) = runner.run(GENERATE)  # and the next call runs
    assert image.size == (SIZE, SIZE) and reset == [True, True]  # diffusers' own, at the end of a finished call


def test_previews_under_model_offload_leave_the_transformer_where_it_is(tiny_t2i, monkeypatch):
    """A preview decodes with the VAE in the middle of denoising: under ``--offload model`` the VAE's offload hook sent
    the transformer back to the CPU first (accelerate's ``CpuOffload.pre_forward`` offloads its previous module), and
    the next step brought it back: about 41 GB each way per preview for full-size Qwen-Image. On the CPU nothing
    moves, so what is checked is whether each decode's hook would offload the transformer."""
    runner = _runner(tiny_t2i, offload="model")
    vae = runner.pipe.vae
    transformer_hook = vae._hf_hook.prev_module_hook
    assert transformer_hook.model is runner.pipe.transformer
    events: list[str] = []
    decode = type(vae).decode

    def recording(self, *args, **kwargs):
        chained = self._hf_hook.prev_module_hook is transformer_hook
        events.append("decode, transformer offloaded first" if chained else "decode beside the transformer")
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(type(vae), "decode", recording)
    job = replace(GENERATE, num_inference_steps=4, partial_images=2)
    (image,) = runner.run(job, on_partial=lambda index, partial, preview: events.append(f"preview {partial}"))
    assert image.size == (SIZE, SIZE)
    assert events == [
        "decode beside the transformer",
        "preview 0",
        "decode beside the transformer",
        "preview 1",
        "decode, transformer offloaded first",  # the final image: denoising is over
    ]
    assert next(vae.parameters()).device.type == "cpu"
