"""Planning with --share-components: one worker process per slot serves every model, shared weights counted once."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_models
from qwen_image_server.models.footprint import GIB, human
from qwen_image_server.models.host_memory import cpu_need
from qwen_image_server.models.machine import Gpu, HostMemory
from qwen_image_server.models.plan_result import PlanError
from qwen_image_server.models.planner import make_plan
from qwen_image_server.models.weights_files import from_counts

FULL_SIZE = {"transformer": 20.4e9, "text_encoder": 8.3e9, "vae": 0.13e9}  # Qwen-Image's parameters


@pytest.fixture(autouse=True)
def hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("QIS_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))


def _full_size(spec):
    """Every model sized as full-size Qwen-Image (the folders are tiny; their files decide what is shared)."""
    return from_counts(FULL_SIZE)


def _gpu(gib: float) -> Gpu:
    return Gpu("cuda:0", "test GPU", int(gib * GIB), int(gib * GIB))


def _specs(t2i, edit_plus, **profile):
    flags = {key: [value] for key, value in profile.items()}
    return resolve_models([("qwen-image", str(t2i)), ("qwen-image-edit", str(edit_plus))], flags)


def _plan(specs, gib=64.0, **settings):
    return make_plan(specs, Settings(max_image_side=1328, **settings), discover=lambda: [_gpu(gib)], reader=_full_size)


def test_two_fp8_models_fit_one_card_only_with_one_text_encoder(tiny_t2i, tiny_edit_plus):
    specs = _specs(tiny_t2i, tiny_edit_plus, weights_dtype="fp8")
    with pytest.raises(PlanError) as refused:
        _plan(specs)
    assert "--share-components (one worker process serves every model" in str(refused.value)
    plan = _plan(specs, share_components=True)
    assert plan.devices("qwen-image") == plan.devices("qwen-image-edit") == ["cuda:0"]
    need = {p.model: p.need for p in plan.placements}
    one = plan.footprints["qwen-image"]
    # the second model adds its transformer only: the text encoder and VAE files are the same
    assert need["qwen-image-edit"] == plan.footprints["qwen-image-edit"].components["transformer"]
    work = max(max(fp.activations, fp.text_encoder_work) for fp in plan.footprints.values())
    assert need["qwen-image"] == one.weights + work + one.overhead
    assert "--share-components" in plan.table()
    # not suggested where it would be refused: deterministic mode differs between the models (a process's own)
    mixed = [specs[0], replace(specs[1], profile=replace(specs[1].profile, deterministic=True))]
    with pytest.raises(PlanError) as refused:
        _plan(mixed)
    assert "--share-components" not in str(refused.value)


def test_random_weight_stand_ins_share_in_the_plan_as_their_workers_do():
    """``random:`` models share a text encoder or VAE of equal architecture values and seed in a worker process: the
    plan counted them whole (29.0 GiB planned where 27.3 are needed), and a seed of its own is another module."""
    from qwen_image_server.models.plan_groups import shared_keys

    specs = resolve_models([("a", "random:Qwen/Qwen-Image"), ("b", "random:Qwen/Qwen-Image-Edit-2509")], {})
    keys = shared_keys(specs)
    assert keys[("a", "text_encoder")] == keys[("b", "text_encoder")] and keys[("a", "vae")] == keys[("b", "vae")]
    plan = make_plan(specs, Settings(max_image_side=1328, share_components=True), discover=lambda: [_gpu(160.0)])
    need = {p.model: p.need for p in plan.placements}
    assert need["b"] == plan.footprints["b"].components["transformer"]  # its text encoder and VAE are a's
    other_seed = resolve_models([("a", "random:Qwen/Qwen-Image"), ("b", "random:Qwen/Qwen-Image-Edit-2509?seed=7")], {})
    keys = shared_keys(other_seed)
    assert keys[("a", "text_encoder")] != keys[("b", "text_encoder")]


def test_a_shared_cpu_process_counts_one_loading_peak_as_it_loads_its_models_one_after_the_other():
    """On the CPU every model's FP8 loading peak was added (144.1 GiB for two models in one process at 1024, where
    the GPU plan counts the largest one): the process loads them in turn."""
    specs = resolve_models(
        [("a", "random:Qwen/Qwen-Image"), ("b", "random:Qwen/Qwen-Image-Edit-2509")], {"weights_dtype": ["fp8"]}
    )
    host = HostMemory(1000 * GIB, 1000 * GIB, "test host")
    settings = Settings(device="cpu", workers=2, share_components=True, max_image_side=1024)
    plan = make_plan(specs, settings, host=lambda: host)
    peaks = {model: fp.load_extra for model, fp in plan.footprints.items()}
    assert min(peaks.values()) > 0
    kept = sum(p.need for p in plan.placements)
    assert plan.host_planned == kept + 2 * max(peaks.values())  # one peak per process (two slots), not per model
    total, per_model = cpu_need(plan.placements, plan.footprints)  # unshared: each worker its own peak
    assert total == kept + 2 * sum(peaks.values())


def test_a_shared_process_refused_on_an_explicit_device_is_sized_as_one_process():
    """``--device cuda:0 --workers 2 --share-components``: the refusal said "each process needs" the device's
    total (both processes), and listed the refused process's own entries as planned there."""
    specs = resolve_models([("a", "random:Qwen/Qwen-Image"), ("b", "random:Qwen/Qwen-Image-Edit-2509")], {})
    settings = Settings(device="cuda:0", workers=2, share_components=True)
    one = make_plan(specs, settings.model_copy(update={"workers": 1}), discover=lambda: [_gpu(160.0)])
    process = sum(p.need for p in one.placements)
    with pytest.raises(PlanError) as refused:
        make_plan(specs, settings, discover=lambda: [_gpu(160.0)])
    head, gpus = str(refused.value).splitlines()[:2]
    assert f"(--share-components; worker 2 of 2) on cuda:0: each process needs {human(process)} " in head
    assert gpus.endswith(f"planned there: a#0 {human(one.placements[0].need)}, b#0 {human(one.placements[1].need)}")


