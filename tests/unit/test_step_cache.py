"""Step caching: policy strings (start-up and request errors), and cached runs on a tiny model.

The runs count the transformer's blocks with forward hooks on their MLPs (which run
only when a block really runs) and compare images pixel for pixel.
"""

from dataclasses import replace

import numpy as np
import pytest

from conftest import run_cli
from qwen_image_server.config import Settings
from qwen_image_server.errors import InvalidRequest, TaskCancelled
from qwen_image_server.jobs import Job, JobResult, TaskResult
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.profile import ProfileError, RunProfile, build_profile
from qwen_image_server.models.spec import ModelConfigError, ModelSpec, resolve_model
from qwen_image_server.models.step_cache import CachePolicyError, parse_policy
from qwen_image_server.protocol.images import GenerationRequest
from qwen_image_server.serving.service import ImageService

# --- policy strings (no torch) ---------------------------------------------------------------


def test_policies_fill_in_defaults_and_print_canonically():
    assert parse_policy("fbcache").canonical() == "fbcache:threshold=0.08"
    assert parse_policy(" FBCache:threshold=0.05 ").canonical() == "fbcache:threshold=0.05"
    taylor = parse_policy("taylorseer:interval=4,lite=yes")
    assert taylor.canonical() == "taylorseer:interval=4,warmup=6,cooldown=2,order=1,lite=true"
    assert parse_policy(taylor.canonical()) == taylor
    for off in (None, "", "none", "off", "NONE"):
        assert parse_policy(off) is None


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "teacache",
            "unknown step cache policy 'teacache'; valid: fbcache (threshold=float in [0, 1] (default 0.08)); taylorseer",
        ),
        ("fbcache:thresh=0.1", "policy fbcache: unknown knob 'thresh'; knobs: threshold=float in [0, 1] (default 0.08)"),
        ("fbcache:threshold=2", "policy fbcache: knob threshold: '2' is not in [0, 1]"),
        ("fbcache:threshold=nan", "is not in [0, 1]"),
        ("fbcache:threshold", "'threshold' is not KEY=VALUE"),
        (
            "taylorseer:interval=2.5",
            "knob interval: expected an integer, got '2.5'; knobs: interval=int in [1, 50] (default 3), warmup=",
        ),
        ("taylorseer:lite=maybe", "knob lite: expected true or false"),
        ("taylorseer:warmup=0", "knob warmup: '0' is not in [1, 1000]"),  # diffusers' TaylorSeer fails on step 0
        ("none:threshold=1", "takes no knobs"),
    ],
)
def test_bad_policy_strings_name_the_policy_and_its_knobs(text, message):
    with pytest.raises(CachePolicyError) as info:
        parse_policy(text)
    assert message in str(info.value)


def test_a_bad_profile_cache_is_a_start_up_error_naming_the_model(tiny_t2i):
    assert build_profile("m", {}, {"cache": ["fbcache@m"]}).cache == "fbcache:threshold=0.08"
    assert build_profile("m", {"cache": "fbcache"}, {"cache": ["none"]}).cache is None
    with pytest.raises(ProfileError, match="--cache for model m: policy fbcache: unknown knob 'warmup'; knobs: threshold="):
        build_profile("m", {}, {"cache": ["fbcache:warmup=2"]})
    with pytest.raises(ModelConfigError, match="--cache for model a: unknown step cache policy 'magcache'; valid: fbcache"):
        resolve_configured(Settings(models=[f"a={tiny_t2i}"], cache=["magcache"]))


def test_cli_refuses_a_bad_cache_before_serving(tiny_t2i):
    result = run_cli("serve", "--model", str(tiny_t2i), "--port", "0", "--cache", "fbcache:threshold=-1")
    assert result.returncode == 2
    assert "policy fbcache: knob threshold: '-1' is not in [0, 1]" in result.stderr


