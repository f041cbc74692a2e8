"""Step caching: reuse transformer work across denoising steps with diffusers' cache hooks.

A *policy string* ``POLICY[:KEY=VALUE,...]`` names one of ``POLICIES`` and sets its
knobs; anything not given takes the default chosen for Qwen-Image's 50-step true-CFG
schedule. It comes from the model's run profile (``--cache``, ``QIS_CACHE``, the
sidecar's ``cache``) or a request's ``cache`` field, and is parsed here without torch
so that a bad one is refused before the port opens (or with a 400).

Offered policies (each a ``diffusers.hooks`` config applied with
``transformer.enable_cache``):

- ``fbcache``: First Block Cache. Every call runs the first block; when its residual
  changed less than ``threshold`` (relative mean absolute difference) since the last
  full call *of the same cache context*, the other blocks are skipped and their cached
  residual is added instead. The Qwen-Image pipelines run cond and uncond under their
  own ``cache_context``, so each branch compares against its own history.
- ``taylorseer``: TaylorSeer. After ``warmup`` full steps, only one step in
  ``interval`` runs the attention layers (or, with ``lite``, the whole block stack);
  the others predict their outputs by a Taylor expansion of order ``order`` from the
  last full steps. The last ``cooldown`` steps always run in full.
- ``none``: no cache.

Not offered: ``MagCache`` needs per-checkpoint magnitude ratios that diffusers only
ships for Flux; ``FasterCache`` skips the unconditional branch of a *batched* CFG
call and computes frequency components of video latents, which the Qwen-Image
pipelines (separate cond/uncond calls on packed image tokens) do not fit.

The worker side (``StepCache``) switches the transformer's cache per job, resets the
hooks' state before and after every pipeline call (a cancelled or failed call never
reaches diffusers' own reset at the end of ``__call__``), and counts the transformer
calls and how many of them were served from the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

NONE_WORDS = ("none", "off", "")


class CachePolicyError(ValueError):
    """A step cache policy string is not valid; the message names the policy and its valid knobs."""


@dataclass(frozen=True)
class Knob:
    """One setting of a policy: its type, default and allowed range, and what it does (for messages and docs)."""

    name: str
    kind: type  # float, int or bool
    default: Any
    low: float | None = None
    high: float | None = None
    help: str = ""

    def describe(self) -> str:
        if self.kind is bool:
            return f"{self.name}=true|false (default {str(self.default).lower()})"
        return f"{self.name}={self.kind.__name__} in [{self.low:g}, {self.high:g}] (default {self.default:g})"

    def parse(self, text: str) -> Any:
        value = text.strip().lower()
        if self.kind is bool:
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        try:
            number = self.kind(value)
        except ValueError:
            raise ValueError(f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}") from None
        if number != number or not self.low <= number <= self.high:  # NaN or out of range
            raise ValueError(f"{text!r} is not in [{self.low:g}, {self.high:g}]")
        return number


#: The policies and their knobs, with defaults for Qwen-Image (50 steps, true CFG).
POLICIES: dict[str, tuple[Knob, ...]] = {
    "fbcache": (
        # 0.08: the middle of the 0.05-0.12 range public FBCache guidance gives for large
        # flow-matching DiTs (higher skips more and costs detail); 0 never reuses.
        Knob("threshold", float, 0.08, 0.0, 1.0, "relative first-block residual change below which the other blocks are skipped"),
    ),
    "taylorseer": (
        # One full step in 3 after 6 warm-up steps, last 2 full: about 2x fewer transformer
        # passes on 50 steps while the early (layout) and final (detail) steps stay exact.
        Knob("interval", int, 3, 1, 50, "one full step in every INTERVAL after warm-up (1: never predict)"),
        # at least 1: a prediction needs a full step before it (diffusers' TaylorSeer fails on step 0 otherwise)
        Knob("warmup", int, 6, 1, 1000, "first steps that always run in full"),
        Knob("cooldown", int, 2, 0, 1000, "last steps that always run in full"),
        Knob("order", int, 1, 1, 4, "order of the Taylor expansion"),
        Knob("lite", bool, False, help="predict only the output projection and skip the whole block stack (least memory)"),
    ),
}


@dataclass(frozen=True)
class CachePolicy:
    """A parsed step cache policy: its name and every knob's value (defaults filled in)."""

    name: str
    knobs: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return dict(self.knobs)[key]

    def canonical(self) -> str:
        """The policy as a string with every knob spelled out (what ``/v1/models`` shows and what runs)."""

        def text(value: Any) -> str:
            return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)

        return f"{self.name}:" + ",".join(f"{key}={text(value)}" for key, value in self.knobs)