def test_different_text_encoders_are_counted_twice(tiny_t2i, tiny_edit_plus, tmp_path):
    from safetensors.torch import load_file, save_file  # torch: imported by the one test that needs it

    other = tmp_path / "edit-retrained"
    shutil.copytree(tiny_edit_plus, other)
    for file in (other / "text_encoder").glob("*.safetensors"):
        tensors = load_file(file)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] * 2
        file.unlink()
        save_file(tensors, file, metadata={"format": "pt"})
    plan = _plan(_specs(tiny_t2i, other, weights_dtype="fp8"), gib=200, share_components=True)
    need = {p.model: p.need for p in plan.placements}
    second = plan.footprints["qwen-image-edit"].components
    assert need["qwen-image-edit"] == second["transformer"] + second["text_encoder"]  # only the VAE is shared


def test_a_shared_process_that_does_not_fit_is_refused_naming_every_model(tiny_t2i, tiny_edit_plus):
    specs = _specs(tiny_t2i, tiny_edit_plus)  # bf16: two 38 GiB transformers
    with pytest.raises(PlanError) as refused:
        _plan(specs, gib=80, share_components=True)
    text = str(refused.value)
    assert text.startswith("not enough GPU memory for models qwen-image, qwen-image-edit in one worker process")
    assert "--weights-dtype fp8 (for every model)" in text
    assert "Or serve these models on another GPU with at least 99.3 GiB free" in text
    # the suggestion holds
    assert _plan(_specs(tiny_t2i, tiny_edit_plus, weights_dtype="fp8"), gib=80, share_components=True).placements


