"""``--compile``: regional ``torch.compile`` of the transformer, warmed before the worker reports ready.

diffusers' regional compile (``compile_repeated_blocks``) compiles the one
``QwenImageTransformerBlock`` forward that all blocks share. Compiled graphs are
specialised to the shapes they saw, and a Qwen-Image call has two that change:

- the text length (the prompt's tokens, the negative prompt's, and for edit models
  the input image's vision tokens) changes with every request. It is marked
  dynamic (``torch._dynamo.mark_dynamic``) on the tensors that enter the blocks —
  the text stream after ``txt_in`` and the text RoPE frequencies — so that one graph
  serves every prompt length, the negative prompt included, without padding (which
  would force a masked attention kernel) and with no mask to add;
- the image length (the render size; for edits the input's size too) stays static,
  so each size gets kernels made for it. The warm set — ``compile_sizes`` or the
  model's default size — is compiled and run at load; a size outside it compiles
  once on its first request (logged), and later requests at that size are fast.

The batch (``n``) is static too: the warm-up renders one image, so the first ``n>1``
request at a size compiles once more. With batched CFG (``--cfg-batch``) the batch of
two is a graph of its own and so is the unbatched call (requests without CFG): both are
warmed, and the shorter text's length enters the batched graph as a dynamic size too
(``cfg_attention.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import time
from collections.abc import Iterator

import numpy as np

from ..jobs import Job
from .spec import ModelSpec

log = logging.getLogger(__name__)

#: The size warmed when neither ``compile_sizes`` nor the model's folder names one (the server's default size).
DEFAULT_SIZE = "1024x1024"
#: The area edit pipelines resize inputs to (diffusers' ~1 MP), unless the model's folder sets another.
DEFAULT_EDIT_AREA = 1024 * 1024
#: Pixel multiple requests render at (sizes in between are rendered larger and cropped).
SIZE_MULTIPLE = 16
#: Graphs the block forward may hold (sizes × batch sizes); shapes beyond them run eager (``EagerBeyondLimit``).
MIN_RECOMPILE_LIMIT = 64
WARM_PROMPT = "warm-up"
WARM_STEPS = 2


def warm_sizes(spec: ModelSpec) -> list[tuple[int, int]]:
    """The ``(width, height)`` sizes compiled at load, at the multiple of 16 requests render at.

    For text-to-image models these are render sizes; for edit models, sizes of a
    single input image edited at the pipeline's own size (~1 MP at the input's
    aspect ratio), by default a square one of the model's edit area.
    """
    names = spec.profile.compile_sizes
    if not names and spec.can_edit:
        side = math.isqrt(int(spec.options.get("edit_area", DEFAULT_EDIT_AREA)))
        names = (f"{side}x{side}",)
    names = names or (str(spec.options.get("default_size", DEFAULT_SIZE)),)
    up = lambda v: math.ceil(v / SIZE_MULTIPLE) * SIZE_MULTIPLE  # noqa: E731
    sizes = [tuple(up(int(v)) for v in name.lower().split("x")) for name in names]
    return list(dict.fromkeys(sizes))


def warm_jobs(spec: ModelSpec, sizes: list[tuple[int, int]]) -> list[Job]:
    """One job per warm size, through the path requests take: true CFG (the negative prompt's pass), one image.

    With batched CFG that path is one batch of two, so each size also gets a job without
    CFG (``true_cfg_scale`` 1, as Lightning presets run): the unbatched call is a graph of its own.
    """
    scales = (4.0, 1.0) if spec.profile.cfg_batch != "off" else (4.0,)
    jobs = []
    for width, height in sizes:
        for scale in scales:
            job = Job(mode="generate", prompt=WARM_PROMPT, seeds=[0], num_inference_steps=WARM_STEPS, true_cfg_scale=scale)
            if spec.can_edit:
                job.mode = "edit"
                job.images = [np.full((height, width, 3), 127, dtype=np.uint8)]
            else:
                job.width, job.height = width, height
            jobs.append(job)
    return jobs


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def raise_recompile_limits(graphs: int) -> None:
    """Let the shared block forward hold ``graphs`` graphs (dynamo's default is 8; past the limit, ``EagerBeyondLimit``)."""
    import torch._dynamo.config as config

    limit = max(MIN_RECOMPILE_LIMIT, graphs)
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * limit)


def mark_text_dynamic(transformer) -> list:
    """Mark the text length dynamic on what enters the compiled blocks; returns the hook handles.

    The blocks get the text stream from ``txt_in`` and the text RoPE frequencies from
    ``pos_embed`` (both run eagerly), so forward hooks on those two mark the tensors
    before each block call. A length of 1 is left alone (torch specialises sizes 0/1).
    """
    import torch

    def text_stream(module, args, output):
        if output.shape[1] > 1:
            torch._dynamo.mark_dynamic(output, 1)

    def rope(module, args, kwargs, output):
        txt_freqs = output[1]
        if txt_freqs.shape[0] > 1:
            torch._dynamo.mark_dynamic(txt_freqs, 0)

    return [
        transformer.txt_in.register_forward_hook(text_stream),
        transformer.pos_embed.register_forward_hook(rope, with_kwargs=True),
    ]


def _own_forward(block) -> tuple[object, str]:
    """Where ``block``'s own forward is referenced: under any diffusers hooks registered on it so far.

    diffusers' ``HookRegistry`` keeps the chain of a module's hooks as function
    references; the first one registered holds the module's forward (as
    ``original_forward`` when that hook replaces the forward, else as ``forward``).
    Without hooks, it is the module's ``forward`` attribute.
    """
    refs = getattr(getattr(block, "_diffusers_hook", None), "_fn_refs", None) or []
    if not refs:
        return block, "forward"
    first = refs[0]
    return first, "original_forward" if first.original_forward is not None else "forward"


def compile_transformer(transformer) -> int:
    """Regional compile of the transformer blocks, static except for the text length; returns how many.

    Each block's own forward is compiled, not its whole call: hooks on the block (group
    offload's onload, step caches registered later per request) stay outside the graph,
    in Python around it, so their data-dependent decisions and transfers cannot break a
    full graph (diffusers' ``compile_repeated_blocks`` compiles the call, hooks included).
    The 60 blocks share one compiled graph (torch treats their parameters as inputs).
    """
    import torch

    mark_text_dynamic(transformer)
    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        holder, attr = _own_forward(block)
        eager = getattr(holder, attr)
        compiled: EagerBeyondLimit | CountedForward = EagerBeyondLimit(torch.compile(eager, fullgraph=True, dynamic=False), eager)
        if block is blocks[-1]:  # read by the step cache: hooks inside a compiled block do not fire
            compiled = block._qis_computed = CountedForward(compiled)
        setattr(holder, attr, compiled)
    return len(blocks)


class EagerBeyondLimit:
    """A block's compiled forward that runs eager once the blocks hold as many graphs as torch allows. With
    ``fullgraph=True`` torch does not fall back by itself: a shape that would need one more graph raised
    ``FailOnRecompileLimitHit``, and every request at a new size or ``n`` failed once a long-running server had
    compiled that many. The first such call switches this process to torch's ``eager_on_recompile`` stance: shapes
    already compiled keep their graphs, new ones run eager, and nothing compiles any more."""

    def __init__(self, compiled, eager):
        functools.update_wrapper(self, eager, updated=())
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args, **kwargs):
        import torch
        from torch._dynamo.exc import FailOnRecompileLimitHit

        try:
            return self.compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:
            import torch._dynamo.config as config

            log.warning(
                "the compiled transformer blocks hold as many graphs as torch allows (%d): shapes not compiled yet "
                "run eager from now on (compile_sizes warms the ones that matter)", config.recompile_limit,
            )  # fmt: skip
            torch.compiler.set_stance("eager_on_recompile")
            return self.eager(*args, **kwargs)


