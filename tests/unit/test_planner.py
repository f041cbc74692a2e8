"""The memory plan: estimates from safetensors headers and placement on (injected) GPUs (host memory, refusals and
the plan command: test_planner_refusals.py)."""

from __future__ import annotations

import re
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from planner_specs import FULL_SIZE, H100, fake_gpu, full_model, gpu_probe, small_model

from qwen_image_server.config import Settings
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.footprint import GIB, footprint, resident_weights
from qwen_image_server.models.machine import Gpu
from qwen_image_server.models.plan_result import PlanError
from qwen_image_server.models.planner import _slots, checked_plan, make_plan, place
from qwen_image_server.models.profile import LoraSpec, RunProfile
from qwen_image_server.models.spec import resolve_model
from qwen_image_server.models.step_cache import canonical_policy
from qwen_image_server.models.weights_files import (
    REFERENCE_INNER_DIM,
    REFERENCE_TEXT_ENCODER,
    UnknownFootprint,
    from_counts,
    read_folder,
    read_header,
    read_hub,
    read_tensors,
)
from qwen_image_server.models.working_memory import activation_bytes, denoising_bytes

FLOATS = {"F32": 4, "F16": 2, "BF16": 2}


def _with_header(header: bytes) -> bytes:
    """A file that starts as safetensors files do: the header's length, then ``header``."""
    return struct.pack("<Q", len(header)) + header


def _numel(info: dict) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def _headers(folder: Path, component: str) -> dict:
    return {k: v for f in sorted((folder / component).glob("*.safetensors")) for k, v in read_header(f).items()}