def valid_policies() -> str:
    """Every policy with its knobs, for error messages."""
    lines = [f"{name} ({', '.join(knob.describe() for knob in knobs)})" for name, knobs in POLICIES.items()]
    return "; ".join([*lines, "none"])


def parse_policy(text: str | None) -> CachePolicy | None:
    """``POLICY[:KEY=VALUE,...]`` → a ``CachePolicy``; ``None``/``none``/``off`` → ``None`` (no cache).

    Raises ``CachePolicyError`` naming the policy and listing its knobs (or every policy).
    """
    raw = "" if text is None else str(text).strip()
    name, _, rest = raw.partition(":")
    name = name.strip().lower()
    if name in NONE_WORDS:
        if rest.strip():
            raise CachePolicyError(f"policy {name or 'none'!r} takes no knobs, got {rest.strip()!r}")
        return None
    knobs = POLICIES.get(name)
    if knobs is None:
        raise CachePolicyError(f"unknown step cache policy {name!r}; valid: {valid_policies()}")
    by_name = {knob.name: knob for knob in knobs}
    valid = ", ".join(knob.describe() for knob in knobs)
    values = {knob.name: knob.default for knob in knobs}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise CachePolicyError(f"policy {name}: {item!r} is not KEY=VALUE; knobs: {valid}")
        if key not in by_name:
            raise CachePolicyError(f"policy {name}: unknown knob {key!r}; knobs: {valid}")
        try:
            values[key] = by_name[key].parse(value)
        except ValueError as exc:
            raise CachePolicyError(f"policy {name}: knob {key}: {exc}; knobs: {valid}") from None
    return CachePolicy(name, tuple((knob.name, values[knob.name]) for knob in knobs))


def compile_conflict(policy: CachePolicy | None) -> str | None:
    """Why ``policy`` cannot run on a compiled transformer (``--compile``), or None when it can.

    A compiled block is one graph from its input to its output: hooks around a block
    (fbcache, taylorseer's lite form) run outside it, but taylorseer's full form replaces
    the attention inside every block, which would break that graph.
    """
    if policy is not None and policy.name == "taylorseer" and not policy["lite"]:
        return (
            "taylorseer predicts the attention inside each block, which a compiled block (--compile) cannot hook; "
            "use taylorseer:lite=true or fbcache with compile"
        )
    return None


def canonical_policy(text: str | None) -> str | None:
    """The canonical string of a policy string (``None`` for no cache); raises ``CachePolicyError``."""
    policy = parse_policy(text)
    return policy.canonical() if policy else None


