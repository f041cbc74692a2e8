"""``--compile``: the warm set, and a compiled tiny model that never recompiles for it (inductor on CPU).

Compiling is slow on a small CPU, so one compiled runner (two warm sizes) is shared by
the module, and only the test of a size outside the warm set compiles once more.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from qwen_image_server.config import Settings
from qwen_image_server.errors import TaskCancelled
from qwen_image_server.jobs import Job
from qwen_image_server.models.compile import graph_count, raise_recompile_limits, warm_jobs, warm_sizes
from qwen_image_server.models.configured import resolve_configured
from qwen_image_server.models.profile import RunProfile
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model

pytestmark = pytest.mark.timeout(900)  # inductor on a small shared CPU: minutes for the first (uncached) compile

WARM = ("256x256", "128x128")
PROMPTS = ("a cat", "a red cube on a wooden table, studio light, " * 2, "a long and detailed prompt about a city at night " * 8)


def _compiled(spec, sizes=()):
    return replace(spec, profile=RunProfile(compile=True, compile_sizes=tuple(sizes)))


# --- the warm set (no compiling) ------------------------------------------------------------
def test_warm_sizes_default_to_the_models_default_size(tiny_t2i):
    spec = resolve_model(str(tiny_t2i))
    assert warm_sizes(_compiled(spec)) == [(256, 256)]  # the folder's default_size
    assert warm_sizes(_compiled(replace(spec, options={}))) == [(1024, 1024)]
    assert warm_sizes(_compiled(spec, ["1000x600", "1328x1328", "1008x608"])) == [(1008, 608), (1328, 1328)]  # render sizes


def test_edit_models_warm_a_square_input_of_their_edit_area(tiny_edit):
    spec = _compiled(resolve_model(str(tiny_edit)))
    assert warm_sizes(spec) == [(256, 256)]  # the tiny edit area is 256²; real models 1024²
    (job,) = warm_jobs(spec, warm_sizes(spec))
    assert (job.mode, job.width, job.height, job.images[0].shape) == ("edit", None, None, (256, 256, 3))
    assert job.true_cfg_scale > 1 and job.n == 1


def test_server_default_size_is_the_warm_default(tiny_t2i, tiny_edit):
    t2i, edit = resolve_configured(Settings(models=[f"a={tiny_t2i}", f"b={tiny_edit}"], compile=True, default_size="512x512"))
    assert t2i.profile.compile_sizes == ("256x256",)  # the folder's own default wins over the server's
    assert edit.profile.compile_sizes == ()  # edits warm their input size (see above)
    (plain,) = resolve_configured(Settings(models=[f"a={tiny_t2i}"], compile=False))
    assert plain.profile.compile_sizes == ()


def test_recompile_limits_are_raised_never_lowered():
    import torch._dynamo.config as config

    saved = config.recompile_limit, config.accumulated_recompile_limit
    try:
        config.recompile_limit = 8
        raise_recompile_limits(100)
        assert config.recompile_limit == 100 and config.accumulated_recompile_limit >= 800
        raise_recompile_limits(4)
        assert config.recompile_limit == 100
    finally:
        config.recompile_limit, config.accumulated_recompile_limit = saved


def test_what_a_compiler_raised_while_compiling_is_the_reason():
    """torch.compile wraps what its backend raised in dynamo's BackendCompilerFailed, whose first line is only
    "backend='...' raised:": running out of memory while inductor compiled (autotuning) was not named so, and the
    reason said nothing of the cause."""
    import torch

    from qwen_image_server.errors import OUT_OF_MEMORY, OUT_OF_MEMORY_ADVICE, is_out_of_memory, short_reason

    def compile_error(raised: BaseException) -> BaseException:
        def backend(graph, example_inputs):
            raise raised

        try:
            torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
        except Exception as exc:
            return exc
        raise AssertionError("the compile did not fail")

    out_of_memory = compile_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert type(out_of_memory).__name__ == "BackendCompilerFailed"
    assert is_out_of_memory(out_of_memory) and short_reason(out_of_memory, request=True) == OUT_OF_MEMORY + OUT_OF_MEMORY_ADVICE
    no_triton = compile_error(RuntimeError("Cannot find a working triton installation"))
    assert not is_out_of_memory(no_triton)
    assert short_reason(no_triton) == "RuntimeError: Cannot find a working triton installation"


# --- a compiled tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled(tiny_t2i):
    """The compiled runner; ``warm_log``: what the compile module logged while it was made."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("qwen_image_server.models.compile")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    before = graph_count()
    try:
        runner = PipelineRunner(_compiled(resolve_model(str(tiny_t2i)), WARM), device="cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert graph_count() - before == len(WARM)  # one graph per warm size covers the prompt and the negative prompt
    runner.warm_log = [record.getMessage() for record in records]  # type: ignore[attr-defined]
    return runner


def test_the_warm_up_logs_one_line_not_one_per_compiled_job(compiled):
    """ "compiled N new graph(s)" is the sign of a request outside the warm set (README): the warm-up's own jobs,
    which compile by design, do not log it; one line says what was warmed."""
    assert [line for line in compiled.warm_log if "new graph(s)" in line] == []
    assert [line for line in compiled.warm_log if " and warmed sizes " in line] != []


@pytest.fixture(scope="module")
def eager(tiny_t2i):
    return PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu")


def _job(size: str, prompt: str, steps: int = 2, **kw) -> Job:
    width, height = map(int, size.split("x"))
    return Job(mode="generate", prompt=prompt, seeds=[7], width=width, height=height, num_inference_steps=steps, **kw)


def _close(a, b) -> None:
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_warmed_sizes_never_recompile_whatever_the_prompt_length(compiled):
    lengths = {compiled.count_tokens(p) for p in PROMPTS}
    assert len(lengths) == 3
    before = graph_count()
    for size in WARM:
        for prompt in PROMPTS:
            (image,) = compiled.run(_job(size, prompt))
            assert image.size == tuple(map(int, size.split("x")))
            assert {
                "transformer_calls": 4,
                "cached_calls": 0,
            }.items() <= compiled.last_stats.items()  # counted on compiled blocks too
        compiled.run(_job(size, PROMPTS[1], true_cfg_scale=1.0))  # no negative prompt pass
    previews = []
    compiled.run(_job(WARM[0], PROMPTS[2], steps=3, partial_images=1), on_partial=lambda *a: previews.append(a))
    assert len(previews) == 1  # the preview hook on the transformer works with compiled blocks
    assert graph_count() == before


def test_compiled_images_match_eager(compiled, eager):
    for size, prompt in ((WARM[0], PROMPTS[0]), (WARM[1], PROMPTS[2])):
        _close(compiled.run(_job(size, prompt))[0], eager.run(_job(size, prompt))[0])


def test_cancellation_still_stops_a_compiled_run(compiled):
    steps = []

    def stop():
        steps.append(1)
        return len(steps) > 1

    before = graph_count()
    with pytest.raises(TaskCancelled):
        compiled.run(_job(WARM[0], PROMPTS[0], steps=4), should_stop=stop)
    assert len(steps) == 2 and graph_count() == before


def test_a_size_outside_the_warm_set_compiles_once_and_is_right(compiled, eager, caplog):
    caplog.set_level(logging.INFO, logger="qwen_image_server.models.compile")
    before = graph_count()
    (image,) = compiled.run(_job("192x128", PROMPTS[0]))
    assert image.size == (192, 128)
    assert graph_count() > before
    assert "generate at 192x128, n=1 compiled" in caplog.text
    _close(image, eager.run(_job("192x128", PROMPTS[0]))[0])
    after = graph_count()
    compiled.run(_job("192x128", PROMPTS[2]))
    assert graph_count() == after


def test_past_torchs_recompile_limit_new_sizes_run_eager_and_compiled_ones_stay(compiled, eager, caplog):
    """With full graphs torch does not fall back to eager at its recompile limit: a new shape raised, and a server
    that had compiled that many shapes failed every request at a new size. Now such a request runs eager (right, and
    logged once), and the sizes compiled before keep their graphs. (The limit is set low here; 64 or more in use.)"""
    import torch
    import torch._dynamo.config as config

    caplog.set_level(logging.WARNING, logger="qwen_image_server.models.compile")
    saved = config.recompile_limit
    config.recompile_limit = 1  # the module's runner holds at least its two warm sizes' graphs
    try:
        before = graph_count()
        (image,) = compiled.run(_job("160x96", PROMPTS[0]))
        assert image.size == (160, 96) and graph_count() == before
        _close(image, eager.run(_job("160x96", PROMPTS[0]))[0])
        assert caplog.text.count("hold as many graphs as torch allows (1)") == 1
        compiled.run(_job("96x160", PROMPTS[1]))  # the next new size: eager at once, nothing raised or logged again
        assert caplog.text.count("as many graphs") == 1
        compiled.run(_job(WARM[0], PROMPTS[2]))  # a warmed size: its compiled graph, no new one
        assert graph_count() == before
    finally:
        config.recompile_limit = saved
        torch.compiler.set_stance("default")


def test_batched_cfg_compiles_once_per_path_for_every_prompt_and_negative_length(tiny_t2i, eager):
    """--compile with --cfg-batch on: the batch of two (either text the longer) and the unbatched call are warmed;
    no prompt or negative prompt length compiles again, and the images are the eager ones."""
    spec = resolve_model(str(tiny_t2i))
    spec = replace(spec, profile=RunProfile(compile=True, compile_sizes=(WARM[1],), cfg_batch="on"))
    before = graph_count()
    runner = PipelineRunner(spec, device="cpu")
    assert graph_count() - before == 2  # the batched CFG call and the unbatched one
    before = graph_count()
    negatives = (" ", "blurry, low quality, watermark, jpeg artefacts, overexposed, extra fingers, deformed hands")
    for prompt in PROMPTS:
        for negative in negatives:
            runner.run(_job(WARM[1], prompt, negative_prompt=negative))
    runner.run(_job(WARM[1], "a cat", negative_prompt="a dog"))  # texts of one length
    (image,) = runner.run(_job(WARM[1], PROMPTS[1], true_cfg_scale=1.0))  # no negative prompt pass
    assert graph_count() == before
    _close(image, eager.run(_job(WARM[1], PROMPTS[1], true_cfg_scale=1.0))[0])
    batches: list[int] = []
    handle = runner.pipe.transformer.img_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    job = _job(WARM[1], PROMPTS[0], negative_prompt=negatives[1])
    try:
        (image,) = runner.run(job)
    finally:
        handle.remove()
    assert batches == [2, 2], "one batched call per step"
    assert {
        "transformer_calls": 4,
        "cached_calls": 0,
    }.items() <= runner.last_stats.items()  # counted on the compiled block, by batch
    _close(image, eager.run(job)[0])


def test_step_cache_and_group_offload_hooks_run_around_the_compiled_blocks(tiny_t2i):
    """Their hooks wrap each block's compiled forward: the model warms up, steps are served from the cache (and
    counted), another policy per request swaps the hooks, and nothing recompiles."""
    profile = RunProfile(compile=True, compile_sizes=(WARM[1],), cache="fbcache:threshold=1", offload="group")
    runner = PipelineRunner(replace(resolve_model(str(tiny_t2i)), profile=profile), device="cpu")
    before = graph_count()
    for prompt in PROMPTS:
        runner.run(_job(WARM[1], prompt, steps=4))
        assert runner.last_stats["transformer_calls"] == 8
        assert 0 < runner.last_stats["cached_calls"] < 8, runner.last_stats
    runner.run(_job(WARM[1], PROMPTS[0], steps=4, cache="none"))
    assert {"transformer_calls": 8, "cached_calls": 0}.items() <= runner.last_stats.items()
    runner.run(_job(WARM[1], PROMPTS[0], steps=4, cache="taylorseer:lite=true,warmup=1,interval=2,cooldown=0"))
    assert runner.last_stats["cached_calls"] > 0
    assert graph_count() == before