# --- estimates ------------------------------------------------------------------------------
@pytest.mark.parametrize("device,bytes_per_param", [("cuda", 2), ("cpu", 4)])
def test_estimate_is_the_sum_of_the_header_tensors_in_the_run_dtype(tiny_t2i, device, bytes_per_param):
    spec = resolve_configured(Settings(models=[str(tiny_t2i)]))[0]
    plan = make_plan([spec], Settings(device="auto" if device == "cuda" else "cpu"), discover=gpu_probe(fake_gpu(0, 80)))
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
    plan = make_plan([a, b], settings, discover=gpu_probe(fake_gpu(0, 80)))
    assert plan.footprints["a"].components == plan.footprints["b"].components
    assert plan.footprints["a"].total == plan.footprints["b"].total > 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"some text, not weights at all",
        _with_header(b'{"a": 1, "b": 2}'),  # JSON, but its entries are not tensors
        _with_header(b"\xff\xfe\xfd\xfc"),  # not UTF-8
        _with_header(b'{"w": {"dtype": "F32", "shape": ["x"]}}'),  # a shape that is not sizes
        _with_header(b'{"w": {"shape": [2, 3]}}'),  # no dtype
    ],
    ids=["empty", "text", "entries", "not-utf8", "shape", "dtype"],
)
def test_a_weights_file_that_is_not_safetensors_leaves_the_estimate_unknown_and_names_the_file(tiny_t2i, tmp_path, content):
    """The estimate is unknown, saying which file is wrong (the worker's load then fails as it does without a plan),
    instead of a traceback from ``plan`` or ``serve`` before the port opens."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_t2i, broken)
    target = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    target.write_bytes(content)
    with pytest.raises(UnknownFootprint, match=f"{target}: not a safetensors file"):
        read_folder(broken)
    settings = Settings(models=[f"b={broken}"], device="cpu")
    plan = make_plan(resolve_configured(settings), settings)
    assert plan.unknown["b"].startswith(f"{target}: not a safetensors file (") and "b" not in plan.footprints


def test_configs_and_indexes_that_are_not_what_they_should_be_give_reference_sizes_or_an_unknown_estimate(tiny_t2i, tmp_path):
    """A config that is not a JSON object or whose sizes are not whole numbers is read as missing (the reference
    sizes, as for a config that cannot be read), and a shard index without a weight_map leaves the estimate unknown:
    each of these ended ``plan`` and ``serve`` with a traceback."""
    good = read_folder(tiny_t2i)
    assert good.inner_dim != REFERENCE_INNER_DIM and good.text_encoder != REFERENCE_TEXT_ENCODER  # the tiny sizes
    cases = {
        "transformer/config.json": ("[1, 2]", '{"num_attention_heads": "x", "attention_head_dim": 2}', '{"num_attention_heads": true, "attention_head_dim": 2}'),
        "text_encoder/config.json": ("[1, 2]", '{"text_config": 5}', '{"hidden_size": -1}'),
    }  # fmt: skip
    for file, contents in cases.items():
        for content in contents:
            folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
            shutil.copytree(tiny_t2i, folder)
            (folder / file).write_text(content)
            tensors = read_folder(folder)
            assert tensors.components == good.components, (file, content)
            if file.startswith("transformer/"):
                assert (tensors.inner_dim, tensors.text_encoder) == (REFERENCE_INNER_DIM, good.text_encoder), content
            else:
                assert (tensors.inner_dim, tensors.text_encoder) == (good.inner_dim, REFERENCE_TEXT_ENCODER), content
    for weight_map in ("[1]", '{"w": 3}', "{}"):
        folder = tmp_path / f"index{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_t2i, folder)
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(f'{{"weight_map": {weight_map}}}')
        with pytest.raises(UnknownFootprint, match=f"{index}: not a safetensors index"):
            read_folder(folder)
    # a model_index.json entry without its library and class: not a component (it was an IndexError)
    folder = tmp_path / "empty-entry"
    shutil.copytree(tiny_t2i, folder)
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline", "transformer": [], "vae": [null, null]}')
    with pytest.raises(UnknownFootprint, match="no safetensors weights found"):
        read_folder(folder)


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
            infos = {
                k: type("Info", (), {"dtype": v["dtype"], "shape": v["shape"]}) for k, v in read_header(tiny_t2i / path).items()
            }
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
        read_tensors(full_model("x", counts=None))
    fp = footprint(full_model("x"), read_tensors(full_model("x")), run_bytes=2, max_image_side=1024)
    assert fp.weights == pytest.approx(sum(FULL_SIZE.values()) * 2, rel=1e-6)


def test_working_memory_matches_the_measured_qwen_image_figures():
    # 4.2 GiB over the weights at 1024x1024 (4096 tokens), 7.0 GiB at 1328x1328 (6889 tokens), bf16, H100
    assert activation_bytes(4096, 0, 3072, 2) / GIB == pytest.approx(4.2, abs=0.01)
    assert activation_bytes(6889, 0, 3072, 2) / GIB == pytest.approx(7.0, abs=0.01)
    assert activation_bytes(4096, 0, 3072, 2, batch=2) == pytest.approx(2 * activation_bytes(4096, 0, 3072, 2), rel=1e-6)
    t2i = footprint(full_model("t"), read_tensors(full_model("t")), run_bytes=2, max_image_side=1024)
    assert (t2i.weights + t2i.activations) / GIB == pytest.approx(53.8 + 4.2, abs=0.2)
    edit = footprint(
        full_model("e", "edit-plus"), read_tensors(full_model("e")), run_bytes=2, max_image_side=1024, max_input_images=4
    )
    assert edit.activations > t2i.activations, "input images of edits add to the working memory"


def test_a_step_caches_state_joins_the_working_memory_while_denoising(tiny_t2i):
    model = full_model("Qwen-Image", counts=None)  # the packaged architecture: 60 blocks of width 3072
    tensors = read_tensors(model)
    assert (tensors.layers, tensors.inner_dim) == (60, 3072) and read_folder(tiny_t2i).layers == 2

    def fp(cache, side=1024, kind="text-to-image", preview_scale=1.0):
        spec = replace(full_model("Qwen-Image", kind, counts=None), profile=RunProfile(cache=canonical_policy(cache)))
        return footprint(spec, tensors, run_bytes=2, max_image_side=side, max_input_images=2, preview_scale=preview_scale)

    plain = fp(None)
    assert plain.step_cache == 0
    # TaylorSeer: order + 1 factors of every block's attention output (4096 image tokens and a generation's 512 text
    # tokens at 1024x1024), for cond and uncond, in bf16 (what test_step_cache.py measures on the tiny model)
    taylor = fp("taylorseer")
    assert taylor.step_cache == 2 * 2 * 60 * (4096 + 512) * 3072 * 2
    # kept while it denoises and while a streamed request's previews decode (full size by default), not at the end
    assert taylor.activations == taylor.step_cache + activation_bytes(4096, 0, 3072, 2)
    small_previews = fp("taylorseer", preview_scale=0.25)  # 256x256 previews: denoising is the larger
    assert small_previews.activations == taylor.step_cache + denoising_bytes(4096, 0, 3072, 2) > plain.activations + 2 * GIB
    assert fp("taylorseer:order=3").step_cache == 2 * taylor.step_cache
    assert fp("taylorseer", 2048).step_cache / GIB == pytest.approx(23.2, abs=0.1)
    edit = fp("taylorseer", kind="edit-plus")  # the input images' tokens and the prompt's vision tokens too
    assert edit.step_cache > taylor.step_cache
    # The small states add their few megabytes to the previews' decode
    for small in ("taylorseer:lite=true", "fbcache"):
        cached = fp(small)
        assert 0 < cached.step_cache < GIB and cached.activations == plain.activations + cached.step_cache, small
    assert taylor.summary()["step_cache_gib"] == round(taylor.step_cache / GIB, 2)


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
    linear_in_blocks = lambda n, i: len(i["shape"]) == 2 and n.endswith(".weight") and n.startswith("transformer_blocks.")  # noqa: E731
    assert quant["transformer"] == expected("transformer", linear_in_blocks)
    assert quant["text_encoder"] == base["text_encoder"]
    largest = max(base, key=base.get)
    assert resident_weights(tensors, RunProfile(offload="model"), 2) == {c: (b if c == largest else 0) for c, b in base.items()}
    group = resident_weights(tensors, RunProfile(offload="group"), 2)
    blocks = {}
    for name, info in sizes["transformer"].items():
        if name.startswith("transformer_blocks."):
            key = ".".join(name.split(".")[:2])
            blocks[key] = blocks.get(key, 0) + _numel(info) * 2
    outside = sum(_numel(i) * 2 for n, i in sizes["transformer"].items() if not n.startswith("transformer_blocks."))
    # the block that runs and the next one, prefetched on the side stream, with everything outside the blocks
    assert len(blocks) == 2 and group["transformer"] == 2 * max(blocks.values()) + outside
    layers: dict[str, int] = {}  # the text encoder's numbered layers and vision blocks
    rest = 0
    for name, info in sizes["text_encoder"].items():
        numbered = re.match(r"(.*\.(?:layers|blocks)\.\d+)\.", name)
        if numbered:
            layers[numbered.group(1)] = layers.get(numbered.group(1), 0) + _numel(info) * 2
        else:
            rest += _numel(info) * 2
    # two layers (the one that runs, the next one prefetched), the embeddings (which stay) with the rest
    assert group["text_encoder"] == 2 * max(layers.values()) + rest < base["text_encoder"]
    # the text encoder offloads alike under --offload text-encoder: two layers of it on the device, not none
    assert resident_weights(tensors, RunProfile(offload="text-encoder"), 2) == {**base, "text_encoder": group["text_encoder"]}
    counted = from_counts({"transformer": 20.4e9, "text_encoder": 8.3e9, "vae": 0.13e9})  # no layer names
    assert resident_weights(counted, RunProfile(offload="text-encoder"), 2)["text_encoder"] == 0
    sequential = resident_weights(tensors, RunProfile(offload="sequential"), 2)
    assert 0 < sum(sequential.values()) < sum(group.values())


# --- placement ------------------------------------------------------------------------------
def test_a_model_that_fits_goes_to_the_gpu_with_room():
    plan = make_plan(
        [full_model("qwen-image")], Settings(max_image_side=1328), discover=gpu_probe(fake_gpu(0, 24), fake_gpu(1, 80))
    )
    assert plan.devices("qwen-image") == ["cuda:1"]
    assert plan.footprints["qwen-image"].total / GIB == pytest.approx(53.7 + 7.0 + 0.5, abs=0.2)
    report = plan.gpu_report()
    assert report[1]["workers"][0]["name"] == "qwen-image#0" and report[0]["workers"] == []


def test_two_models_too_large_for_one_gpu_together_go_to_two():
    specs = [full_model("qwen-image"), full_model("qwen-image-edit", "edit-plus")]
    plan = make_plan(specs, Settings(max_image_side=1328), discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 80)))
    assert {plan.devices("qwen-image")[0], plan.devices("qwen-image-edit")[0]} == {"cuda:0", "cuda:1"}


def test_small_models_share_a_gpu_and_a_models_workers_spread():
    specs = [small_model("a"), small_model("b"), small_model("c")]
    plan = make_plan(specs, Settings(max_image_side=512), discover=gpu_probe(fake_gpu(0, 80)))
    assert [plan.devices(m) for m in "abc"] == [["cuda:0"]] * 3
    plan = make_plan(
        [small_model("a")], Settings(max_image_side=512, workers=2), discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 80))
    )
    assert sorted(plan.devices("a")) == ["cuda:0", "cuda:1"]


def test_best_fit_is_tried_when_spreading_does_not_fit():
    # needs of about 40, 30 and 20 GiB on GPUs of 50 and 40: spreading puts the 40 on the 50 and strands the 20
    specs = [small_model("big", 20e9), small_model("m1", 15e9), small_model("m2", 10e9)]
    settings = Settings(max_image_side=256, min_image_side=256)
    plan = make_plan(specs, settings, discover=gpu_probe(fake_gpu(0, 200)))
    need = {m: plan.footprints[m].total / GIB for m in ("big", "m1", "m2")}
    gpus = [fake_gpu(0, need["m1"] + need["m2"] + 0.1), fake_gpu(1, need["big"] + 0.1)]
    assert place(_slots(specs, plan.footprints, Settings(workers=1)), gpus, spread=True)[1] is not None, (
        "spreading alone fails here"
    )
    plan = make_plan(specs, settings, discover=gpu_probe(*gpus))
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
    spec = full_model("a")

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
    placed, failed = place(slots, [fake_gpu(0, 72)], extras=extras)  # 30 + 30 + the larger extra, once
    assert failed is None and [p.device for p in placed] == ["cuda:0", "cuda:0"]
    assert place(slots, [fake_gpu(0, 71.9)], extras=extras)[1] is not None
    assert place(slots, [fake_gpu(0, 60)])[1] is None, "without extras 60 GiB is enough"
    placed, failed = place(slots, [fake_gpu(0, 45), fake_gpu(1, 45)], extras=extras)  # one each: 30 + its own extra
    assert failed is None and {p.device for p in placed} == {"cuda:0", "cuda:1"}


def test_two_fp8_models_on_one_80gb_card_fit_with_their_loads_one_after_the_other():
    specs = [full_model("qwen-image", weights_dtype="fp8"), full_model("qwen-image-edit", "edit-plus", weights_dtype="fp8")]
    plan = make_plan(specs, Settings(max_image_side=1328), discover=gpu_probe(H100))
    fps = plan.footprints.values()
    steady = sum(f.total for f in fps)
    assert plan.devices("qwen-image") == plan.devices("qwen-image-edit") == ["cuda:0"]
    assert steady + max(f.load_extra for f in fps) <= H100.free < steady + sum(f.load_extra for f in fps) + 20 * GIB
    assert "more while loading" in plan.table()
    tight = Gpu("cuda:0", "tight", steady + max(f.load_extra for f in fps) - GIB, H100.total)
    with pytest.raises(PlanError, match="more while it loads"):
        make_plan(specs, Settings(max_image_side=1328), discover=gpu_probe(tight))


def test_an_explicit_device_list_is_kept_and_checked():
    settings = Settings(max_image_side=1328, device="cuda:1,cuda:0")
    specs = [small_model("a"), small_model("b")]
    plan = make_plan(specs, settings, discover=gpu_probe(fake_gpu(0, 80), fake_gpu(1, 80)))
    assert (plan.devices("a"), plan.devices("b")) == (["cuda:1"], ["cuda:0"])
    with pytest.raises(PlanError, match=r"model qwen-image \(worker 1 of 1\) on cuda:0") as refused:
        make_plan([full_model("qwen-image")], Settings(device="cuda:0"), discover=gpu_probe(fake_gpu(0, 24), fake_gpu(1, 80)))
    assert "--device auto (places the workers by free memory)" in str(refused.value)
    # not "another GPU with at least 69.7 GiB free (the most any GPU here has left: 80.0 GiB)": cuda:1 is here (a list
    # planned as the refusal plans it: a GPU whose room the others' loading peaks or the model's other workers take
    # is not offered)
    assert str(refused.value).splitlines()[-1] == "Or put it on another GPU here: --device cuda:1."
    two = [full_model("qwen-image", weights_dtype="fp8")]
    with pytest.raises(PlanError) as refused:  # both workers would move: 2 x 44 GiB is more than cuda:0's 60
        make_plan(two, Settings(device="cuda:1", workers=2), discover=gpu_probe(fake_gpu(0, 60), fake_gpu(1, 24)))
    assert "--device cuda:0" not in str(refused.value) and "Or serve qwen-image on another GPU" in str(refused.value)
    three = gpu_probe(fake_gpu(0, 60), fake_gpu(1, 60), fake_gpu(2, 24))
    with pytest.raises(PlanError) as refused:
        make_plan(two, Settings(device="cuda:0,cuda:2", workers=2), discover=three)
    assert str(refused.value).splitlines()[-1] == "Or put it on another GPU here: --device cuda:0,cuda:1."
    with pytest.raises(PlanError, match=r"--device names cuda:5, which is not visible \(visible GPUs: cuda:0\)"):
        make_plan(specs, Settings(device="cuda:5"), discover=gpu_probe(fake_gpu(0, 80)))
    with pytest.raises(PlanError, match=r"--device names cuda:0, which is not visible \(visible GPUs: none\)"):
        make_plan(specs, Settings(device="cuda:0"), discover=gpu_probe())
    # also a GPU of the list that no worker goes to (yet): a typo was refused only once --workers grew
    with pytest.raises(PlanError, match=r"--device names cuda:7, which is not visible \(visible GPUs: cuda:0\)"):
        make_plan(specs[:1], Settings(device="cuda:0,cuda:7", workers=1), discover=gpu_probe(fake_gpu(0, 80)))
    # no memory check makes an absent GPU serve: --memory-check warn refuses it too, without "placing the models anyway" (and
    # serve's refusal does not offer that flag)
    with pytest.raises(PlanError, match="which is not visible") as refused:
        checked_plan(specs, Settings(device="cuda:0", memory_check="warn"), discover=gpu_probe())
    assert refused.value.about_memory is False


def test_the_room_a_refusal_says_a_gpu_has_left_keeps_its_workers_loading_peak():
    """cuda:0 (44 GiB) holds an FP8 worker of 31.7 GiB that needs 6.8 GiB more while it loads: a 12.2 GiB worker
    is refused there, and the refusal said cuda:0 had 12.3 GiB left, more than the 12.2 it asked for."""
    specs = [full_model("a", weights_dtype="fp8"), small_model("b", 4e9)]
    with pytest.raises(PlanError) as refused:
        make_plan(specs, Settings(max_image_side=1024, device="cuda:0"), discover=gpu_probe(fake_gpu(0, 44), fake_gpu(1, 5)))
    last = str(refused.value).splitlines()[-1]
    assert last == (
        "Or serve b on another GPU with at least 12.2 GiB free (the most any GPU here has left beside what is planned "
        "on it: 5.5 GiB)."
    )


def test_with_free_memory_unknown_workers_spread_over_the_gpus():
    """When the GPUs' free memory is unknown (the probe failed, ``--memory-check off``), every GPU has "infinite"
    room: the spread's key tied and every worker went to cuda:0 (three full-size models on one card, three idle)."""
    gpus = [Gpu(f"cuda:{i}", "test GPU", None, 80 * GIB) for i in range(4)]
    slots = [("a", 0, 40 * GIB), ("b", 0, 40 * GIB), ("c", 0, 40 * GIB), ("d", 0, None), ("a", 1, 40 * GIB)]
    for spread in (True, False):
        placed, failed = place(slots, gpus, spread=spread)
        assert failed is None
        on = {gpu.device: [f"{p.model}#{p.slot}" for p in placed if p.device == gpu.device] for gpu in gpus}
        assert sorted(len(workers) for workers in on.values()) == [1, 1, 1, 2], (spread, on)  # five workers, four GPUs


