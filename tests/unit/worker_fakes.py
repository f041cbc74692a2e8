"""A stand-in for ``PipelineRunner`` and the engine's end of a worker's pipe, for test_worker.py and
test_worker_loading.py."""

from __future__ import annotations

import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from PIL import Image

from qwen_image_server.engine.worker import Cancel, Done, Failed
from qwen_image_server.errors import TaskCancelled
from qwen_image_server.jobs import Job

#: torch's message for a CUDA out-of-memory error (one line, as torch 2.x writes it).
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free. "
    "Process 4242 has 78.12 GiB memory in use. Of the allocated memory 75.01 GiB is allocated by PyTorch, and 1.50 GiB "
    "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


def _torch():
    """torch, imported when a fake runner is made or fails, not when a test module imports this one: collecting the
    suite imports every test module in each test process, most of which never need torch."""
    import torch

    return torch


WAIT = 30.0  # seconds any one message may take


class _Unencodable:
    """A preview whose encoding fails (as one may run out of host memory)."""

    size = (8, 8)

    def convert(self, mode: str):
        raise MemoryError()


@dataclass
class FakeRunner:
    """What ``Worker`` uses of a ``PipelineRunner``. Prompts steer it: "boom" raises, "wait" runs until cancelled."""

    device: str = "cpu"
    dtype: Any = field(default_factory=lambda: _torch().float32)
    last_stats: dict = field(default_factory=dict)
    last_prompt_tokens: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    memory: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(summary=lambda: {"offload": "none"}))
    speed: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(info={"compile": False}))
    determinism: dict = field(default_factory=lambda: {"deterministic": False})
    #: the last failed call's working tensor (a weak reference): what a pipeline's frames hold when it raises
    held: weakref.ref | None = None

    def run(self, job: Job, should_stop, on_partial) -> list[Image.Image]:
        self.started.set()
        for index in range(job.n):
            for step in range(job.partial_images):
                unencodable = job.prompt == "bad preview" and step == 0
                on_partial(index, step, _Unencodable() if unencodable else Image.new("RGB", (8, 8)))
        if job.prompt in ("boom", "oom", "oom-cache"):
            torch = _torch()
            working = torch.zeros(4)
            self.held = weakref.ref(working)
            if job.prompt == "boom":
                raise RuntimeError("boom\nsecond line")
            error = torch.cuda.OutOfMemoryError(CUDA_OOM)
            if job.prompt == "oom-cache":  # as the pipeline runner marks a request's own full taylorseer
                error.qis_advice, error.qis_param = "; its step cache, taylorseer, ...", "cache"  # type: ignore[attr-defined]
            raise error
        if job.prompt == "wait":  # like the pipeline between its steps: poll until told to stop
            deadline = time.monotonic() + WAIT
            while not should_stop():
                assert time.monotonic() < deadline, "the task was never cancelled"
                time.sleep(0.01)
            raise TaskCancelled()
        self.last_stats = {"transformer_calls": 2 * job.num_inference_steps}
        self.last_prompt_tokens = self.count_tokens(job.prompt)
        return [Image.new("RGB", (job.width or 16, job.height or 16), (seed % 256, 0, 0)) for seed in job.seeds]

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def warm_up(self) -> None:
        pass


def spec(model: str, deterministic: bool = False) -> SimpleNamespace:
    """What the worker reads of a ``ModelSpec`` before its (stubbed) runner loads it."""
    return SimpleNamespace(id=model, profile=SimpleNamespace(deterministic=deterministic))


def job(prompt: str = "a red square", **fields) -> Job:
    return Job(mode="generate", prompt=prompt, seeds=[3, 4], width=24, height=16, num_inference_steps=2, **fields)


def recv(conn):
    assert conn.poll(WAIT), "no message from the worker"
    return conn.recv()


def until_finished(conn, task_id: int) -> list:
    """Messages up to and including the task's ``Done`` or ``Failed``."""
    messages = []
    while True:
        message = recv(conn)
        messages.append(message)
        if isinstance(message, Done) and message.result.task_id == task_id:
            return messages
        if isinstance(message, Failed) and message.task_id == task_id:
            return messages


def stub_runner(monkeypatch, pipeline_runner) -> None:
    """Make ``pipeline_runner`` what the worker and the Ray replica import as ``PipelineRunner``: a stand-in module in
    place of ``qwen_image_server.models.runner``, whose import (torch, diffusers, transformers: seconds) tests of
    their own logic do not need."""
    module = types.ModuleType("qwen_image_server.models.runner")
    module.PipelineRunner = pipeline_runner  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)


class FakeWorkerProcess:
    """What a model's pool (``engine/model_pool.py`` ``ModelPool``) uses of a ``WorkerProcess``: its state, what it is sent
    (``sent``), ``kill()``, and ``exit(code)``, its process ending. ``stops``: it answers a ``Cancel`` as a worker
    between two steps does; otherwise it never answers, as one stuck in a call that does not return."""

    def __init__(self, pool, slot: int = 0, state: str = "idle", stops: bool = False):
        self.pools, self.owner, self.slot, self.name = [pool], pool, slot, f"m#{slot}"
        self.device = "fake"  # started as a GPU worker would be (spawned): nothing to prepare
        self.state, self.running, self.infos, self.stops = state, None, {}, stops
        self.sent: list = []
        self.exitcode: int | None = None
        self.killed = False
        self.forkserver_gone = False
        self.process = self

    def send(self, message) -> None:
        self.sent.append(message)
        if isinstance(message, Cancel) and self.stops:
            pool = self.owner
            pool.loop.call_soon(pool.on_message, self, Failed(message.task_id, "cancelled", cancelled=True))

    def alive(self) -> bool:
        return self.exitcode is None and not self.killed

    def is_alive(self) -> bool:  # ``process.is_alive()``: what the forkserver says (255 once it is gone)
        return self.alive() and not self.forkserver_gone

    def kill(self) -> None:
        self.killed = True

    def error(self) -> str | None:
        return next((info["error"] for info in self.infos.values() if "error" in info), None)

    def describe(self, pool=None) -> dict:
        return {"name": self.name, "state": self.state}

    def exit(self, code: int) -> None:
        self.exitcode = code
        self.owner.on_exit(self)