def _order_trace_pending(transformer) -> bool:
    """Whether diffusers' group offload, with CUDA's side stream, has yet to trace the order of the transformer's
    blocks: it does so in the first forward after it is applied (a worker's warm-up), with a hook on every block,
    which it removes afterwards. A step cache must not be on during that call: diffusers' ``HookRegistry.remove_hook``
    hands the removed hook's forward to the hook registered after it, in place of that hook's own, so the cache's
    block hooks fell out of the blocks' forward chain (it skipped nothing ever after), and taking the cache off
    later put the removed tracing hook back in the chain (it recorded every block call of every request)."""
    from diffusers.hooks import group_offloading

    # the hook's name is private to diffusers (the value it has had since the trace came in): looked up, not imported
    name = getattr(group_offloading, "_LAZY_PREFETCH_GROUP_OFFLOADING", "lazy_prefetch_group_offloading")
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def diffusers_config(policy: CachePolicy, steps: int, dtype=None):
    """The diffusers cache config of ``policy`` for a run of ``steps`` denoising steps."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if policy.name == "fbcache":
        return FirstBlockCacheConfig(threshold=float(policy["threshold"]))
    if policy.name == "taylorseer":
        cooldown = policy["cooldown"]
        return TaylorSeerCacheConfig(
            cache_interval=policy["interval"],
            disable_cache_before_step=policy["warmup"],
            disable_cache_after_step=max(steps - cooldown, 0) if cooldown else None,
            max_order=policy["order"],
            taylor_factors_dtype=dtype,
            use_lite_mode=policy["lite"],
        )
    raise CachePolicyError(f"unknown step cache policy {policy.name!r}")


class StepCache:
    """The step cache of one transformer: applied per job, reset around every call, counted.

    The text-to-image, img2img and inpaint forms of a model share one transformer, so
    one ``StepCache`` serves all of them.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self._applied: tuple | None = None  # (canonical policy, steps) currently enabled; None: none

    def apply(self, policy: CachePolicy | None, steps: int) -> None:
        """Enable ``policy`` on the transformer (switching from any other), or disable caching for ``None``."""
        key = None if policy is None else (policy.canonical(), steps if policy.name == "taylorseer" else None)
        if key == self._applied:
            return
        if self._applied is not None:
            self.transformer.disable_cache()
            self._applied = None
        if policy is not None:
            self.transformer.enable_cache(diffusers_config(policy, steps, self.transformer.dtype))
            self._applied = key

    def reset(self) -> None:
        """Drop every cached residual and step counter, so nothing carries over to the next call."""
        if self._applied is not None:
            self.transformer._reset_stateful_cache()

    @contextlib.contextmanager
    def run(self, policy: CachePolicy | None, steps: int) -> Iterator[dict[str, int]]:
        """Around one pipeline call: apply ``policy``, reset state, and count the transformer calls.

        Yields a dict that holds ``transformer_calls`` (calls of the transformer as the
        pipeline makes them: two per step with true CFG) and ``cached_calls`` (those whose
        result the step cache served) once the block exits.

        Computed calls are counted in samples: the last block's attention sees the batch it
        computes, and a pipeline call's transformer calls all carry the same batch. So a
        batched CFG call (one batch of two, or its two halves run apart by the split
        attention) counts as the two calls it serves, and a call served from the cache as none.
        """
        # Not while group offload has yet to trace the blocks' order: this call traces it, uncached (``_order_trace_pending``)
        self.apply(None if _order_trace_pending(self.transformer) else policy, steps)
        self.reset()
        stats = {"transformer_calls": 0, "cached_calls": 0}
        per_call = [1]  # the batch of one transformer call, as the pipeline makes it
        samples = [0]  # samples the last block really computed

        def on_call(module, args, kwargs):
            stats["transformer_calls"] += 1
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None:
                per_call[0] = hidden.shape[0]

        def on_last_attention(module, args, output):
            samples[0] += output.shape[0]

        # A hook inside the last block's attention fires only when that attention really runs:
        # the cache hooks replace the forward of the block (fbcache, taylorseer lite) or of the
        # attention module (taylorseer), so a skipped or predicted call never reaches it. A compiled
        # block runs no such hook; it counts its own samples instead (taylorseer's full form, which
        # predicts inside the block, does not run on compiled blocks).
        last_block = self.transformer.transformer_blocks[-1]
        counted = getattr(last_block, "_qis_computed", None)
        handles = [self.transformer.register_forward_pre_hook(on_call, with_kwargs=True)]
        if counted is None:
            handles.append(last_block.attn.to_out[0].register_forward_hook(on_last_attention))
        before = counted.samples if counted is not None else 0
        try:
            yield stats
        finally:
            for handle in handles:
                handle.remove()
            if counted is not None:
                samples[0] = counted.samples - before
            computed = samples[0] // max(per_call[0], 1)
            stats["cached_calls"] = max(stats["transformer_calls"] - computed, 0)
            self.reset()