def test_int4_counts_half_a_byte_and_a_step_and_minimum_per_group_of_the_blocks_linear_weights(tiny_t2i):
    """``--quantize int4``: the transformer blocks' linear weights at 4 bits plus two run-dtype values per 64 inputs;
    everything else as without it, and with ``--weights-dtype fp8`` beside it only the text encoder in FP8."""
    tensors = read_folder(tiny_t2i)
    sizes = {c: _headers(tiny_t2i, c) for c in ("transformer", "text_encoder", "vae")}
    base = resident_weights(tensors, RunProfile(), 2)
    fp8 = resident_weights(tensors, RunProfile(weights_dtype="fp8"), 2)
    int4 = resident_weights(tensors, RunProfile(quantize="int4"), 2)

    def size(name, info):
        n = _numel(info)
        linear = len(info["shape"]) == 2 and name.endswith(".weight") and name.startswith("transformer_blocks.")
        return n // 2 + 2 * 2 * -(-n // 64) if linear else n * 2

    assert int4["transformer"] == sum(size(n, i) for n, i in sizes["transformer"].items()) < base["transformer"]
    assert int4["text_encoder"] == base["text_encoder"] and int4["vae"] == base["vae"]
    both = resident_weights(tensors, RunProfile(quantize="int4", weights_dtype="fp8"), 2)
    assert both == {**int4, "text_encoder": fp8["text_encoder"]}, "FP8 storage is the text encoder's only"