def test_shared_processes_on_the_cpu_and_per_slot(tiny_t2i, tiny_edit_plus):
    specs = _specs(tiny_t2i, tiny_edit_plus)
    host = HostMemory(1000 * GIB, 1000 * GIB, "test host")
    cpu = make_plan(specs, Settings(device="cpu", workers=2, share_components=True), reader=_full_size, host=lambda: host)
    assert cpu.devices("qwen-image") == cpu.devices("qwen-image-edit") == ["cpu", "cpu"]
    # on the CPU too the shared text encoder and VAE count once: a host that holds the shared processes and not
    # two copies of everything is told --share-components, and a host too small for both gets the shared message
    shared_need = cpu_need(cpu.placements, cpu.footprints)[0]
    fits_shared = HostMemory(shared_need + GIB, shared_need + GIB, "test host")
    with pytest.raises(PlanError, match=r"--share-components \(one worker process serves every model"):
        make_plan(specs, Settings(device="cpu", workers=2), reader=_full_size, host=lambda: fits_shared)
    too_small = HostMemory(shared_need - GIB, shared_need, "test host")
    with pytest.raises(
        PlanError, match=rf"in 2 worker process\(es\) \(--share-components\): each needs {human(shared_need // 2)}"
    ):
        make_plan(specs, Settings(device="cpu", workers=2, share_components=True), reader=_full_size, host=lambda: too_small)
    two = make_plan(_specs(tiny_t2i, tiny_edit_plus, weights_dtype="fp8"), Settings(workers=2, share_components=True, max_image_side=1328),
                    discover=lambda: [Gpu("cuda:0", "a", 64 * GIB, 64 * GIB), Gpu("cuda:1", "b", 64 * GIB, 64 * GIB)],
                    reader=_full_size)  # fmt: skip
    # slot i of both models is one process on one GPU; the two slots spread over the GPUs
    assert two.devices("qwen-image") == two.devices("qwen-image-edit")
    assert sorted(two.devices("qwen-image")) == ["cuda:0", "cuda:1"]


def test_offloaded_weights_of_shared_processes_are_checked_against_the_host_once_per_process(tiny_t2i, tiny_edit_plus):
    """A shared process keeps the text encoder and VAE it offloads in host memory once: counted once, and checked.
    Shared plans were not checked against the host at all (the plan "fit", and the kernel would end the workers
    while they loaded), and a refusal for host memory never offered --share-components."""
    specs = _specs(tiny_t2i, tiny_edit_plus, offload="text-encoder")

    def host(gib: float):
        return lambda: HostMemory(int(gib * GIB), int(gib * GIB), "test host")

    def plan(gib: float, **settings):
        return make_plan(specs, Settings(max_image_side=1328, **settings), discover=lambda: [_gpu(200)], reader=_full_size,
                         host=host(gib))  # fmt: skip

    apart, shared = plan(1000), plan(1000, share_components=True)
    second = shared.footprints["qwen-image-edit"]
    whole = {name: size - second.components.get(name, 0) for name, size in _whole_components(specs, tiny_edit_plus).items()}
    assert apart.host_planned - shared.host_planned == whole["text_encoder"] + whole["vae"] > 0
    between = (apart.host_planned + shared.host_planned) / 2 / GIB
    assert plan(between, share_components=True).devices("qwen-image") == ["cuda:0"]  # one 200 GB card, for both
    with pytest.raises(PlanError) as refused:
        plan(between)
    assert "--share-components (one worker process serves every model" in str(refused.value)
    with pytest.raises(PlanError, match="not enough memory on this machine for the weights model"):
        plan(shared.host_planned / GIB - 1, share_components=True)


def _whole_components(specs, folder) -> dict[str, int]:
    """The bytes of each component of a model sized as full-size Qwen-Image with nothing offloaded."""
    plain = resolve_models([("plain", str(folder))], {})
    plan = make_plan(plain, Settings(max_image_side=1328), discover=lambda: [_gpu(1000)], reader=_full_size)
    return plan.footprints["plain"].components
