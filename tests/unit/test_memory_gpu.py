"""Memory modes on a CUDA GPU (skipped without one): every mode runs, weights land where the mode says, loading skips host RAM."""

import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from qwen_image_server.jobs import Job
from qwen_image_server.models import fp8
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROFILES = [
    {},
    {"weights_dtype": "fp8"},
    {"offload": "text-encoder"},
    {"offload": "group"},
    {"offload": "group", "weights_dtype": "fp8"},
    {"offload": "model"},
    {"offload": "sequential"},
    {"quantize": "fp8"},
    {"quantize": "fp8", "offload": "group"},
]


def _runner(folder, **profile) -> PipelineRunner:
    return PipelineRunner(replace(resolve_model(str(folder), "tiny"), profile=RunProfile(**profile)), device="cuda")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: "-".join(p.values()) or "resident")
def test_each_mode_runs_on_cuda(tiny_t2i, profile):
    runner = _runner(tiny_t2i, **profile)
    job = Job(mode="generate", prompt="a red cube", seeds=[1], width=256, height=256, num_inference_steps=2)
    image = runner.run(job)[0]
    assert image.size == (256, 256) and np.asarray(image).std() > 0
    variation = Job(mode="variation", prompt="p", seeds=[1], width=256, height=256, num_inference_steps=2,
                    images=[np.asarray(image)], strength=0.7)  # fmt: skip
    assert runner.run(variation)[0].size == (256, 256)
    summary = runner.memory.summary()
    assert summary["cuda_allocated_gib"] >= 0 and "cuda_peak_gib" in summary
    offloaded = {"text-encoder": {"text_encoder"}, "group": {"transformer", "text_encoder"}}.get(profile.get("offload"), set())
    if profile.get("offload") in (None, "text-encoder", "group"):
        for name in ("transformer", "text_encoder", "vae"):
            module = getattr(runner.pipe, name)
            for pname, p in module.named_parameters():
                # group offload keeps the text encoder's token embeddings on the GPU (offload.TEXT_ENCODER_RESIDENT)
                resident = name not in offloaded or (name == "text_encoder" and ".embed_tokens." in f".{pname}")
                assert p.device.type == ("cuda" if resident else "cpu"), f"{name}.{pname} between calls"
            for lname, layer in module.named_modules():  # FP8 layers keep their weights in buffers (offload.py)
                if isinstance(layer, fp8.FP8Linear):
                    for bname, buffer in layer.named_buffers(recurse=False):
                        where = "cpu" if name in offloaded else "cuda"
                        assert buffer.device.type == where, f"{name}.{lname}.{bname} between calls"
    if profile.get("quantize") == "fp8":
        layers = [m for m in runner.pipe.transformer.modules() if isinstance(m, fp8.FP8Linear)]
        assert layers and all(m.weight.dtype == fp8.FP8_DTYPE for m in layers)


@pytest.fixture(scope="module")
def larger_model(tiny_t2i, tmp_path_factory):
    """A copy of the tiny model with a random transformer of about 1.4 GB in bf16, saved in 100 MB shards; and its
    bytes. Built once for the module's tests (seconds of CPU each time)."""
    from diffusers import QwenImageTransformer2DModel

    folder = tmp_path_factory.mktemp("larger") / "model"
    shutil.copytree(tiny_t2i, folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    big = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=8, attention_head_dim=128,
                                      num_attention_heads=12, joint_attention_dim=32, axes_dims_rope=(32, 48, 48)).to(torch.bfloat16)  # fmt: skip
    size = sum(p.numel() * p.element_size() for p in big.parameters())
    big.save_pretrained(folder / "transformer", max_shard_size="100MB")
    return folder, size