def test_int4_holds_qwen_image_s_transformer_in_about_a_quarter_and_fits_a_24gb_card_resident():
    spec = resolve_model("random:Qwen/Qwen-Image", "qwen-image")  # sized from its architecture's layer names
    model = read_tensors(spec)

    def fp(**profile):
        return footprint(spec, model, run_bytes=2, max_image_side=1024, profile=RunProfile(**profile))

    plain, int4 = fp(), fp(quantize="int4")
    # 20.4 B weights, nearly all in the blocks' linear layers: 4.5 bits each with bf16 steps and minimums
    assert int4.components["transformer"] / plain.components["transformer"] == pytest.approx(4.5 / 16, abs=0.01)
    assert int4.load_extra == 0, "read on the CPU and quantized a layer at a time: never on the device in bf16"
    # a CPU worker holds the whole transformer in its run dtype (float32) before quantizing it, as with FP8
    on_cpu = footprint(spec, model, run_bytes=4, max_image_side=1024, profile=RunProfile(quantize="int4"), on_gpu=False)
    whole = footprint(spec, model, run_bytes=4, max_image_side=1024, on_gpu=False).components["transformer"]
    assert on_cpu.total + on_cpu.load_extra - on_cpu.overhead >= whole > on_cpu.total
    recipe = fp(quantize="int4", weights_dtype="fp8", offload="text-encoder")
    assert recipe.components["transformer"] == int4.components["transformer"], "the transformer stays resident"
    card = gpu_probe(Gpu("cuda:0", "24 GB card", 24 * GIB, 24 * GIB))
    settings = Settings(max_image_side=1024)
    assert make_plan([replace(spec, profile=recipe.profile)], settings, discover=card).devices("qwen-image") == ["cuda:0"]
    # README's recipe for 16-24 GB cards, with the default 2048x2048 limit: the VAE in tiles as well
    tiled = replace(spec, profile=replace(recipe.profile, vae_tiling="on"))
    sixteen = gpu_probe(Gpu("cuda:0", "16 GB card", 16 * GIB, 16 * GIB))
    assert make_plan([tiled], Settings(), discover=sixteen).devices("qwen-image") == ["cuda:0"]
    with pytest.raises(PlanError, match=r"Would fit: --vae-tiling on@qwen-image"):
        make_plan([replace(spec, profile=recipe.profile)], Settings(), discover=card)
    # without it, 24 GB needs the transformer streamed (group offload); the refusal offers int4 for a model that
    # only needs the text encoder out of the way
    with pytest.raises(PlanError, match=r"--quantize int4@qwen-image \(it would need"):
        make_plan([replace(spec, profile=RunProfile(weights_dtype="fp8", offload="text-encoder"))], settings, discover=card)
    # with a hot-swapped LoRA the layers it adapts keep bf16; a fused one is merged before quantizing
    lora = LoraSpec("style", "/loras/style.safetensors", "qwen-image", layers=("transformer_blocks.0.img_mlp.net.2",))
    swapped = fp(quantize="int4", loras=(lora,))
    fused = fp(quantize="int4", loras=(replace(lora, fuse=True),))
    assert fused.components["transformer"] == int4.components["transformer"] < swapped.components["transformer"]