PLAIN = ModelSpec("m", "/models/m", "QwenImagePipeline", "text-to-image")
COMPILED = replace(PLAIN, profile=RunProfile(compile=True))


def test_a_request_cache_is_canonical_or_a_400():
    assert ImageService._cache(GenerationRequest(prompt="p"), PLAIN) is None
    assert ImageService._cache(GenerationRequest(prompt="p", cache="off"), PLAIN) == "none"
    assert ImageService._cache(GenerationRequest(prompt="p", cache="fbcache:threshold=0.1"), PLAIN) == "fbcache:threshold=0.1"
    with pytest.raises(InvalidRequest, match="cache: policy taylorseer: unknown knob 'steps'") as info:
        ImageService._cache(GenerationRequest(prompt="p", cache="taylorseer:steps=3"), PLAIN)
    assert info.value.param == "cache"


def test_a_compiled_model_takes_the_policies_that_hook_around_its_blocks_only():
    full = GenerationRequest(prompt="p", cache="taylorseer")
    assert ImageService._cache(full, PLAIN).startswith("taylorseer:")
    with pytest.raises(InvalidRequest, match="cache: model m is compiled: taylorseer predicts the attention inside") as info:
        ImageService._cache(full, COMPILED)
    assert info.value.param == "cache" and "taylorseer:lite=true or fbcache" in str(info.value)
    for fine in ("taylorseer:lite=true", "fbcache", "none"):
        assert ImageService._cache(GenerationRequest(prompt="p", cache=fine), COMPILED) is not None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cache": "taylorseer"}, "cache for model m: taylorseer predicts the attention inside each block"),
        ({"weights_dtype": "fp8"}, "model m: compile does not combine with weights_dtype=fp8 .* use quantize=fp8"),
        ({"offload": "sequential"}, "model m: compile does not combine with offload=sequential .* use offload=group"),
    ],
)
def test_settings_that_would_run_inside_compiled_blocks_are_start_up_errors(settings, message):
    with pytest.raises(ProfileError, match=message):
        build_profile("m", {"compile": True}, {key: [value] for key, value in settings.items()})
    assert not build_profile("m", {}, {key: [value] for key, value in settings.items()}).compile  # fine without compile
    for fine in ({"cache": "taylorseer:lite=true"}, {"cache": "fbcache"}, {"offload": "group"}, {"offload": "model"}):
        assert build_profile("m", {"compile": True}, {key: [value] for key, value in fine.items()}).compile


def test_job_results_sum_their_tasks_stats():
    tasks = [TaskResult(i, [], 1.0, 2.0, stats={"transformer_calls": 8, "cached_calls": i}) for i in (1, 3)]
    assert JobResult.combine(tasks).stats == {"transformer_calls": 16, "cached_calls": 4}
    stats = ImageService.stats(JobResult([], 10.0, 12.5, []), submitted=9.0)
    assert stats == {"transformer_calls": 0, "cached_calls": 0, "prompt_encodings": 0, "prompt_cache_hits": 0,
                     "pipeline_seconds": 2.5, "queue_seconds": 1.0}  # fmt: skip


def test_variations_run_fewer_denoising_steps():
    assert Job(mode="generate", prompt="p", seeds=[1], num_inference_steps=50).denoising_steps == 50
    assert Job(mode="variation", prompt="p", seeds=[1], num_inference_steps=50, strength=0.6).denoising_steps == 30


# --- cached runs on the tiny model ------------------------------------------------------------

STEPS = 6
JOB = Job(mode="generate", prompt="a red cube", seeds=[7], width=64, height=64, num_inference_steps=STEPS, true_cfg_scale=4.0)
CACHED = "fbcache:threshold=1"  # the tiny model's random blocks change a lot from step to step


@pytest.fixture(scope="module")
def runner(tiny_t2i):
    """A runner whose model profile has a step cache (CACHED)."""
    from qwen_image_server.models.runner import PipelineRunner

    spec = resolve_model(str(tiny_t2i))
    return PipelineRunner(replace(spec, profile=replace(spec.profile, cache=CACHED)), device="cpu")