class CountedForward:
    """A block's compiled forward that counts the samples it computes (its calls, by their batch): what the last
    block really computed, not skipped by a step cache. A forward hook on a layer inside the block cannot count
    them: the compiled graph does not run hooks registered after it was traced."""

    def __init__(self, forward):
        functools.update_wrapper(self, forward, updated=())  # its name and signature; not the compiled wrapper's state
        self.forward = forward
        self.samples = 0

    def __call__(self, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.samples += hidden.shape[0] if hidden is not None else 1
        return self.forward(*args, **kwargs)


def compile_and_warm(runner) -> None:
    """Compile ``runner``'s transformer and run the warm set, so that requests in it never compile.

    Called from the runner's constructor: the worker reports ready only after it
    returns, so ``/ready`` stays 503 until the warm-up is done.
    """
    spec: ModelSpec = runner.spec
    sizes = warm_sizes(spec)
    raise_recompile_limits(4 * len(sizes))
    started, graphs = time.perf_counter(), graph_count()
    compile_transformer(runner.pipe.transformer)
    warming = _WARMING.set(True)  # these compile by design: one line below says so, not one per job
    try:
        for job in warm_jobs(spec, sizes):
            runner.run(job)
    finally:
        _WARMING.reset(warming)
    names = ", ".join(f"{w}x{h}" for w, h in sizes)
    what = "input sizes" if spec.can_edit else "sizes"
    elapsed, new = time.perf_counter() - started, graph_count() - graphs
    log.info("compiled %s and warmed %s %s in %.1fs (%d graphs)", spec.id, what, names, elapsed, new)


def warm_eager(runner) -> None:
    """One short run of an eager model on a GPU before the worker reports ready: CUDA loads kernels on their first
    use, cuBLAS and cuDNN make their handles and workspaces, and the caching allocator grows to the activations of
    the model's largest warm size there, so that the first request does not pay for them. A run with true CFG at the
    model's first warm size (``warm_sizes``), two steps; on the CPU nothing of that is lazy, so CPU workers skip it."""
    spec: ModelSpec = runner.spec
    started = time.perf_counter()
    sizes = warm_sizes(spec)
    runner.run(warm_jobs(spec, sizes[:1])[0])
    width, height = sizes[0]
    log.info("warmed %s at %dx%d in %.1fs (eager)", spec.id, width, height, time.perf_counter() - started)


#: True while ``compile_and_warm`` runs the warm set.
_WARMING: contextvars.ContextVar[bool] = contextvars.ContextVar("warming", default=False)


@contextlib.contextmanager
def logged_compiles(spec: ModelSpec, job: Job) -> Iterator[None]:
    """Log a request that compiled (a size or batch outside the warm set), so slow first requests are explained."""
    if not spec.profile.compile or _WARMING.get():
        yield
        return
    before, started = graph_count(), time.perf_counter()
    yield
    if (new := graph_count() - before) > 0:
        size = f"{job.width}x{job.height}" if job.width and job.height else "the input's size"
        elapsed = time.perf_counter() - started
        log.info("%s: %s at %s, n=%d compiled %d new graph(s) in a %.1fs call", spec.id, job.mode, size, job.n, new, elapsed)
