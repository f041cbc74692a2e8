"""The memory plan: estimates from safetensors headers, placement on (injected) GPUs, the refusal and the plan command."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_image_server.cli import app
from qwen_image_server.config import Settings
from qwen_image_server.models.footprint import GIB, activation_bytes, footprint, human, resident_weights
from qwen_image_server.models.machine import Gpu, HostMemory, discover_host_memory, parse_fake_gpus, parse_fake_host
from qwen_image_server.models.planner import PlanError, _slots, make_plan, place
from qwen_image_server.models.profile import LoraSpec, RunProfile
from qwen_image_server.models.spec import ModelConfigError, ModelSpec, resolve_configured
from qwen_image_server.models.weights_files import UnknownFootprint, read_folder, read_hub, read_tensors

FULL_SIZE = {"transformer": 20.4e9, "text_encoder": 8.3e9, "vae": 0.13e9}  # Qwen-Image's parameters
H100 = Gpu("cuda:0", "NVIDIA H100 80GB HBM3", int(79.1 * GIB), int(79.6 * GIB))
FLOATS = {"F32": 4, "F16": 2, "BF16": 2}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _numel(info: dict) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def _headers(folder: Path, component: str) -> dict:
    return {k: v for f in sorted((folder / component).glob("*.safetensors")) for k, v in _header(f).items()}


def _full(ident: str, kind: str = "text-to-image", counts: dict | None = FULL_SIZE, **profile) -> ModelSpec:
    """A full-size model without files: ``random:`` with parameter counts."""
    cls = {"text-to-image": "QwenImagePipeline", "edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline"}[kind]
    options = {"parameter_counts": counts} if counts else {}
    return ModelSpec(ident, f"random:Qwen/{ident}", cls, kind, options=options, profile=RunProfile(**profile))


def _small(ident: str, params: float = 1e9) -> ModelSpec:
    return _full(ident, counts={"transformer": params * 0.7, "text_encoder": params * 0.3})


def _gpus(*gpus: Gpu):
    return lambda: list(gpus)


def _gpu(index: int, gib: float) -> Gpu:
    return Gpu(f"cuda:{index}", "test GPU", int(gib * GIB), int(gib * GIB))


# --- estimates ------------------------------------------------------------------------------
@pytest.mark.parametrize("device,bytes_per_param", [("cuda", 2), ("cpu", 4)])
def test_estimate_is_the_sum_of_the_header_tensors_in_the_run_dtype(tiny_t2i, device, bytes_per_param):
    spec = resolve_configured(Settings(models=[str(tiny_t2i)]))[0]
    plan = make_plan([spec], Settings(device="auto" if device == "cuda" else "cpu"), discover=_gpus(_gpu(0, 80)))
    fp = plan.footprints[spec.id]
    for component in ("transformer", "text_encoder", "vae"):
        header = _headers(tiny_t2i, component)
        expected = sum(_numel(info) * (bytes_per_param if info["dtype"] in FLOATS else 8) for info in header.values())
        assert fp.components[component] == expected, component
    assert fp.total == fp.weights + max(fp.activations, fp.text_encoder_work) + fp.overhead
    assert plan.devices(spec.id) == (["cuda:0"] if device == "cuda" else ["cpu"])


def test_the_planner_reads_headers_only(tiny_t2i, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(tiny_t2i, cut)
    for file in cut.glob("*/*.safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        with open(file, "r+b") as f:
            f.truncate(8 + n)  # no tensor data left
        assert file.stat().st_size == 8 + n
    settings = Settings(models=[f"a={tiny_t2i}", f"b={cut}"])
    a, b = resolve_configured(settings)
    plan = make_plan([a, b], settings, discover=_gpus(_gpu(0, 80)))
    assert plan.footprints["a"].components == plan.footprints["b"].components
    assert plan.footprints["a"].total == plan.footprints["b"].total > 0


def test_hub_models_are_sized_from_the_cached_snapshot(tiny_t2i, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    shutil.copytree(tiny_t2i, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = read_hub("org/tiny", cache_dir=tmp_path)
    assert cached.components == read_folder(tiny_t2i).components
    assert "hub cache" in cached.origin


def test_hub_models_not_in_the_cache_are_sized_from_remote_headers(tiny_t2i, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    files = sorted(str(p.relative_to(tiny_t2i)) for p in tiny_t2i.rglob("*") if p.is_file())
    ranged = []

    class Api:
        def list_repo_files(self, repo, revision=None):
            return files

        def parse_safetensors_file_metadata(self, repo, path, revision=None, timeout=None):
            ranged.append(path)
            infos = {k: type("Info", (), {"dtype": v["dtype"], "shape": v["shape"]}) for k, v in _header(tiny_t2i / path).items()}
            return type("Meta", (), {"tensors": infos})

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: str(tiny_t2i / name))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    remote = read_hub("org/not-cached", cache_dir=tmp_path)
    assert remote.components == read_folder(tiny_t2i).components and remote.origin == "safetensors headers (hub)"
    assert sorted(ranged) == sorted(f for f in files if f.endswith(".safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnknownFootprint, match="offline, and the hub cache does not hold its weights"):
        read_hub("org/not-cached", cache_dir=tmp_path)


def test_random_sources_of_no_packaged_architecture_need_parameter_counts():
    with pytest.raises(UnknownFootprint, match=r"no architecture named 'Qwen/x' .* gives no parameter_counts"):
        read_tensors(_full("x", counts=None))
    fp = footprint(_full("x"), read_tensors(_full("x")), run_bytes=2, max_image_side=1024)
    assert fp.weights == pytest.approx(sum(FULL_SIZE.values()) * 2, rel=1e-6)


def test_working_memory_matches_the_measured_qwen_image_figures():
    # 4.2 GiB over the weights at 1024x1024 (4096 tokens), 7.0 GiB at 1328x1328 (6889 tokens), bf16, H100
    assert activation_bytes(4096, 0, 3072, 2) / GIB == pytest.approx(4.2, abs=0.01)
    assert activation_bytes(6889, 0, 3072, 2) / GIB == pytest.approx(7.0, abs=0.01)
    assert activation_bytes(4096, 0, 3072, 2, batch=2) == pytest.approx(2 * activation_bytes(4096, 0, 3072, 2), rel=1e-6)
    t2i = footprint(_full("t"), read_tensors(_full("t")), run_bytes=2, max_image_side=1024)
    assert (t2i.weights + t2i.activations) / GIB == pytest.approx(53.8 + 4.2, abs=0.2)
    edit = footprint(_full("e", "edit-plus"), read_tensors(_full("e")), run_bytes=2, max_image_side=1024, max_input_images=4)
    assert edit.activations > t2i.activations, "input images of edits add to the working memory"


def test_fp8_and_offload_profiles_reduce_the_estimate_as_documented(tiny_t2i):
    tensors = read_folder(tiny_t2i)
    sizes = {c: _headers(tiny_t2i, c) for c in ("transformer", "text_encoder", "vae")}

    def expected(component, one_byte):
        return sum(_numel(i) * (1 if one_byte(name, i) else 2) for name, i in sizes[component].items())

    base = resident_weights(tensors, RunProfile(), 2)
    fp8 = resident_weights(tensors, RunProfile(weights_dtype="fp8"), 2)
    assert fp8["transformer"] == expected("transformer", lambda n, i: len(i["shape"]) >= 2) < base["transformer"]
    matrices_but_embeddings = lambda n, i: len(i["shape"]) >= 2 and "embed_tokens" not in n  # noqa: E731
    assert fp8["text_encoder"] == expected("text_encoder", matrices_but_embeddings) < base["text_encoder"]
    assert fp8["vae"] == base["vae"]
    quant = resident_weights(tensors, RunProfile(quantize="fp8"), 2)
    assert quant["transformer"] == expected("transformer", lambda n, i: len(i["shape"]) == 2 and n.endswith(".weight"))
    assert quant["text_encoder"] == base["text_encoder"]
    assert resident_weights(tensors, RunProfile(offload="text-encoder"), 2) == {**base, "text_encoder": 0}
    largest = max(base, key=base.get)
    assert resident_weights(tensors, RunProfile(offload="model"), 2) == {c: (b if c == largest else 0) for c, b in base.items()}
    group = resident_weights(tensors, RunProfile(offload="group"), 2)
    blocks = {}
    for name, info in sizes["transformer"].items():
        if name.startswith("transformer_blocks."):
            key = ".".join(name.split(".")[:2])
            blocks[key] = blocks.get(key, 0) + _numel(info) * 2
    outside = sum(_numel(i) * 2 for n, i in sizes["transformer"].items() if not n.startswith("transformer_blocks."))
    assert len(blocks) == 2 and group["transformer"] == max(blocks.values()) + outside
    assert group["text_encoder"] < base["text_encoder"]
    sequential = resident_weights(tensors, RunProfile(offload="sequential"), 2)
    assert 0 < sum(sequential.values()) < sum(group.values())


# --- placement ------------------------------------------------------------------------------
def test_a_model_that_fits_goes_to_the_gpu_with_room():
    plan = make_plan([_full("qwen-image")], Settings(max_image_side=1328), discover=_gpus(_gpu(0, 24), _gpu(1, 80)))
    assert plan.devices("qwen-image") == ["cuda:1"]
    assert plan.footprints["qwen-image"].total / GIB == pytest.approx(53.7 + 7.0 + 0.5, abs=0.2)
    report = plan.gpu_report()
    assert report[1]["workers"][0]["name"] == "qwen-image#0" and report[0]["workers"] == []


def test_two_models_too_large_for_one_gpu_together_go_to_two():
    specs = [_full("qwen-image"), _full("qwen-image-edit", "edit-plus")]
    plan = make_plan(specs, Settings(max_image_side=1328), discover=_gpus(_gpu(0, 80), _gpu(1, 80)))
    assert {plan.devices("qwen-image")[0], plan.devices("qwen-image-edit")[0]} == {"cuda:0", "cuda:1"}


def test_small_models_share_a_gpu_and_a_models_workers_spread():
    specs = [_small("a"), _small("b"), _small("c")]
    plan = make_plan(specs, Settings(max_image_side=512), discover=_gpus(_gpu(0, 80)))
    assert [plan.devices(m) for m in "abc"] == [["cuda:0"]] * 3
    plan = make_plan([_small("a")], Settings(max_image_side=512, workers=2), discover=_gpus(_gpu(0, 80), _gpu(1, 80)))
    assert sorted(plan.devices("a")) == ["cuda:0", "cuda:1"]


def test_best_fit_is_tried_when_spreading_does_not_fit():
    # needs of about 40, 30 and 20 GiB on GPUs of 50 and 40: spreading puts the 40 on the 50 and strands the 20
    specs = [_small("big", 20e9), _small("m1", 15e9), _small("m2", 10e9)]
    settings = Settings(max_image_side=256, min_image_side=256)
    plan = make_plan(specs, settings, discover=_gpus(_gpu(0, 200)))
    need = {m: plan.footprints[m].total / GIB for m in ("big", "m1", "m2")}
    gpus = [_gpu(0, need["m1"] + need["m2"] + 0.1), _gpu(1, need["big"] + 0.1)]
    assert place(_slots(specs, plan.footprints, Settings(workers=1)), gpus, spread=True)[1] is not None, (
        "spreading alone fails here"
    )
    plan = make_plan(specs, settings, discover=_gpus(*gpus))
    assert plan.devices("big") == ["cuda:1"] and plan.devices("m1") == plan.devices("m2") == ["cuda:0"]


def test_fp8_modes_need_more_while_loading_than_after():
    """FP8 conversion happens on the GPU: the bf16 transformer (weights_dtype) or every bf16 weight (quantize) is
    there before it shrinks, while no working memory is in use yet."""
    from qwen_image_server.models.weights_files import ModelTensors, Tensor

    model = ModelTensors(
        {
            "transformer": (Tensor("transformer_blocks.0.img_mlp.net.2.weight", "BF16", int(20.4e9), 2),),
            "text_encoder": (Tensor("model.layers.0.mlp.down_proj.weight", "BF16", int(8.3e9), 2),),
            "vae": (Tensor("decoder.conv_in.weight", "BF16", int(0.13e9), 4),),
        }
    )
    spec = _full("a")

    def fp(**profile):
        return footprint(spec, model, run_bytes=2, max_image_side=1328, profile=RunProfile(**profile))

    lora = LoraSpec("style", "/loras/style.safetensors", "a")
    plain, stored, quantized = fp(), fp(weights_dtype="fp8"), fp(quantize="fp8")
    with_lora = fp(quantize="fp8", loras=(lora,))
    assert plain.load_extra == 0 and fp(weights_dtype="fp8", offload="group").load_extra == 0  # converted on the CPU
    # the bf16 transformer is on the device alone, converted before the text encoder loads
    assert stored.load_extra == plain.components["transformer"] + stored.overhead - stored.total
    # (the bf16 text encoder stays: its working memory, not in use while loading, covers the bf16 transformer)
    assert quantized.load_extra == max(0, plain.components["transformer"] + quantized.overhead - quantized.total) == 0
    # with a LoRA the transformer is converted once the adapters are in: everything is there in bf16 first
    assert with_lora.load_extra == plain.weights + with_lora.overhead - with_lora.total
    assert 2 * GIB < stored.load_extra < with_lora.load_extra < 20 * GIB
    assert plain.summary()["while_loading_gib"] == 0 and stored.summary()["while_loading_gib"] > 2


def test_a_gpu_keeps_room_for_one_load_at_a_time_not_one_per_worker():
    slots = [("a", 0, 30 * GIB), ("b", 0, 30 * GIB)]
    extras = {"a": 10 * GIB, "b": 12 * GIB}
    placed, failed = place(slots, [_gpu(0, 72)], extras=extras)  # 30 + 30 + the larger extra, once
    assert failed is None and [p.device for p in placed] == ["cuda:0", "cuda:0"]
    assert place(slots, [_gpu(0, 71.9)], extras=extras)[1] is not None
    assert place(slots, [_gpu(0, 60)])[1] is None, "without extras 60 GiB is enough"
    placed, failed = place(slots, [_gpu(0, 45), _gpu(1, 45)], extras=extras)  # one each: 30 + its own extra
    assert failed is None and {p.device for p in placed} == {"cuda:0", "cuda:1"}


def test_two_fp8_models_on_one_80gb_card_fit_with_their_loads_one_after_the_other():
    specs = [_full("qwen-image", weights_dtype="fp8"), _full("qwen-image-edit", "edit-plus", weights_dtype="fp8")]
    plan = make_plan(specs, Settings(max_image_side=1328), discover=_gpus(H100))
    fps = plan.footprints.values()
    steady = sum(f.total for f in fps)
    assert plan.devices("qwen-image") == plan.devices("qwen-image-edit") == ["cuda:0"]
    assert steady + max(f.load_extra for f in fps) <= H100.free < steady + sum(f.load_extra for f in fps) + 20 * GIB
    assert "more while loading" in plan.table()
    tight = Gpu("cuda:0", "tight", steady + max(f.load_extra for f in fps) - GIB, H100.total)
    with pytest.raises(PlanError, match="more while it loads"):
        make_plan(specs, Settings(max_image_side=1328), discover=_gpus(tight))


def test_an_explicit_device_list_is_kept_and_checked():
    settings = Settings(max_image_side=1328, device="cuda:1,cuda:0")
    specs = [_small("a"), _small("b")]
    plan = make_plan(specs, settings, discover=_gpus(_gpu(0, 80), _gpu(1, 80)))
    assert (plan.devices("a"), plan.devices("b")) == (["cuda:1"], ["cuda:0"])
    with pytest.raises(PlanError, match=r"model qwen-image \(worker 1 of 1\) on cuda:0") as refused:
        make_plan([_full("qwen-image")], Settings(device="cuda:0"), discover=_gpus(_gpu(0, 24), _gpu(1, 80)))
    assert "--device auto (places the workers by free memory)" in str(refused.value)
    with pytest.raises(PlanError, match=r"--device names cuda:5, which is not visible \(visible GPUs: cuda:0\)"):
        make_plan(specs, Settings(device="cuda:5"), discover=_gpus(_gpu(0, 80)))
    with pytest.raises(PlanError, match=r"--device names cuda:0, which is not visible \(visible GPUs: none\)"):
        make_plan(specs, Settings(device="cuda:0"), discover=_gpus())


def _host(gib: float, total: float | None = None):
    return lambda: HostMemory(int(gib * GIB), int((total or gib) * GIB), "test host")


def test_cpu_plans_need_no_gpu_probe_and_are_checked_against_the_host_memory(tiny_t2i):
    def no_probe():
        raise AssertionError("the GPUs were probed for a CPU plan")

    spec = resolve_configured(Settings(models=[str(tiny_t2i)]))[0]
    settings = Settings(device="cpu", workers=2, max_image_side=1024)
    plan = make_plan([spec, _full("huge")], settings, discover=no_probe, host=_host(400))
    assert plan.devices(spec.id) == plan.devices("huge") == ["cpu", "cpu"]
    huge = plan.footprints["huge"]
    assert huge.components["transformer"] == int(FULL_SIZE["transformer"]) * 4  # float32 on the CPU
    in_all = 2 * (huge.total + plan.footprints[spec.id].total)
    assert (
        f"host memory (400.0 GiB available of 400.0 GiB (test host)): {spec.id}#0, {spec.id}#1, huge#0, huge#1, " in plan.table()
    )
    assert f"{human(in_all)} in all, {human(400 * GIB - in_all)} headroom" in plan.table()
    # on the CPU nothing is offloaded: the host holds every weight whatever the profile says
    offloaded = make_plan([_full("huge", offload="model")], settings, host=_host(400)).footprints["huge"]
    assert offloaded.weights == huge.weights
    assert make_plan([spec], Settings(), discover=_gpus(), host=_host(400)).devices(spec.id) == ["cpu"], "auto without GPUs"
    with pytest.raises(ModelConfigError, match="--device cuda asked for, but no GPU is visible"):
        make_plan([spec], Settings(device="cuda"), discover=_gpus())


def test_cpu_workers_that_do_not_fit_the_host_are_refused_with_the_flags_that_fit():
    settings = Settings(device="cpu", max_image_side=1024)
    with pytest.raises(PlanError) as refused:
        make_plan([_full("qwen-image")], settings, host=_host(64, 125.5))
    fp = refused.value.plan.footprints["qwen-image"]
    message = str(refused.value)
    assert message.startswith(
        f"not enough memory on this machine for model qwen-image on the CPU: each of its workers needs {human(fp.total)}"
    )
    assert f"{human(fp.weights)} of weights (transformer {human(fp.components['transformer'])}" in message
    assert "64.0 GiB is available of 125.5 GiB (test host)" in message
    assert (
        f"qwen-image#0, {human(fp.total + fp.load_extra)} in all, short by {human(fp.total - 64 * GIB)}"
        in refused.value.plan.table()
    )
    assert "Would fit: --dtype bfloat16 (2 bytes a weight instead of float32's 4)" in message
    assert "Or serve it on a GPU" in message
    assert make_plan([_full("qwen-image")], settings.model_copy(update={"dtype": "bfloat16"}), host=_host(64)).devices(
        "qwen-image"
    ) == ["cpu"]
    # two workers where one fits: fewer workers; two models with the same files in one process: --share-components
    two = Settings(device="cpu", dtype="bfloat16", max_image_side=1024, workers=2)
    with pytest.raises(PlanError) as two_workers:
        make_plan([_full("qwen-image")], two, host=_host(80))
    assert "--weights-dtype fp8@qwen-image (the transformer's weights stored in FP8); --workers 1" in str(two_workers.value)
    assert "--dtype bfloat16" not in str(two_workers.value)  # already
    fp8 = make_plan([_full("qwen-image", weights_dtype="fp8")], two, host=_host(80))
    assert fp8.footprints["qwen-image"].components["transformer"] == int(FULL_SIZE["transformer"])  # 1 byte each
    # the default largest side (2048) takes 16.5 GiB of working memory: a smaller one is offered, and it fits
    with pytest.raises(PlanError) as wide:
        make_plan([_full("qwen-image")], Settings(device="cpu", dtype="bfloat16"), host=_host(64))
    assert "; QIS_MAX_IMAGE_SIDE=1584 (images up to 1584x1584: less working memory)" in str(wide.value)
    assert make_plan([_full("qwen-image")], Settings(device="cpu", dtype="bfloat16", max_image_side=1584), host=_host(64))
    with pytest.raises(PlanError):
        make_plan([_full("qwen-image")], Settings(device="cpu", dtype="bfloat16", max_image_side=1600), host=_host(64))
    # an unknown estimate does not block, and without the host's figures nothing is checked
    assert make_plan([_full("mystery", counts=None)], settings, host=_host(1)).devices("mystery") == ["cpu"]
    assert make_plan([_full("qwen-image")], settings, host=lambda: None).devices("qwen-image") == ["cpu"]


def test_weights_that_gpu_workers_offload_must_fit_in_the_host_memory():
    """--offload keeps weights in this machine's memory (counted from parameter counts, group offload counts as model
    offload: the transformer stays on the 48 GB card, 15.7 GiB of text encoder and VAE stay in host memory)."""
    settings, card = Settings(max_image_side=1024), _gpus(_gpu(0, 48))
    with pytest.raises(PlanError) as refused:
        make_plan([_full("qwen-image", offload="group")], settings, discover=card, host=_host(8))
    assert str(refused.value).splitlines() == [
        "not enough memory on this machine for the weights model qwen-image offloads (--offload group): each of its "
        "workers keeps 15.7 GiB in host memory (text_encoder 15.5 GiB, vae 248 MiB)",
        "The GPU workers' offloaded weights need 15.7 GiB in all (qwen-image 1 x 15.7 GiB); 8.0 GiB is available of "
        "8.0 GiB (test host).",
        "Would fit: --weights-dtype fp8@qwen-image (it would need 23.7 GiB)",
        "Or serve it on a machine with more memory: the GPUs themselves have room for the plan.",
    ]
    fp8 = make_plan([_full("qwen-image", offload="group", weights_dtype="fp8")], settings, discover=card, host=_host(8))
    assert fp8.devices("qwen-image") == ["cuda:0"] and fp8.host_planned <= 8 * GIB
    roomy = make_plan([_full("qwen-image", offload="group")], settings, discover=card, host=_host(32))
    assert roomy.table().endswith(
        "host memory (32.0 GiB available of 32.0 GiB (test host)): qwen-image#0, 15.7 GiB in all, 16.3 GiB headroom"
    )
    ready = roomy.host_report()
    assert ready is not None and (ready["planned_gib"], ready["workers"]) == (pytest.approx(15.7, abs=0.05), ["qwen-image#0"])
    # resident models put nothing there; fake GPUs are another machine's, whose memory is unknown unless given
    assert (
        make_plan(
            [_full("qwen-image")], settings.model_copy(update={"max_image_side": 512}), discover=_gpus(_gpu(0, 80)), host=_host(1)
        ).host
        is None
    )
    assert make_plan([_full("qwen-image", offload="group")], settings, discover=card).host is None


def test_cpu_entries_of_a_gpu_device_list_are_checked_against_the_host_memory():
    """--device cuda:0,cpu: the CPU worker holds the whole model in float32 (dtype auto) in this machine's memory;
    before, it was placed without any check."""
    settings = Settings(device="cuda:0,cpu", workers=2, max_image_side=1024)
    card = _gpus(_gpu(0, 80))
    with pytest.raises(PlanError) as refused:
        make_plan([_full("qwen-image")], settings, discover=card, host=_host(64))
    cpu_fp = make_plan([_full("qwen-image")], Settings(device="cpu", max_image_side=1024), host=_host(1000)).footprints
    need = cpu_fp["qwen-image"].total
    lines = str(refused.value).splitlines()
    assert lines[0].startswith(
        "not enough memory on this machine for the workers --device puts on the CPU (qwen-image#1): a worker of "
        f"qwen-image needs {human(need)} there ("
    )
    assert lines[1].startswith(
        f"This machine's workers and offloaded weights need {human(need + cpu_fp['qwen-image'].load_extra)}"
    )
    assert "(qwen-image 1 x " in lines[1] and "64.0 GiB is available of 64.0 GiB (test host)" in lines[1]
    assert lines[2] == "Would fit: --dtype bfloat16 (2 bytes a weight instead of float32's 4); --workers 1"
    assert lines[3] == "Or give --device only GPUs: `qwen-image-server plan` shows what each GPU needs."
    assert "host memory (64.0 GiB available of 64.0 GiB (test host)): qwen-image#1, " in refused.value.plan.table()
    # with room, the CPU worker is placed with its CPU figure and counted; bfloat16 halves it
    roomy = make_plan([_full("qwen-image")], settings, discover=card, host=_host(256))
    assert roomy.devices("qwen-image") == ["cuda:0", "cpu"] and roomy.host_workers == ["qwen-image#1"]
    assert [p.need for p in roomy.placements if p.device == "cpu"] == [need]
    assert "(no memory check)" not in roomy.table()
    half = make_plan([_full("qwen-image")], settings.model_copy(update={"dtype": "bfloat16"}), discover=card, host=_host(64))
    assert half.host_planned < roomy.host_planned / 1.9, "the suggestion fits"
    assert make_plan([_full("qwen-image")], settings.model_copy(update={"workers": 1}), discover=card, host=_host(64))
    # planning for another machine (fake GPUs, no host given): placed unchecked, as before
    assert "cpu: qwen-image#1 (no memory check)" in make_plan([_full("qwen-image")], settings, discover=card).table()


def _fake_root(tmp_path: Path, meminfo_gib: tuple[float, float], cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    available, total = (int(g * 1024**2) for g in meminfo_gib)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {total} kB\nMemFree: 1 kB\nMemAvailable:   {available} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / "sys/fs/cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys/fs/cgroup" / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "cgroup,files,expected",
    [
        ("0::/\n", {}, (20.0, 24.0, "MemAvailable")),  # no cgroup files: the machine's figures
        ("0::/\n", {"memory.max": "max\n", "memory.current": "1000\n"}, (20.0, 24.0, "MemAvailable")),
        # v2 limit of 8 GiB, 3 GiB used of which 1 GiB is file cache (reclaimable, active or not): 6 GiB available
        ("0::/app\n", {"app/memory.max": f"{8 * GIB}\n", "app/memory.current": f"{3 * GIB}\n",
                       "app/memory.stat": f"anon {2 * GIB}\nfile {GIB}\nactive_file {GIB // 2}\n"}, (6.0, 8.0, "cgroup")),
        # v1, mounted at the root of the hierarchy inside a container; a line that is not cgroup's is skipped
        ("garbage\n4:memory:/docker/abc\n1:cpu:/\n", {"memory/memory.limit_in_bytes": f"{4 * GIB}\n",
                                                       "memory/memory.usage_in_bytes": f"{2 * GIB}\n",
                                                       "memory/memory.stat": f"cache {GIB}\ntotal_cache {GIB}\n"}, (3.0, 4.0, "cgroup")),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n",
                          "memory/memory.usage_in_bytes": "5\n"}, (20.0, 24.0, "MemAvailable")),
    ],
)  # fmt: skip
def test_host_memory_is_the_lower_of_the_machine_and_its_memory_cgroup(tmp_path, cgroup, files, expected):
    host = discover_host_memory(_fake_root(tmp_path, (20, 24), cgroup, files))
    assert host is not None
    assert (host.available / GIB, host.total / GIB) == pytest.approx(expected[:2])
    assert expected[2] in host.source


def test_host_memory_unreadable_is_none(tmp_path):
    assert discover_host_memory(tmp_path) is None
    assert parse_fake_host("12GiB/16GiB") == HostMemory(12 * GIB, 16 * GIB, "QIS_FAKE_HOST_MEMORY")


def test_workers_per_model_are_placed_and_named_in_the_refusal():
    gpus = _gpus(*(_gpu(i, 80) for i in range(4)))
    specs = [_full("qwen-image"), _full("qwen-image-edit", "edit-plus")]
    plan = make_plan(specs, Settings(max_image_side=1024, model_workers=["3@qwen-image"]), discover=gpus)
    # one full-size model per card: the edit model (the largest worker) first, then the three others
    assert (plan.devices("qwen-image"), plan.devices("qwen-image-edit")) == (["cuda:1", "cuda:2", "cuda:3"], ["cuda:0"])
    # five workers on four cards: the refusal counts the model's own workers and suggests its own smaller count
    with pytest.raises(PlanError) as refused:
        make_plan(specs, Settings(max_image_side=1024, model_workers=["4@qwen-image"]), discover=gpus)
    message = str(refused.value)
    assert message.startswith("not enough GPU memory for model qwen-image (worker 4 of 4): each worker needs 58.4 GiB")
    assert message.endswith(
        "; --workers 3@qwen-image\nOr serve qwen-image on another GPU with at least 58.4 GiB free (the most free here: 80.0 GiB)."
    )
    cpu = make_plan(specs, Settings(device="cpu", model_workers=["2@qwen-image-edit"], dtype="bfloat16"), host=_host(1000))
    assert (len(cpu.devices("qwen-image")), len(cpu.devices("qwen-image-edit"))) == (1, 2)


def test_workers_per_model_must_name_served_models_and_match_under_share_components(tiny_t2i, tiny_edit):
    entries = [f"t2i={tiny_t2i}", f"edit={tiny_edit}"]
    with pytest.raises(ModelConfigError, match=r"--workers names models that are not served: nope \(served: t2i, edit\)"):
        resolve_configured(Settings(models=entries, model_workers=["2@nope"]))
    with pytest.raises(ModelConfigError, match=r"every model needs the same number of workers \(here: t2i 2, edit 1\)"):
        resolve_configured(Settings(models=entries, workers=2, model_workers=["1@edit"], share_components=True))
    same = resolve_configured(Settings(models=entries, workers=1, model_workers=["2@edit", "2@t2i"], share_components=True))
    assert [spec.id for spec in same] == ["t2i", "edit"]


def test_an_unknown_estimate_does_not_block():
    plan = make_plan([_full("mystery", counts=None)], Settings(), discover=_gpus(_gpu(0, 1)))
    assert plan.devices("mystery") == ["cuda:0"]
    assert plan.model_summary("mystery")["total_gib"] is None and "parameter_counts" in plan.model_summary("mystery")["unknown"]
    assert "memory estimate unknown" in plan.table()


def test_the_refusal_names_the_model_the_numbers_and_flags_that_fit():
    specs = [_full("qwen-image"), _full("qwen-image-edit", "edit-plus")]
    settings = Settings(max_image_side=1328)
    with pytest.raises(PlanError) as refused:
        make_plan(specs, settings, discover=_gpus(H100))
    text = str(refused.value)
    assert text.startswith("not enough GPU memory for model qwen-image (worker 1 of 1): each worker needs 61.2 GiB")
    assert "53.7 GiB of weights (transformer 38.0 GiB, text_encoder 15.5 GiB, vae 248 MiB)" in text
    assert "7.0 GiB working memory at 1328x1328" in text
    assert "cuda:0 NVIDIA H100 80GB HBM3: 79.1 GiB free of 79.6 GiB, planned there: qwen-image-edit#0 62.7 GiB" in text
    assert "--weights-dtype fp8 (for every model) (it would need 34.5 GiB)" in text
    assert "Or serve qwen-image on another GPU with at least 61.2 GiB free" in text
    # the suggestion holds: with it, the plan fits
    fp8 = [ModelSpec(s.id, s.source, s.pipeline_class, s.kind, s.options, profile=RunProfile(weights_dtype="fp8")) for s in specs]
    assert make_plan(fp8, settings, discover=_gpus(H100)).devices("qwen-image") == ["cuda:0"]


def test_the_refusal_offers_fewer_workers_and_smaller_images_when_they_fit():
    with pytest.raises(PlanError) as refused:
        make_plan([_full("qwen-image")], Settings(workers=2), discover=_gpus(_gpu(0, 80), _gpu(1, 64)))
    text = str(refused.value)
    assert "--workers 1" in text
    side = int(text.split("QIS_MAX_IMAGE_SIDE=")[1].split(" ")[0])
    assert side % 16 == 0 and side < 2048
    assert make_plan([_full("qwen-image")], Settings(workers=2, max_image_side=side), discover=_gpus(_gpu(0, 80), _gpu(1, 64)))
    with pytest.raises(PlanError):
        make_plan([_full("qwen-image")], Settings(workers=2, max_image_side=side + 16), discover=_gpus(_gpu(0, 80), _gpu(1, 64)))


def test_gpu_report_adds_what_the_workers_report():
    plan = make_plan([_small("a")], Settings(), discover=_gpus(_gpu(0, 80)))
    memory = {"allocated_gib": 3.0, "reserved_gib": 3.5, "device_free_gib": 70.0, "device_total_gib": 80.0}
    live = [{"name": "a#0", "memory": memory}]
    (report,) = plan.gpu_report(live)
    assert report["used_gib"] == 10.0 and report["total_gib"] == 80.0
    assert report["workers"][0]["allocated_gib"] == 3.0 and report["workers"][0]["planned_gib"] > 0


def test_fake_gpus_parse():
    assert [(g.device, g.free, g.total) for g in parse_fake_gpus("80GiB, 10GiB/24GiB")] == [
        ("cuda:0", 80 * GIB, 80 * GIB),
        ("cuda:1", 10 * GIB, 24 * GIB),
    ]
    with pytest.raises(ModelConfigError, match="QIS_FAKE_GPUS: 'lots' is not a size"):
        parse_fake_gpus("lots")


# --- the plan command -----------------------------------------------------------------------------
def test_plan_command_prints_the_plan_or_the_refusal(tiny_t2i, tiny_edit):
    runner = CliRunner()
    args = ["plan", "-m", f"a={tiny_t2i}", "-m", f"b={tiny_edit}"]
    fits = runner.invoke(app, args, env={"QIS_FAKE_GPUS": "0.8GiB,0.8GiB"})
    assert fits.exit_code == 0, fits.output
    assert "a: 600 MiB per worker at 2048x2048 (from safetensors headers)" in fits.output
    assert "cuda:0 QIS_FAKE_GPUS (819 MiB free of 819 MiB): " in fits.output and "cuda:1" in fits.output
    assert "the plan fits" in fits.output
    refused = runner.invoke(app, args, env={"QIS_FAKE_GPUS": "1GiB"})
    assert refused.exit_code == 2
    assert "error: not enough GPU memory for model " in refused.output
    assert "cuda:0 QIS_FAKE_GPUS: 1.0 GiB free of 1.0 GiB, planned there: " in refused.output
    assert "Or serve" in refused.output and "on another GPU" in refused.output
    # the estimate can be overruled: warn logs the refusal and places the workers unchecked, off never checks
    warned = runner.invoke(app, [*args, "--memory-check", "warn"], env={"QIS_FAKE_GPUS": "1GiB"})
    assert warned.exit_code == 0, warned.output
    assert "cuda:0 QIS_FAKE_GPUS (? GiB free of 1.0 GiB): a#0 600 MiB, b#0 " in warned.output
    assert warned.output.rstrip().endswith("placed without a memory check")
    off = runner.invoke(app, [*args, "--memory-check", "off"], env={"QIS_FAKE_GPUS": "0.8GiB,0.8GiB"})
    assert off.exit_code == 0 and "memory not checked (--memory-check)" in off.output, "off: even a plan that fits"
    bad = runner.invoke(app, [*args, "--memory-check", "maybe"])
    assert bad.exit_code == 2 and "--memory-check: Input should be 'on', 'warn' or 'off'" in bad.output


def test_memory_check_warn_logs_the_refusal_and_off_checks_nothing(caplog):
    from qwen_image_server.models.planner import checked_plan

    spec, card = _full("qwen-image"), _gpus(_gpu(0, 24))
    with pytest.raises(PlanError):
        checked_plan([spec], Settings(), discover=card)
    with caplog.at_level("WARNING"):
        warned = checked_plan([spec], Settings(memory_check="warn"), discover=card)
    assert "the memory plan does not fit; serving anyway (--memory-check warn):\nnot enough GPU memory" in caplog.text
    assert warned.unchecked and warned.devices("qwen-image") == ["cuda:0"]
    probes, reads = [], []
    counted_card = lambda: probes.append(1) or card()  # noqa: E731
    counted_read = lambda spec: reads.append(spec.id) or read_tensors(spec)  # noqa: E731
    checked_plan([spec], Settings(memory_check="warn"), discover=counted_card, reader=counted_read)
    assert (len(probes), reads) == (1, ["qwen-image"]), "the GPUs probed and the files read once for both plans"
    assert [g["checked"] for g in warned.gpu_report()] == [False]
    fits = checked_plan([spec], Settings(memory_check="warn"), discover=_gpus(_gpu(0, 141)))
    assert not fits.unchecked and [g["checked"] for g in fits.gpu_report()] == [True], "a plan that fits is checked"
    # off: neither the GPUs nor the host are checked, for GPU and CPU plans alike
    off = Settings(memory_check="off", workers=2)
    assert checked_plan([spec], off, discover=card).devices("qwen-image") == ["cuda:0", "cuda:0"]
    cpu = checked_plan([spec], off.model_copy(update={"device": "cpu"}), host=_host(1))
    assert cpu.unchecked and cpu.host is None and cpu.devices("qwen-image") == ["cpu", "cpu"]


@pytest.mark.parametrize("visible", ["", "-1"])
def test_no_gpu_can_be_visible_when_cuda_visible_devices_hides_them(monkeypatch, visible):
    from qwen_image_server.models.machine import no_gpu_driver

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert no_gpu_driver()


def test_the_text_encoder_is_planned_without_its_head_and_fp8_keeps_its_embeddings():
    """The server drops the text encoder's language-model head once it is loaded (text_encoder_fast): it counts while
    loading only. Under FP8 storage the token embeddings stay in the run dtype (memory.TEXT_ENCODER_SKIP_PATTERNS)."""
    from qwen_image_server.models.footprint import load_peak
    from qwen_image_server.models.weights_files import ModelTensors, Tensor

    vocab = 152064 * 3584
    model = ModelTensors(
        {
            "transformer": (Tensor("transformer_blocks.0.img_mlp.net.2.weight", "BF16", int(2e9), 2),),  # small: the text
            "text_encoder": (  # encoder's arrival is the peak
                Tensor("model.language_model.layers.0.mlp.down_proj.weight", "BF16", int(7.2e9), 2),
                Tensor("model.language_model.embed_tokens.weight", "BF16", vocab, 2),
                Tensor("lm_head.weight", "BF16", vocab, 2),
            ),
            "vae": (Tensor("decoder.conv_in.weight", "BF16", int(0.13e9), 4),),
        }
    )
    plain = resident_weights(model, RunProfile(), 2)
    assert plain["text_encoder"] == (int(7.2e9) + vocab) * 2, "the embeddings count, the head does not"
    fp8 = resident_weights(model, RunProfile(weights_dtype="fp8"), 2)
    assert fp8["text_encoder"] == int(7.2e9) + vocab * 2
    # loading with FP8 storage: the bf16 text encoder, head included, arrives before it is converted and the head dropped
    assert load_peak(model, RunProfile(weights_dtype="fp8"), 2) == fp8["transformer"] + (int(7.2e9) + 2 * vocab) * 2


def test_vae_tiling_lowers_the_working_memory_and_is_offered_when_it_makes_a_plan_fit():
    """Tiled decoding replaces the VAE's share of the working memory (most of it) by a tile's: at 2048x2048 about
    2 GiB instead of 16.5; a small image is not tiled and keeps its figure."""
    for tokens in (4096, 16384):
        tiled = activation_bytes(tokens, 0, 3072, 2, vae_tiling=True)
        assert GIB / 2 < tiled < activation_bytes(tokens, 0, 3072, 2) / 4
    assert activation_bytes(256, 0, 3072, 2, vae_tiling=True) == activation_bytes(256, 0, 3072, 2)
    settings = Settings()  # the largest image 2048x2048
    spec = _full("qwen-image", offload="group", weights_dtype="fp8")  # the 24 GB card's mode
    tiled_spec = _full("qwen-image", offload="group", weights_dtype="fp8", vae_tiling="on")
    roomy = make_plan([spec, replace(tiled_spec, id="tiled")], settings, discover=_gpus(_gpu(0, 80)))
    plain, tiled = roomy.footprints["qwen-image"], roomy.footprints["tiled"]
    assert plain.activations / GIB == pytest.approx(16.5, abs=0.1) and tiled.activations / GIB == pytest.approx(2.0, abs=0.2)
    assert tiled.weights == plain.weights
    small = _small("m", params=4e9)  # 7.5 GiB of bf16 weights and 16.5 GiB of working memory do not fit 12 GiB
    with pytest.raises(PlanError) as refused:
        make_plan([small], settings, discover=_gpus(_gpu(0, 12)))
    assert "Would fit: --vae-tiling on@m (it would need 9.9 GiB); QIS_MAX_IMAGE_SIDE=992" in str(refused.value)
    small_tiled = replace(small, profile=RunProfile(vae_tiling="on"))
    assert make_plan([small_tiled], settings, discover=_gpus(_gpu(0, 12))).devices("m") == ["cuda:0"]
    # on the CPU too (bf16 weights on a 64 GiB machine at 2048x2048)
    with pytest.raises(PlanError) as wide:
        make_plan([_full("qwen-image")], Settings(device="cpu", dtype="bfloat16"), host=_host(64))
    assert "--vae-tiling on@qwen-image (the VAE decodes in tiles: less working memory)" in str(wide.value)