def _run(runner, job, **kwargs):
    """The image as an array and how many times each block really ran."""
    counts = [0] * len(runner.pipe.transformer.transformer_blocks)
    handles = [
        block.img_mlp.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(runner.pipe.transformer.transformer_blocks)
    ]
    try:
        image = runner.run(job, **kwargs)[0]
    finally:
        for handle in handles:
            handle.remove()
    return np.asarray(image), counts


def test_the_cached_run_skips_blocks_and_counts_its_calls(runner):
    plain, plain_counts = _run(runner, replace(JOB, cache="none"))
    assert plain_counts == [2 * STEPS, 2 * STEPS], "true CFG: a cond and an uncond call per step"
    assert {"transformer_calls": 2 * STEPS, "cached_calls": 0}.items() <= runner.last_stats.items()
    cached, counts = _run(runner, JOB)  # the profile's cache
    assert cached.shape == (64, 64, 3)
    assert counts[0] == 2 * STEPS, "fbcache always runs the first block"
    assert counts[1] < 2 * STEPS
    assert {"transformer_calls": 2 * STEPS, "cached_calls": 2 * STEPS - counts[1]}.items() <= runner.last_stats.items()
    assert not np.array_equal(cached, plain)


def test_never_reusing_gives_exactly_the_uncached_image(runner):
    plain, _ = _run(runner, replace(JOB, cache="none"))
    for never in ("fbcache:threshold=0", "taylorseer:interval=1"):
        image, counts = _run(runner, replace(JOB, cache=never))
        assert np.array_equal(image, plain), never
        assert counts == [2 * STEPS] * 2 and runner.last_stats["cached_calls"] == 0


def test_taylorseer_predicts_attention_between_full_steps(runner):
    plain, _ = _run(runner, replace(JOB, cache="none"))
    image, counts = _run(runner, replace(JOB, cache="taylorseer:interval=2,warmup=2,cooldown=0"))
    # Steps 0-1 warm up, then steps 2 and 4 are predicted, 3 and 5 computed: per branch, 2 of 6 from the cache.
    assert {"transformer_calls": 2 * STEPS, "cached_calls": 4}.items() <= runner.last_stats.items()
    assert counts == [2 * STEPS] * 2, "the blocks' MLPs still run; only attention is predicted"
    assert not np.array_equal(image, plain)


def test_a_request_none_on_a_cached_model_is_the_uncached_image(runner, tiny_t2i):
    from qwen_image_server.models.runner import PipelineRunner

    cached, _ = _run(runner, JOB)
    off, counts = _run(runner, replace(JOB, cache="none"))
    uncached_model = PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu")
    reference, _ = _run(uncached_model, JOB)
    assert np.array_equal(off, reference) and not np.array_equal(cached, reference)
    assert counts == [2 * STEPS] * 2


