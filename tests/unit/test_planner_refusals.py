"""The memory plan: host memory, the refusal and its advice, workers per model, and the plan command (estimates and
placement: test_planner.py)."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from planner_specs import FULL_SIZE, H100, fake_gpu, full_model, gpu_probe, small_model
from typer.testing import CliRunner

from qwen_image_server.cli import app
from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.footprint import GIB, human, resident_weights
from qwen_image_server.models.machine import HostMemory, discover_host_memory, parse_fake_gpus, parse_fake_host
from qwen_image_server.models.plan_result import PlanError
from qwen_image_server.models.planner import make_plan
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.spec import ModelConfigError, ModelSpec
from qwen_image_server.models.step_cache import canonical_policy
from qwen_image_server.models.weights_files import read_tensors
from qwen_image_server.models.working_memory import activation_bytes


def _host(gib: float, total: float | None = None):
    return lambda: HostMemory(int(gib * GIB), int((total or gib) * GIB), "test host")


def test_cpu_plans_need_no_gpu_probe_and_are_checked_against_the_host_memory(tiny_t2i):
    def no_probe():
        raise AssertionError("the GPUs were probed for a CPU plan")

    spec = resolve_configured(Settings(models=[str(tiny_t2i)]))[0]
    settings = Settings(device="cpu", workers=2, max_image_side=1024)
    plan = make_plan([spec, full_model("huge")], settings, discover=no_probe, host=_host(400))
    assert plan.devices(spec.id) == plan.devices("huge") == ["cpu", "cpu"]
    huge = plan.footprints["huge"]
    assert huge.components["transformer"] == int(FULL_SIZE["transformer"]) * 4  # float32 on the CPU
    in_all = 2 * (huge.total + plan.footprints[spec.id].total)
    assert (
        f"host memory (400.0 GiB available of 400.0 GiB (test host)): {spec.id}#0, {spec.id}#1, huge#0, huge#1, " in plan.table()
    )
    assert f"{human(in_all)} in all, {human(400 * GIB - in_all)} headroom" in plan.table()
    # on the CPU nothing is offloaded: the host holds every weight whatever the profile says
    offloaded = make_plan([full_model("huge", offload="model")], settings, host=_host(400)).footprints["huge"]
    assert offloaded.weights == huge.weights
    assert make_plan([spec], Settings(), discover=gpu_probe(), host=_host(400)).devices(spec.id) == ["cpu"], "auto without GPUs"
    with pytest.raises(ModelConfigError, match="--device cuda asked for, but no GPU is visible"):
        make_plan([spec], Settings(device="cuda"), discover=gpu_probe())


def test_cpu_workers_that_do_not_fit_the_host_are_refused_with_the_flags_that_fit():
    settings = Settings(device="cpu", max_image_side=1024)
    with pytest.raises(PlanError) as refused:
        make_plan([full_model("qwen-image")], settings, host=_host(64, 125.5))
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
    assert make_plan([full_model("qwen-image")], settings.model_copy(update={"dtype": "bfloat16"}), host=_host(64)).devices(
        "qwen-image"
    ) == ["cpu"]
    # two workers where one fits: fewer workers; two models with the same files in one process: --share-components
    two = Settings(device="cpu", dtype="bfloat16", max_image_side=1024, workers=2)
    with pytest.raises(PlanError) as two_workers:
        make_plan([full_model("qwen-image")], two, host=_host(80))
    assert "--weights-dtype fp8@qwen-image (the transformer's weights stored in FP8); --workers 1" in str(two_workers.value)
    assert "--dtype bfloat16" not in str(two_workers.value)  # already
    fp8 = make_plan([full_model("qwen-image", weights_dtype="fp8")], two, host=_host(80))
    assert fp8.footprints["qwen-image"].components["transformer"] == int(FULL_SIZE["transformer"])  # 1 byte each
    # the default largest side (2048) takes 16.5 GiB of working memory: a smaller one is offered, and it fits
    with pytest.raises(PlanError) as wide:
        make_plan([full_model("qwen-image")], Settings(device="cpu", dtype="bfloat16"), host=_host(64))
    assert "; QIS_MAX_IMAGE_SIDE=1584 (images up to 1584x1584: less working memory)" in str(wide.value)
    assert make_plan([full_model("qwen-image")], Settings(device="cpu", dtype="bfloat16", max_image_side=1584), host=_host(64))
    with pytest.raises(PlanError):
        make_plan([full_model("qwen-image")], Settings(device="cpu", dtype="bfloat16", max_image_side=1600), host=_host(64))
    # an unknown estimate does not block, and without the host's figures nothing is checked
    assert make_plan([full_model("mystery", counts=None)], settings, host=_host(1)).devices("mystery") == ["cpu"]
    assert make_plan([full_model("qwen-image")], settings, host=lambda: None).devices("qwen-image") == ["cpu"]


def test_weights_that_gpu_workers_offload_must_fit_in_the_host_memory():
    """--offload keeps weights in this machine's memory (counted from parameter counts, group offload counts as model
    offload: the transformer stays on the 48 GB card, 15.7 GiB of text encoder and VAE stay in host memory)."""
    settings, card = Settings(max_image_side=1024), gpu_probe(fake_gpu(0, 48))
    with pytest.raises(PlanError) as refused:
        make_plan([full_model("qwen-image", offload="group")], settings, discover=card, host=_host(8))
    assert str(refused.value).splitlines() == [
        "not enough memory on this machine for the weights model qwen-image offloads (--offload group): each of its "
        "workers keeps 15.7 GiB in host memory (text_encoder 15.5 GiB, vae 248 MiB)",
        "The GPU workers' offloaded weights need 15.7 GiB in all (qwen-image 1 x 15.7 GiB); 8.0 GiB is available of "
        "8.0 GiB (test host).",
        "Would fit: --weights-dtype fp8@qwen-image (it would need 23.7 GiB on its GPU)",
        "Or serve it on a machine with more memory: the GPUs themselves have room for the plan.",
    ]
    fp8 = make_plan([full_model("qwen-image", offload="group", weights_dtype="fp8")], settings, discover=card, host=_host(8))
    assert fp8.devices("qwen-image") == ["cuda:0"] and fp8.host_planned <= 8 * GIB
    roomy = make_plan([full_model("qwen-image", offload="group")], settings, discover=card, host=_host(32))
    assert roomy.table().endswith(
        "host memory (32.0 GiB available of 32.0 GiB (test host)): qwen-image#0, 15.7 GiB in all, 16.3 GiB headroom"
    )
    ready = roomy.host_report()
    assert ready is not None and (ready["planned_gib"], ready["workers"]) == (pytest.approx(15.7, abs=0.05), ["qwen-image#0"])
    # resident models put nothing there; fake GPUs are another machine's, whose memory is unknown unless given
    assert (
        make_plan(
            [full_model("qwen-image")],
            settings.model_copy(update={"max_image_side": 512}),
            discover=gpu_probe(fake_gpu(0, 80)),
            host=_host(1),
        ).host
        is None
    )
    assert make_plan([full_model("qwen-image", offload="group")], settings, discover=card).host is None


def test_group_offload_is_planned_with_the_pinned_copies_torch_really_makes():
    """On CUDA, group offload pins a copy of every tensor of the transformer and the text encoder, and torch's pinned
    allocator rounds each up to a power of two: README's 24 GB setting (FP8 weights, group offload) keeps 42.6 GiB in
    host memory, not the 24.6 GiB of FP8 weights the plan counted, and an 8-bit 37.7 MB block weight takes 64 MiB.
    Model offload moves components without pinning them: counted as before."""
    from qwen_image_server.models.footprint import footprint, pinned_size

    assert [pinned_size(n) for n in (0, 1, 3, 1 << 20, (1 << 20) + 1, 3072 * 12288)] == [0, 1, 4, 1 << 20, 2 << 20, 64 << 20]
    spec = resolve_configured(Settings(models=["qwen-image=random:Qwen/Qwen-Image"]))[0]  # sized from its layer names
    model = read_tensors(spec)

    def fp(**profile):
        return footprint(spec, model, run_bytes=2, max_image_side=1024, profile=RunProfile(**profile))

    whole = fp(weights_dtype="fp8")
    raw = whole.components["transformer"] + whole.components["text_encoder"]
    group = fp(weights_dtype="fp8", offload="group")
    assert group.host_offloaded is not None and 1.55 < group.host_offloaded / raw < 1.7
    assert human(group.host_offloaded) == "42.6 GiB"
    text_only = fp(quantize="int4", weights_dtype="fp8", offload="text-encoder")  # the 16-24 GB resident setting
    assert human(text_only.host_offloaded) == "12.6 GiB"
    assert fp(offload="model").host_offloaded is None and fp().host_offloaded is None

    card, settings = gpu_probe(fake_gpu(0, 24)), Settings(max_image_side=1024)
    streamed = replace(spec, profile=RunProfile(weights_dtype="fp8", offload="group", cfg_batch="on"))
    assert human(make_plan([streamed], settings, discover=card, host=_host(64)).host_planned) == "42.6 GiB"
    with pytest.raises(PlanError) as refused:
        make_plan([streamed], settings, discover=card, host=_host(32))
    assert str(refused.value).splitlines()[0] == (
        "not enough memory on this machine for the weights model qwen-image offloads (--offload group): each of its "
        "workers keeps 42.6 GiB in host memory (pinned copies of its transformer and text encoder, each tensor rounded "
        "up to a power of two by torch's pinned-memory allocator)"
    )
    # with 16 GiB no single flag fits (4 bits under group offload still pins 2 x 11 GiB); the way out is the
    # transformer on the card in 4 bits, with only the text encoder streamed (12.6 GiB pinned): offered although the
    # model offloads its transformer on purpose, as that offload is what the machine is short of
    with pytest.raises(PlanError) as refused:
        make_plan([streamed], settings, discover=card, host=_host(16))
    recipe = "--quantize int4@qwen-image --offload text-encoder@qwen-image (the transformer stays on the GPU; it would need"
    assert str(refused.value).splitlines()[2] == f"Would fit: {recipe} 17.6 GiB on its GPU)", str(refused.value)
    resident = replace(spec, profile=RunProfile(weights_dtype="fp8", quantize="int4", offload="text-encoder", cfg_batch="on"))
    assert make_plan([resident], settings, discover=card, host=_host(16)).devices("qwen-image") == ["cuda:0"]
    with pytest.raises(PlanError) as short_on_gpu:  # on the card, a model that offloads on purpose is not told otherwise
        make_plan([streamed], settings, discover=gpu_probe(fake_gpu(0, 2)))
    assert "--quantize int4" not in str(short_on_gpu.value)


def test_cpu_entries_of_a_gpu_device_list_are_checked_against_the_host_memory():
    """--device cuda:0,cpu: the CPU worker holds the whole model in float32 (dtype auto) in this machine's memory;
    before, it was placed without any check."""
    settings = Settings(device="cuda:0,cpu", workers=2, max_image_side=1024)
    card = gpu_probe(fake_gpu(0, 80))
    with pytest.raises(PlanError) as refused:
        make_plan([full_model("qwen-image")], settings, discover=card, host=_host(64))
    cpu_fp = make_plan([full_model("qwen-image")], Settings(device="cpu", max_image_side=1024), host=_host(1000)).footprints
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
    roomy = make_plan([full_model("qwen-image")], settings, discover=card, host=_host(256))
    assert roomy.devices("qwen-image") == ["cuda:0", "cpu"] and roomy.host_workers == ["qwen-image#1"]
    assert [p.need for p in roomy.placements if p.device == "cpu"] == [need]
    assert "(no memory check)" not in roomy.table()
    half = make_plan([full_model("qwen-image")], settings.model_copy(update={"dtype": "bfloat16"}), discover=card, host=_host(64))
    assert half.host_planned < roomy.host_planned / 1.9, "the suggestion fits"
    assert make_plan([full_model("qwen-image")], settings.model_copy(update={"workers": 1}), discover=card, host=_host(64))
    # planning for another machine (fake GPUs, no host given): placed unchecked, as before
    assert "cpu: qwen-image#1 (no memory check)" in make_plan([full_model("qwen-image")], settings, discover=card).table()


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
    gpus = gpu_probe(*(fake_gpu(i, 80) for i in range(4)))
    specs = [full_model("qwen-image"), full_model("qwen-image-edit", "edit-plus")]
    plan = make_plan(specs, Settings(max_image_side=1024, model_workers=["3@qwen-image"]), discover=gpus)
    # one full-size model per card: the edit model (the largest worker) first, then the three others
    assert (plan.devices("qwen-image"), plan.devices("qwen-image-edit")) == (["cuda:1", "cuda:2", "cuda:3"], ["cuda:0"])
    # five workers on four cards: the refusal counts the model's own workers and suggests its own smaller count
    with pytest.raises(PlanError) as refused:
        make_plan(specs, Settings(max_image_side=1024, model_workers=["4@qwen-image"]), discover=gpus)
    message = str(refused.value)
    assert message.startswith("not enough GPU memory for model qwen-image (worker 4 of 4): each worker needs 58.4 GiB")
    assert message.endswith(
        "; --workers 3@qwen-image\nOr serve qwen-image on another GPU with at least 58.4 GiB free (the most any GPU here "
        "has left beside what is planned on it: 21.6 GiB)."
    )
    cpu = make_plan(specs, Settings(device="cpu", model_workers=["2@qwen-image-edit"], dtype="bfloat16"), host=_host(1000))
    assert (len(cpu.devices("qwen-image")), len(cpu.devices("qwen-image-edit"))) == (1, 2)


def test_workers_per_model_must_name_served_models_and_match_under_share_components(tiny_t2i, tiny_edit):
    entries = [f"t2i={tiny_t2i}", f"edit={tiny_edit}"]
    with pytest.raises(
        ModelConfigError, match=r"--workers \(or QIS_MODEL_WORKERS\) names models that are not served: nope \(served: t2i, edit\)"
    ):
        resolve_configured(Settings(models=entries, model_workers=["2@nope"]))
    with pytest.raises(ModelConfigError, match=r"every model needs the same number of workers \(here: t2i 2, edit 1\)"):
        resolve_configured(Settings(models=entries, workers=2, model_workers=["1@edit"], share_components=True))
    same = resolve_configured(Settings(models=entries, workers=1, model_workers=["2@edit", "2@t2i"], share_components=True))
    assert [spec.id for spec in same] == ["t2i", "edit"]
    # deterministic mode is torch's, for the whole process: one model's on would be the other's too
    with pytest.raises(ModelConfigError, match=r"every model needs the same --deterministic \(here: t2i off, edit on\)"):
        resolve_configured(Settings(models=entries, model_deterministic=["on@edit"], share_components=True))
    both = resolve_configured(Settings(models=entries, deterministic=True, share_components=True))
    assert all(spec.profile.deterministic for spec in both)
    resolve_configured(Settings(models=entries, model_deterministic=["on@edit"]))  # separate processes: fine


def test_an_unknown_estimate_does_not_block():
    plan = make_plan([full_model("mystery", counts=None)], Settings(), discover=gpu_probe(fake_gpu(0, 1)))
    assert plan.devices("mystery") == ["cuda:0"]
    assert plan.model_summary("mystery")["total_gib"] is None and "parameter_counts" in plan.model_summary("mystery")["unknown"]
    assert "memory estimate unknown" in plan.table()


def test_the_refusal_names_the_model_the_numbers_and_flags_that_fit():
    specs = [full_model("qwen-image"), full_model("qwen-image-edit", "edit-plus")]
    settings = Settings(max_image_side=1328)
    with pytest.raises(PlanError) as refused:
        make_plan(specs, settings, discover=gpu_probe(H100))
    text = str(refused.value)
    assert text.startswith("not enough GPU memory for model qwen-image (worker 1 of 1): each worker needs 61.2 GiB")
    assert "53.7 GiB of weights (transformer 38.0 GiB, text_encoder 15.5 GiB, vae 248 MiB)" in text
    assert "7.0 GiB working memory at 1328x1328" in text
    assert "cuda:0 NVIDIA H100 80GB HBM3: 79.1 GiB free of 79.6 GiB, planned there: qwen-image-edit#0 62.7 GiB" in text
    assert "--weights-dtype fp8 (for every model) (it would need 34.5 GiB)" in text
    assert "Or serve qwen-image on another GPU with at least 61.2 GiB free (the most any GPU here has left beside what " in text
    assert "is planned on it: 16.4 GiB)." in text  # 79.1 GiB free, 62.7 of it planned for the edit model
    # the suggestion holds: with it, the plan fits
    fp8 = [ModelSpec(s.id, s.source, s.pipeline_class, s.kind, s.options, profile=RunProfile(weights_dtype="fp8")) for s in specs]
    assert make_plan(fp8, settings, discover=gpu_probe(H100)).devices("qwen-image") == ["cuda:0"]


def test_the_refusal_offers_fewer_workers_and_smaller_images_when_they_fit():
    with pytest.raises(PlanError) as refused:
        make_plan([full_model("qwen-image")], Settings(workers=2), discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 64)))
    text = str(refused.value)
    assert "--workers 1" in text
    side = int(text.split("QIS_MAX_IMAGE_SIDE=")[1].split(" ")[0])
    assert side % 16 == 0 and side < 2048
    assert make_plan(
        [full_model("qwen-image")], Settings(workers=2, max_image_side=side), discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 64))
    )
    with pytest.raises(PlanError):
        make_plan(
            [full_model("qwen-image")],
            Settings(workers=2, max_image_side=side + 16),
            discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 64)),
        )


def test_gpu_report_adds_what_the_workers_report():
    plan = make_plan([small_model("a")], Settings(), discover=gpu_probe(fake_gpu(0, 80)))
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
    with pytest.raises(ModelConfigError, match="QIS_FAKE_GPUS: '90GiB/80GiB' has more free than in all"):
        parse_fake_gpus("80GiB,90GiB/80GiB")
    with pytest.raises(ModelConfigError, match="QIS_FAKE_HOST_MEMORY: '20GiB/16GiB' has more free than in all"):
        parse_fake_host("20GiB/16GiB")
    # a malformed number named the setting nowhere ("could not convert string to float: '1.2.3'")
    for bad in ("1.2.3GiB", ".", "1..GiB"):
        with pytest.raises(ModelConfigError, match=f"QIS_FAKE_GPUS: '{re.escape(bad)}' is not a size like 80GiB"):
            parse_fake_gpus(bad)
    with pytest.raises(ModelConfigError, match="QIS_FAKE_HOST_MEMORY: '1.2.3' is not a size"):
        parse_fake_host("1.2.3")
    assert [g.total for g in parse_fake_gpus(".5GiB,80.GiB")] == [GIB // 2, 80 * GIB]
    with pytest.raises(ModelConfigError, match="QIS_FAKE_GPUS: ', ' lists no GPU"):  # not "no GPU" by accident
        parse_fake_gpus(", ")


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
    # (the GPU's memory as it was checked, what is short, and what warn does)
    assert "cuda:0 QIS_FAKE_GPUS (1.0 GiB free of 1.0 GiB): a#0 600 MiB, b#0 " in warned.output
    assert "short by" in warned.output
    assert "memory checked: the plan does not fit (the warning above says why); --memory-check warn places the " in warned.output
    assert warned.output.rstrip().endswith("the plan does not fit; placed anyway (--memory-check warn)")
    off = runner.invoke(app, [*args, "--memory-check", "off"], env={"QIS_FAKE_GPUS": "0.8GiB,0.8GiB"})
    assert off.exit_code == 0 and "memory not checked (--memory-check off)" in off.output, "off: even a plan that fits"
    assert "? GiB free" in off.output and off.output.rstrip().endswith("placed without a memory check")
    bad = runner.invoke(app, [*args, "--memory-check", "maybe"])
    assert bad.exit_code == 2 and "--memory-check: Input should be 'on', 'warn' or 'off'" in bad.output


def test_plan_command_names_a_broken_weights_file_instead_of_failing(tiny_t2i, tmp_path):
    """What a user sees from ``qwen-image-server plan`` (``serve`` plans the same way before its port opens) for a
    weights file that is not safetensors and a config that is not an object: the estimate unknown, the file named,
    no traceback (each was one: a TypeError, an AttributeError)."""
    broken = Path(shutil.copytree(tiny_t2i, tmp_path / "broken"))
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes((16).to_bytes(8, "little") + b'{"a": 1, "b": 2}')
    (broken / "text_encoder" / "config.json").write_text("[1, 2]")
    done = CliRunner().invoke(app, ["plan", "-m", f"b={broken}", "--device", "cpu"])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.output
    assert done.exit_code == 0, done.output
    assert f"b: memory estimate unknown ({weights}: not a safetensors file (its header is not safetensors JSON))" in done.output


def test_memory_check_warn_logs_the_refusal_and_off_checks_nothing(caplog):
    from qwen_image_server.models.planner import checked_plan

    spec, card = full_model("qwen-image"), gpu_probe(fake_gpu(0, 24))
    with pytest.raises(PlanError):
        checked_plan([spec], Settings(), discover=card)
    with caplog.at_level("WARNING"):
        warned = checked_plan([spec], Settings(memory_check="warn"), discover=card)
    assert "the memory plan does not fit; placing the models anyway (--memory-check warn):\nnot enough GPU memory" in caplog.text
    assert warned.unchecked and warned.devices("qwen-image") == ["cuda:0"]
    probes, reads = [], []
    counted_card = lambda: probes.append(1) or card()  # noqa: E731
    counted_read = lambda spec: reads.append(spec.id) or read_tensors(spec)  # noqa: E731
    checked_plan([spec], Settings(memory_check="warn"), discover=counted_card, reader=counted_read)
    assert (len(probes), reads) == (1, ["qwen-image"]), "the GPUs probed and the files read once for both plans"
    assert [g["checked"] for g in warned.gpu_report()] == [False]
    fits = checked_plan([spec], Settings(memory_check="warn"), discover=gpu_probe(fake_gpu(0, 141)))
    assert not fits.unchecked and [g["checked"] for g in fits.gpu_report()] == [True], "a plan that fits is checked"
    # off: neither the GPUs nor the host are checked, for GPU and CPU plans alike
    off = Settings(memory_check="off", workers=2)
    assert checked_plan([spec], off, discover=card).devices("qwen-image") == ["cuda:0", "cuda:0"]
    cpu = checked_plan([spec], off.model_copy(update={"device": "cpu"}), host=_host(1))
    assert cpu.unchecked and cpu.host is None and cpu.devices("qwen-image") == ["cpu", "cpu"]
    # warn, short of host memory: the table keeps the host line the refusal had (with what it is short by)
    random = resolve_configured(Settings(models=["qwen-image=random:Qwen/Qwen-Image"]))[0]  # sized from its tensors
    offloaded = replace(random, profile=RunProfile(weights_dtype="fp8", offload="group"))
    with pytest.raises(PlanError) as refused:
        checked_plan([offloaded], Settings(), discover=card, host=_host(16))
    short = [line for line in refused.value.plan.table().splitlines() if line.startswith("host memory")]
    warned = checked_plan([offloaded], Settings(memory_check="warn"), discover=card, host=_host(16))
    assert warned.check_failed and [line for line in warned.table().splitlines() if line.startswith("host memory")] == short
    assert "short by" in short[0]


@pytest.mark.parametrize("visible", ["", "-1"])
def test_no_gpu_can_be_visible_when_cuda_visible_devices_hides_them(monkeypatch, visible):
    from qwen_image_server.models.machine import no_gpu_driver

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert no_gpu_driver()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the driver's files are Linux's")
@pytest.mark.parametrize("driver", [None, "proc/driver/nvidia", "dev/nvidiactl", "dev/kfd", "dev/dxg"])
def test_a_gpu_driver_is_seen_by_its_files_wsl2_included(monkeypatch, tmp_path, driver):
    """Without a driver the GPU probe is skipped (no GPU can be visible). WSL2 and Docker Desktop have no NVIDIA
    kernel module, only /dev/dxg: its GPUs were taken for absent (--device auto planned CPU workers). A gVisor sandbox
    passes an NVIDIA GPU through as its device files, without /proc/driver/nvidia."""
    from qwen_image_server.models.machine import no_gpu_driver

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if driver:
        (tmp_path / driver).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / driver).touch()
    assert no_gpu_driver(tmp_path) is (driver is None)


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
    spec = full_model("qwen-image", offload="group", weights_dtype="fp8")  # the 24 GB card's mode
    tiled_spec = full_model("qwen-image", offload="group", weights_dtype="fp8", vae_tiling="on")
    roomy = make_plan([spec, replace(tiled_spec, id="tiled")], settings, discover=gpu_probe(fake_gpu(0, 80)))
    plain, tiled = roomy.footprints["qwen-image"], roomy.footprints["tiled"]
    assert plain.activations / GIB == pytest.approx(16.5, abs=0.1) and tiled.activations / GIB == pytest.approx(2.0, abs=0.2)
    assert tiled.weights == plain.weights
    small = small_model("m", params=4e9)  # 7.5 GiB of bf16 weights and 16.5 GiB of working memory do not fit 12 GiB
    with pytest.raises(PlanError) as refused:
        make_plan([small], settings, discover=gpu_probe(fake_gpu(0, 12)))
    assert "Would fit: --vae-tiling on@m (it would need 9.9 GiB); QIS_MAX_IMAGE_SIDE=992" in str(refused.value)
    small_tiled = replace(small, profile=RunProfile(vae_tiling="on"))
    assert make_plan([small_tiled], settings, discover=gpu_probe(fake_gpu(0, 12))).devices("m") == ["cuda:0"]
    # on the CPU too (bf16 weights on a 64 GiB machine at 2048x2048)
    with pytest.raises(PlanError) as wide:
        make_plan([full_model("qwen-image")], Settings(device="cpu", dtype="bfloat16"), host=_host(64))
    assert "--vae-tiling on@qwen-image (the VAE decodes in tiles: less working memory)" in str(wide.value)


def test_on_the_real_machine_offloaded_weights_are_checked_against_its_memory(monkeypatch):
    """``serve`` plans without injected probes: its GPUs and this machine's memory are discovered. The host memory was
    read only when the GPU probe was injected too (a name overwritten), so on a real machine offloaded weights were
    never checked and a worker was killed for memory minutes into loading."""
    from qwen_image_server.models import planner

    monkeypatch.setattr(planner, "discover_gpus", gpu_probe(fake_gpu(0, 48)))
    monkeypatch.setattr(planner, "discover_host_memory", _host(8))
    with pytest.raises(PlanError, match="not enough memory on this machine for the weights model qwen-image offloads"):
        make_plan([full_model("qwen-image", offload="group")], Settings(max_image_side=1024))
    monkeypatch.setattr(planner, "discover_host_memory", _host(32))
    assert make_plan([full_model("qwen-image", offload="group")], Settings(max_image_side=1024)).host is not None


def test_a_full_taylorseer_that_does_not_fit_is_refused_with_its_lite_form_as_a_fitting_flag():
    taylor = canonical_policy("taylorseer:interval=4")
    card = gpu_probe(fake_gpu(0, 76))  # room for full-size Qwen-Image at 2048x2048 (69.7 GiB), not for 23 GiB more
    with pytest.raises(PlanError) as refused:
        make_plan([full_model("qwen-image", cache=taylor)], Settings(device="auto"), discover=card)  # 2048x2048 images
    fp = refused.value.plan.footprints["qwen-image"]
    assert fp.step_cache / GIB == pytest.approx(23.2, abs=0.1)
    message = str(refused.value)
    assert f"({human(fp.step_cache)} of it the step cache's state)" in message
    lite = "taylorseer:interval=4,warmup=6,cooldown=2,order=1,lite=true"
    assert f"--cache {lite}@qwen-image (it would need " in message
    fits = make_plan([full_model("qwen-image", cache=lite)], Settings(device="auto"), discover=card)
    assert fits.devices("qwen-image") == ["cuda:0"]
    assert make_plan([full_model("qwen-image")], Settings(device="auto"), discover=card).devices("qwen-image") == ["cuda:0"]


def test_a_small_card_is_offered_the_transformer_resident_in_4_bits_when_no_single_flag_keeps_it_there():
    """On 16 and 24 GB cards no one setting keeps Qwen-Image's transformer on the GPU (the offloads that fit stream it
    at every step): the refusal also offers the 4-bit recipe that does, checked by planning with it. Not to a model
    that offloads its transformer on purpose, nor where one setting already keeps it resident (48 GB: FP8)."""
    spec = resolve_configured(Settings(models=["qwen-image=random:Qwen/Qwen-Image"]))[0]  # sized from its layer names
    recipe = "--quantize int4@qwen-image --weights-dtype fp8@qwen-image --offload text-encoder@qwen-image"

    def refusal(gib: float, **profile) -> str:
        with pytest.raises(PlanError) as refused:
            make_plan([replace(spec, profile=RunProfile(**profile))], Settings(), discover=gpu_probe(fake_gpu(0, gib)))
        return str(refused.value)

    for gib in (16, 24):
        text = refusal(gib)
        assert f"{recipe} --vae-tiling on@qwen-image (the transformer stays on the GPU; it would need 15.0 GiB)" in text
    tiled = RunProfile(quantize="int4", weights_dtype="fp8", offload="text-encoder", vae_tiling="on")
    assert make_plan([replace(spec, profile=tiled)], Settings(), discover=gpu_probe(fake_gpu(0, 16))).devices("qwen-image")
    # where images stay small the VAE needs no tiles, and settings the model has are not repeated
    small = Settings(max_image_side=1024)
    with pytest.raises(PlanError) as refused:
        make_plan([replace(spec, profile=RunProfile(weights_dtype="fp8"))], small, discover=gpu_probe(fake_gpu(0, 24)))
    text = str(refused.value)
    assert "--quantize int4@qwen-image --offload text-encoder@qwen-image (the transformer stays on the GPU" in text
    assert "--vae-tiling" not in text.split("Would fit: ")[1].split("(the transformer")[0]
    assert "stays on the GPU" not in refusal(16, offload="group", cfg_batch="on")
    # a --device list with the CPU in it: nothing the CPU's workers would refuse (sequential offload needs CUDA)
    machine = lambda: HostMemory(256 * GIB, 256 * GIB, "test")  # noqa: E731
    with pytest.raises(PlanError) as refused:
        make_plan([spec], Settings(device="cuda:0,cpu"), discover=gpu_probe(fake_gpu(0, 24)), host=machine)
    text = str(refused.value)
    assert "--offload group@qwen-image" in text and "--offload sequential" not in text and recipe in text
    assert "stays on the GPU" not in refusal(48)
    # nor where a setting for every model keeps it resident (two models on one 80 GB card: FP8 or int4 for both)
    both = resolve_configured(
        Settings(models=["random:Qwen/Qwen-Image-Edit-2509", "random:Qwen/Qwen-Image"], max_image_side=1328)
    )
    with pytest.raises(PlanError) as refused:
        make_plan(both, Settings(max_image_side=1328), discover=gpu_probe(H100))
    text = str(refused.value)
    assert "--quantize int4 (for every model) (it would need 32.9 GiB)" in text and "stay on the GPU" not in text
    # two models on a 48 GB card (an L40S: 45 GiB): the setting for every model, and so for one process serving both
    recipe_for_all = "--quantize int4 --weights-dtype fp8 --offload text-encoder"
    with pytest.raises(PlanError) as refused:
        make_plan(both, Settings(), discover=gpu_probe(fake_gpu(0, 45)))
    assert f"{recipe_for_all} --vae-tiling on (for every model; the transformers stay on the GPU" in str(refused.value)
    with pytest.raises(PlanError) as refused:
        make_plan(both, Settings(share_components=True), discover=gpu_probe(fake_gpu(0, 45)))
    assert f"{recipe_for_all} (for every model; the transformers stay on the GPU)" in str(refused.value)
    # with the text encoder resident it loads in bf16 first: the refusal counts that in what a GPU needs free
    resident_encoder = [replace(spec, profile=RunProfile(quantize="int4", weights_dtype="fp8", vae_tiling="on")) for spec in both]
    with pytest.raises(PlanError) as refused:
        make_plan(resident_encoder, Settings(share_components=True), discover=gpu_probe(fake_gpu(0, 36)))
    text = str(refused.value)
    assert "each process needs 33.5 GiB (text encoders and VAEs with the same files counted once); 5.5 GiB more while" in text
    assert "Or serve these models on another GPU with at least 39.0 GiB free" in text
    shared = [replace(spec, profile=RunProfile(quantize="int4", weights_dtype="fp8", offload="text-encoder")) for spec in both]
    assert make_plan(shared, Settings(share_components=True), discover=gpu_probe(fake_gpu(0, 45)))


def test_a_host_memory_shortfall_is_not_offered_shared_processes_which_the_host_check_passes_over():
    """Workers that share processes are not checked against the host memory, so --share-components "fitted" a plan
    whose group offload still pinned 85.3 GiB on a 16 GiB machine."""
    env = {
        "QIS_MAX_IMAGE_SIDE": "1328",
        "QIS_FAKE_GPUS": "79.1GiB/79.6GiB",
        "QIS_FAKE_HOST_MEMORY": "16GiB",
        "HF_HUB_OFFLINE": "1",
    }
    args = [
        "plan",
        "--model",
        "random:Qwen/Qwen-Image-Edit-2509",
        "--model",
        "random:Qwen/Qwen-Image",
        "--offload",
        "group@Qwen-Image",
    ]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2 and "keeps 85.3 GiB in host memory" in result.output, result.output
    assert "Would fit: " in result.output and "--share-components" not in result.output


def test_a_worker_refused_on_a_gpu_its_device_list_repeats_is_offered_the_free_gpu():
    """``--device cuda:0,cuda:0`` for two workers that need 69.7 GiB each: the advice asked for "another GPU with at
    least 69.7 GiB free" while naming the 80 GiB that cuda:1 had (moving every cuda:0 of the list moved both)."""
    env = {"QIS_FAKE_GPUS": "80GiB,80GiB", "HF_HUB_OFFLINE": "1"}
    args = ["plan", "--model", "random:Qwen/Qwen-Image", "--device", "cuda:0,cuda:0", "--workers", "2"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip().splitlines()[-1] == "Or put it on another GPU here: --device cuda:1,cuda:0; --device cuda:0,cuda:1."
    )