def test_sizings_of_one_model_kept_between_plans_are_those_of_each_profile():
    """A model's per-tensor sizings are done once and kept (a plan sizes it under dozens of profiles): each profile
    still gets its own figures, the same as sized afresh, whatever was sized before it."""
    from qwen_image_server.models import footprint as fp
    from qwen_image_server.models.weights_files import _packaged_random_tensors

    model = _packaged_random_tensors("random:Qwen/Qwen-Image")
    assert model is not None
    block = "transformer_blocks.0.attn.to_q"
    lora = LoraSpec("style", "/loras/style.safetensors", "a", layers=(block, "transformer_blocks.1.img_mlp.net.2"))
    profiles = [
        RunProfile(), RunProfile(quantize="fp8"), RunProfile(weights_dtype="fp8"), RunProfile(quantize="int4"),
        RunProfile(weights_dtype="fp8", quantize="int4"), RunProfile(offload="group"), RunProfile(offload="sequential"),
        RunProfile(offload="text-encoder", weights_dtype="fp8"), RunProfile(quantize="fp8", loras=(lora,)),
        RunProfile(offload="group", quantize="int4", loras=(lora,)), RunProfile(quantize="fp8"),
    ]  # fmt: skip

    def sizes(profile: RunProfile, run_bytes: int) -> tuple:
        weights = fp.resident_weights(model, profile, run_bytes)
        return weights, fp.pinned_parts(model, profile, run_bytes), fp.load_peak(model, profile, run_bytes)

    kept = [sizes(profile, run_bytes) for profile in profiles for run_bytes in (2, 4)]
    afresh = []
    for profile in profiles:
        for run_bytes in (2, 4):
            fp._SIZED.clear()
            afresh.append(sizes(profile, run_bytes))
    assert kept == afresh
    assert len({str(figures) for figures in kept}) > len(profiles)  # the profiles do size it differently