@pytest.mark.parametrize("policy", [CACHED, "taylorseer:interval=2,warmup=2,cooldown=0,lite=true"])
def test_the_cache_skips_under_group_offload_after_its_first_call(runner, tiny_t2i, monkeypatch, policy):
    """Group offload with CUDA's options (emulated on the CPU, tests/offload_emulation.py) traces the blocks' order
    in the first forward after it is applied, with a hook on each block that it removes afterwards. Removing a hook
    from under one registered later drops the later one from the block's forward chain (diffusers'
    ``HookRegistry.remove_hook``): a step cache applied before that first forward (a model's own policy, from the
    warm-up on) skipped nothing ever after. From the second call on, the image and the counts are the resident
    runner's."""
    from offload_emulation import OffloadEmulation
    from qwen_image_server.models.runner import PipelineRunner

    job = replace(JOB, cache=None)  # the model's own policy
    resident = PipelineRunner(replace(runner.spec, profile=replace(runner.spec.profile, cache=policy)), device="cpu")
    expected, expected_counts = _run(resident, job)
    assert expected_counts[1] < 2 * STEPS or policy != CACHED
    assert resident.last_stats["cached_calls"] > 0
    emulation = OffloadEmulation(monkeypatch)
    offloaded = PipelineRunner(
        replace(runner.spec, profile=replace(runner.spec.profile, cache=policy, offload="group")), device="cpu"
    )
    tracing = offloaded.pipe.transformer._diffusers_hook.get_hook("lazy_prefetch_group_offloading")
    _run(offloaded, job)  # the first call: the one that traces (a GPU worker's warm-up)
    traced = len(tracing.execution_order)
    for _ in range(3):
        with emulation.watching():
            image, counts = _run(offloaded, job)
        assert emulation.used_offloaded == []
        assert counts == expected_counts and offloaded.last_stats["cached_calls"] == resident.last_stats["cached_calls"]
        # the same computation; weights copied by the emulated transfers may take another CPU kernel: a level at most
        assert np.abs(image.astype(np.int16) - expected).max() <= 1
    # and the trace's hooks are gone for good: a stale one left in the blocks' forward (after the cache's hooks were
    # taken off from above it) went on recording every block call of every request, without end
    assert len(tracing.execution_order) == traced


def test_no_cached_state_leaks_into_the_next_request(runner):
    job = replace(JOB, cache="taylorseer:interval=2,warmup=2,cooldown=0")  # its step counters show any leak
    first, _ = _run(runner, job)
    second, _ = _run(runner, job)
    assert np.array_equal(first, second)
    # A cancelled call never reaches diffusers' own reset at the end of the pipeline call:
    # its residuals and step counters must not serve the next request.
    checks = []

    def stop_after_four_steps():
        checks.append(1)
        return len(checks) > 4  # checked once before the call, then at each step's end

    with pytest.raises(TaskCancelled):
        runner.run(replace(job, seeds=[8]), should_stop=stop_after_four_steps)
    after_cancel, _ = _run(runner, job)
    assert np.array_equal(after_cancel, first)


# --- what the cache keeps, and when it lets go -------------------------------------------------
def _kept_bytes(transformer) -> int:
    """Bytes of the tensors the cache hooks' states hold (each storage once)."""
    import torch

    storages: dict[int, int] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            manager = getattr(hook, "state_manager", None)
            for state in manager._state_cache.values() if manager is not None else ():
                walk(vars(state))
    return sum(storages.values())


@pytest.mark.parametrize(
    "policy",
    [
        "taylorseer:interval=2,warmup=2,cooldown=0",
        "taylorseer:interval=2,warmup=2,cooldown=0,order=2",
        "taylorseer:interval=2,warmup=2,cooldown=0,lite=true",
        CACHED,
    ],
)
def test_the_caches_state_is_what_the_plan_counts_and_is_freed_before_the_decode(runner, policy):
    from qwen_image_server.models.working_memory import step_cache_bytes

    pipe, transformer = runner.pipe, runner.pipe.transformer
    calls = []  # (image tokens, text tokens) of each transformer call: cond, then uncond
    at_last_step = []  # bytes kept when the last step ended, before the runner let them go
    at_decode = []
    reset = runner.step_cache.reset

    def measured_reset():
        if len(calls) == 2 * STEPS and not at_last_step:
            at_last_step.append(_kept_bytes(transformer))
        reset()

    def record(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]))

    decode = pipe.vae.decode

    def measured_decode(*args, **kwargs):
        at_decode.append(_kept_bytes(transformer))
        return decode(*args, **kwargs)

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    runner.step_cache.reset, pipe.vae.decode = measured_reset, measured_decode
    try:
        runner.run(replace(JOB, cache=policy))
    finally:
        handle.remove()
        del runner.step_cache.reset, pipe.vae.decode
    config, element = transformer.config, transformer.dtype.itemsize
    (image, cond_text), (_, uncond_text) = calls[:2]
    # one text length per context: half the two-context figure of each
    counted = sum(
        step_cache_bytes(
            policy,
            image,
            text,
            config.num_layers,
            config.num_attention_heads * config.attention_head_dim,
            element,
            out_values=transformer.proj_out.out_features,
        )
        // 2
        for text in (cond_text, uncond_text)
    )
    assert at_last_step == [counted] and counted > 0
    assert at_decode == [0], "the VAE decodes with the cache's state already freed"