def test_loading_reads_weights_straight_to_the_gpu(tiny_t2i, larger_model):
    """Peak host RSS while loading grows by about one safetensors shard, not by the model.

    The tiny model (2 MB) is too small to show this against the noise of imports, so a copy
    gets a larger random transformer (~1.4 GB in bf16) saved in 100 MB shards. diffusers
    reads each shard (memory-mapped) and moves its tensors to the device: host memory then
    holds at most a shard or so at a time. Loading to the CPU first would grow RSS by the
    whole transformer. This proves the device-map path on this model; on the full-size
    model the same bound is one shard (~5 GB) instead of 54 GB.
    """
    folder, size = larger_model
    script = textwrap.dedent(f"""
        import json, resource, sys, torch
        from qwen_image_server.models.runner import PipelineRunner
        from qwen_image_server.models.spec import resolve_model
        PipelineRunner(resolve_model({str(tiny_t2i)!r}), device="cuda", dtype="bfloat16")  # imports, CUDA context, kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        runner = PipelineRunner(resolve_model({str(folder)!r}), device="cuda", dtype="bfloat16", warm=False)  # the load alone
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        devices = sorted({{p.device.type for p in runner.pipe.transformer.parameters()}})
        print("RESULT " + json.dumps({{"grew": after - before, "devices": devices}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["devices"] == ["cuda"]
    assert result["grew"] < 0.5 * size, f"host RSS grew by {result['grew'] / 2**20:.0f} MiB while loading {size / 2**20:.0f} MiB"


def test_a_random_component_kept_on_the_cpu_is_filled_on_the_gpu_with_the_resident_weights():
    """``random:`` components that a memory mode keeps on the CPU draw their values on the worker's GPU (one CPU
    core took minutes for full-size Qwen-Image): the same weights as a resident build."""
    from qwen_image_server.models.random_arch import build_components
    from qwen_image_server.models.random_source import SMALL_OVERRIDES, parse_random_source

    arch = parse_random_source(f"random:Qwen/Qwen-Image?{SMALL_OVERRIDES}").architecture()
    resident = build_components(arch, "cuda", torch.bfloat16, seed=5)
    offloaded = build_components(arch, "cuda", torch.bfloat16, seed=5, devices={"transformer": "cpu", "text_encoder": "cpu"})
    for name in ("transformer", "text_encoder"):
        ours, theirs = resident[name].state_dict(), offloaded[name].state_dict()
        assert next(iter(theirs.values())).device.type == "cpu"
        assert all(torch.equal(ours[k].cpu(), theirs[k]) for k in ours), name


@pytest.mark.parametrize("offload", ["none", "group"])
def test_int4_layers_live_where_the_mode_keeps_the_transformer(tiny_t2i, offload):
    from qwen_image_server.models.int4 import Int4Linear

    runner = _runner(tiny_t2i, quantize="int4", offload=offload)
    job = Job(mode="generate", prompt="a red cube", seeds=[1], width=256, height=256, num_inference_steps=2)
    assert runner.run(job)[0].size == (256, 256)
    layers = [m for m in runner.pipe.transformer.modules() if isinstance(m, Int4Linear)]
    home = "cpu" if offload == "group" else "cuda"
    assert layers and {m.weight_packed.device.type for m in layers} == {home}
    if offload == "none":
        assert {p.device.type for p in runner.pipe.transformer.parameters()} == {"cuda"}
    assert runner.speed.info["quantize"]["unpacking"] == "fused"


def test_int4_never_has_the_run_dtype_transformer_on_the_gpu(larger_model):
    """The transformer is read on the CPU and each layer quantized on the GPU on its way there: the GPU's peak while
    loading stays near the 4-bit size (about 0.28 of bf16), far under the bf16 transformer."""
    folder, size = larger_model
    spec = replace(resolve_model(str(folder), "big"), profile=RunProfile(quantize="int4"))
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner = PipelineRunner(spec, device="cuda", dtype="bfloat16", warm=False)
    peak = torch.cuda.max_memory_allocated() - before
    kept = sum(b.numel() * b.element_size() for b in runner.pipe.transformer.buffers())
    assert kept < 0.35 * size and peak < 0.5 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB transformer"
