"""Engine settings that one model may have a value of its own for: ``--workers N@MODEL``, ``--queue-size N@MODEL``,
``--task-timeout S@MODEL``, ``--stuck-task-seconds S@MODEL`` and, under ``--engine ray``,
``--ray-gpus-per-replica S@MODEL``.

A plain value (``--queue-size 8``) is every model's; ``VALUE@MODEL`` is one model's and wins for it. In the
environment the per-model values are ``QIS_MODEL_WORKERS``, ``QIS_MODEL_QUEUE_SIZE``, ``QIS_MODEL_TASK_TIMEOUT``,
``QIS_MODEL_STUCK_TASK_SECONDS`` and ``QIS_MODEL_RAY_GPUS_PER_REPLICA``, ';'-separated
(``3@qwen-image;1@qwen-image-edit``). Given twice for one model, the last value counts.

The run-profile settings that take ``VALUE[@MODEL]`` (``--cache fbcache@MODEL``, ``--compile on@MODEL``...) are
named here too, by their Settings fields (``SCOPED_PROFILE_FIELDS``, ``SCOPED_BOOLEANS``); ``models/profile.py``
reads their values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING


@dataclass(frozen=True)
class ScopedNumber:
    """One setting that takes ``VALUE@MODEL``: the Settings field of every model's value, its number type and range."""

    field: str  # workers, queue_size, task_timeout, stuck_task_seconds
    integer: bool
    low: float
    high: float | None = None
    low_included: bool = True

    @property
    def scoped_field(self) -> str:
        """The Settings field holding the ``VALUE@MODEL`` items (``model_workers``...)."""
        return f"model_{self.field}"

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def expected(self) -> str:
        letter = "N" if self.integer else "S"
        above = f"from {self.low:g}" if self.low_included else f"above {self.low:g}"
        upto = f" to {self.high:g}" if self.high is not None else ""
        return f"{letter}@MODEL with {letter} {above}{upto}"

    def parse(self, item: str) -> tuple[str, int | float]:
        """``(model, value)`` of one ``VALUE@MODEL`` item; ``ValueError`` naming the expected form when it is not one."""
        text, sep, model = str(item).partition("@")
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            value = float("nan")
        in_range = (
            math.isfinite(value)
            and (value >= self.low if self.low_included else value > self.low)
            and (self.high is None or value <= self.high)
        )
        if not sep or not model.strip() or not in_range:
            raise ValueError(f"expected {self.expected()}, got {item!r}")
        return model.strip(), value


#: The run-profile settings given as lists of ``VALUE[@MODEL]`` (``compile`` and ``deterministic`` are booleans for
#: every model, ``model_compile`` and ``model_deterministic`` their ``on|off@MODEL`` lists).
SCOPED_PROFILE_FIELDS = (
    "compile_sizes", "cache", "quantize", "cfg_batch", "attention_backend", "weights_dtype", "offload", "vae_tiling",
)  # fmt: skip

#: The on/off run-profile settings: a field of every model's value (``QIS_COMPILE``) and one of per-model values
#: (``model_compile``, ``QIS_MODEL_COMPILE``).
SCOPED_BOOLEANS = ("compile", "deterministic")

#: Every setting that takes ``VALUE@MODEL``, by the field of every model's value.
SCOPED_NUMBERS = {
    "workers": ScopedNumber("workers", integer=True, low=1, high=64),
    "queue_size": ScopedNumber("queue_size", integer=True, low=1, high=100_000),
    "task_timeout": ScopedNumber("task_timeout", integer=False, low=0, low_included=False),
    "stuck_task_seconds": ScopedNumber("stuck_task_seconds", integer=False, low=0),
    # under --engine ray only: a replica's share of a GPU (a replica runs on one GPU at most)
    "ray_gpus_per_replica": ScopedNumber("ray_gpus_per_replica", integer=False, low=0, high=1),
}


def split_items(value: object) -> object:
    """The environment's ``A;B`` as ``[A, B]``; lists as they are."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(";") if part.strip()]
    return value


def own_values(setting: ScopedNumber, items: list[str]) -> dict[str, int | float]:
    """The models given a value of their own, by model id (the last item for a model counts). Read on every request
    (its queue, its timeout): each list of items is parsed once."""
    return dict(_parsed(setting, tuple(items)))


@functools.lru_cache(maxsize=64)
def _parsed(setting: ScopedNumber, items: tuple[str, ...]) -> tuple[tuple[str, int | float], ...]:
    return tuple(setting.parse(item) for item in items)


def split_flag_values(given: list[str]) -> tuple[str | None, list[str]]:
    """A repeatable flag's values as (the last plain value or None, the ``VALUE@MODEL`` ones)."""
    plain = [value for value in given if "@" not in value]
    return (plain[-1] if plain else None), [value for value in given if "@" in value]


class PerModelLimits:
    """The per-model values of ``Settings`` (a base class of it; the fields are Settings'): each model's worker
    count, queue, task timeout and stuck-task limit, its own where given, else every model's."""

    if TYPE_CHECKING:  # Settings' fields
        workers: int
        queue_size: int
        task_timeout: float
        stuck_task_seconds: float
        ray_gpus_per_replica: float | None
        ray_min_replicas: int
        ray_max_replicas: int | None

    def own_values(self, field: str) -> dict[str, int | float]:
        """The models given a ``field`` value of their own (``VALUE@MODEL``; the last one given counts), by model id."""
        setting = SCOPED_NUMBERS[field]
        return own_values(setting, getattr(self, setting.scoped_field))

    def own_workers(self) -> dict[str, int]:
        """The models given a worker count of their own (``--workers N@MODEL``), by model id."""
        return {model: int(count) for model, count in self.own_values("workers").items()}

    def workers_for(self, model: str) -> int:
        """How many workers ``model`` gets: its ``N@MODEL`` value, else ``workers``."""
        return self.own_workers().get(model, self.workers)

    def queue_size_for(self, model: str) -> int:
        """How many of ``model``'s requests may wait for a worker: its ``--queue-size N@MODEL``, else ``queue_size``."""
        return int(self.own_values("queue_size").get(model, self.queue_size))

    def task_timeout_for(self, model: str) -> float:
        """Seconds ``model``'s requests get from acceptance: its ``--task-timeout S@MODEL``, else ``task_timeout``."""
        return float(self.own_values("task_timeout").get(model, self.task_timeout))

    def stuck_task_seconds_for(self, model: str) -> float:
        """How long ``model``'s task told to stop may keep its worker: ``--stuck-task-seconds S@MODEL``, else the
        server's value."""
        return float(self.own_values("stuck_task_seconds").get(model, self.stuck_task_seconds))

    def replicas_for(self, model: str) -> tuple[int, int]:
        """Ray Serve's (min, max) replicas for ``model``: exactly its ``N@MODEL`` value (N replicas, as N workers of
        the embedded engine), else ``ray_min_replicas`` and ``ray_max_replicas`` (default: --workers)."""
        own = self.own_workers().get(model)
        if own is not None:
            return own, own
        return self.ray_min_replicas, self.ray_max_replicas or self.workers