def test_a_run_out_of_memory_with_the_full_taylorseer_names_its_state_and_the_lighter_policies(runner):
    """A request's own ``cache=taylorseer`` is not in the memory plan (its state: gigabytes at large sizes): when
    such a run runs out of memory, the client's reason says what the state held and what keeps less."""
    import torch

    from qwen_image_server.errors import OUT_OF_MEMORY, OUT_OF_MEMORY_ADVICE, InferenceFailed, failure_param, short_reason
    from qwen_image_server.models.step_cache import canonical_policy

    def out_of_memory(module, args, kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; details)")

    # inside the transformer's forward, where its first block starts (as a real allocation there would fail)
    handle = runner.pipe.transformer.transformer_blocks[0].register_forward_pre_hook(out_of_memory, with_kwargs=True)
    full_policy = "taylorseer:interval=2,warmup=2,cooldown=0"
    try:
        reasons, params, own = {}, {}, []
        for policy in (full_policy, "taylorseer:lite=true", "fbcache"):
            with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
                runner.run(replace(JOB, cache=policy))
            reasons[policy], params[policy] = short_reason(caught.value, request=True), failure_param(caught.value)
        model_spec = runner.spec
        # the model's own full taylorseer (what the plan counted), asked for, not, or with other knobs but the same state
        runner.spec = replace(model_spec, profile=replace(model_spec.profile, cache=canonical_policy("taylorseer")))
        try:
            for cache in ("taylorseer", None, full_policy):
                with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
                    runner.run(replace(JOB, cache=cache))
                own.append(failure_param(caught.value))
        finally:
            runner.spec = model_spec
    finally:
        handle.remove()
    # out of memory before the first step (the prompt's encoding) or after the state was freed (the final decode):
    # the request's own taylorseer held nothing then
    elsewhere = {}
    for name, component in (("encoding", runner.pipe.text_encoder), ("decoding", runner.pipe.vae.decoder)):
        handle = component.register_forward_pre_hook(out_of_memory, with_kwargs=True)
        try:
            with pytest.raises(torch.cuda.OutOfMemoryError) as caught:  # a prompt of its own: the prompt cache has none
                runner.run(replace(JOB, prompt=f"a blue sphere, {name}", cache=full_policy))
            elsewhere[name] = failure_param(caught.value)
        finally:
            handle.remove()
    full = reasons["taylorseer:interval=2,warmup=2,cooldown=0"]
    assert full.startswith(OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE + "; its step cache, taylorseer, keeps every block's")
    assert full.endswith("here): cache=taylorseer:lite=true or cache=fbcache keeps far less") and "KiB" in full
    assert InferenceFailed(full).message.endswith("keeps far less"), "the model's own policy's 500 keeps the advice whole"
    assert reasons["taylorseer:lite=true"] == reasons["fbcache"] == OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE
    # the request's own policy, not the model's (which the plan counts): its field is named, for a 400
    assert params == {"taylorseer:interval=2,warmup=2,cooldown=0": "cache", "taylorseer:lite=true": None, "fbcache": None}
    assert own == [None, None, None], "the model's own full taylorseer, asked for or not: the server's side"
    assert elsewhere == {"encoding": None, "decoding": None}
    (image,) = runner.run(JOB)  # and the runner goes on
    assert image.size == (64, 64)