def test_a_smaller_largest_side_is_never_offered_below_a_size_the_settings_name():
    """A refusal offered QIS_MAX_IMAGE_SIDE=1120 to a server compiling 2048x2048, and 1712 to one whose
    QIS_DEFAULT_SIZE was 2048x2048: both refused at the next start. The offered side is never below a size the
    settings or the models name (a default size, a size to compile)."""
    from qwen_image_server.models.plan_advice import largest_side

    def fits(side: int) -> bool:
        return side <= 1120

    assert largest_side(Settings(), fits, [full_model("a")]) == 1120
    assert largest_side(Settings(), fits, [full_model("a", compile=True, compile_sizes=("2048x2048",))]) is None
    assert largest_side(Settings(default_size="1536x1024"), fits) is None
    assert largest_side(Settings(default_size="1024x768"), fits, [full_model("a", compile_sizes=("1104x640",))]) == 1120
    limited = {"default_size": "1200x1200"}  # a model's own default size (its folder's sidecar)
    assert largest_side(Settings(), fits, [replace(full_model("a"), options=limited)]) is None


def test_a_small_card_is_offered_the_quickest_combination_that_fits_before_smaller_images():
    """A 12 GB card: no single setting fits Qwen-Image, and the refusal offered only sequential offload with images
    up to 1616x1616 (the slowest offload), while group offload with VAE tiling serves every size; with 64 GiB of
    host memory its bf16 pinned copies (85.3 GiB) do not fit there, and FP8 storage (42.6 GiB) is needed too. Each
    offer is then planned as it is, and fits."""
    (spec,) = resolve_configured(Settings(models=["qwen-image=random:Qwen/Qwen-Image"]))  # its real tensor shapes
    card, offers = gpu_probe(fake_gpu(0, 12)), {}
    for host in (128, 64):
        with pytest.raises(PlanError) as refused:
            make_plan([spec], Settings(), discover=card, host=_host(host))
        (offer,) = [line for line in str(refused.value).splitlines() if line.startswith("Would fit: ")]
        offers[host] = offer
    assert offers[128].startswith("Would fit: --vae-tiling on --offload group (for every model)"), offers
    assert offers[64].startswith("Would fit: --vae-tiling on --weights-dtype fp8 --offload group (for every model)"), offers
    assert all("QIS_MAX_IMAGE_SIDE" not in offer and "sequential" not in offer for offer in offers.values())
    for host, profile in ((128, RunProfile(vae_tiling="on", offload="group")),
                          (64, RunProfile(vae_tiling="on", weights_dtype="fp8", offload="group"))):  # fmt: skip
        plan = make_plan([replace(spec, profile=profile)], Settings(), discover=card, host=_host(host))
        assert plan.devices("qwen-image") == ["cuda:0"]
