"""LoRAs in a worker: loaded once with the pipeline, switched per call, each with its preset's scheduler.

Three ways a LoRA runs (see ``lora.py`` for the flag):

- fused (``fuse=true``): merged into the base weights at load (``fuse_lora``, then the
  adapter weights are unloaded); every call runs it, at the base model's speed.
- hot-swapped, eager transformer: each LoRA is a named PEFT adapter; a call activates
  its own (``set_adapters``) or none (``disable_lora``: the base layers alone, so base
  images are bit-exact). Switching flips flags on the LoRA layers: no weight moves.
- hot-swapped, compiled transformer (``--compile``): flipping adapters would change the
  graph and recompile it, so the model gets one adapter slot, prepared with diffusers'
  ``enable_lora_hotswap(target_rank=...)`` before the first load (ranks padded, scalings
  as tensors), and a switch copies the LoRA's weights into the slot in place
  (``hotswap=True``); for the base model the slot holds zeros. No recompilation; a
  switch costs one copy of the LoRA's weights on the device. LoRAs must be loaded before
  the transformer is compiled.

A ``PipelineRunner`` has one owner, so swapping ``pipe.scheduler`` for one call is safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator

from .lora import LoraError, preset_for
from .profile import RunProfile, transformer_fp8_stored

log = logging.getLogger(__name__)

#: The adapter name of the single slot used when the transformer is compiled.
SLOT = "hotswap_slot"


class LoraSet:
    """The LoRAs of one loaded pipeline, and what a call for one of them (or none) must switch."""

    def __init__(self, pipe, profile: RunProfile, run_dtype=None, home: str | None = None):
        """``home``: where the transformer's weights live once loaded (default: where they are now; under
        ``quantize=int4`` it is read on the CPU and moved after its LoRAs), and the slot's LoRAs are kept."""
        self.pipe = pipe
        self.home = home
        self.profile = profile
        self.by_name = {lora.name: lora for lora in profile.loras}
        # peft's adapter names are module names (no "."): a LoRA served as "lightning-v1.0" is adapter "lora0"
        self.adapter = {lora.name: f"lora{index}" for index, lora in enumerate(profile.loras)}
        self.swapped = [lora for lora in profile.loras if not lora.fuse]
        self.hotswap = bool(self.swapped) and profile.compile
        self.current: tuple[str, float] | None = None  # the active adapter and its scale; None: the base weights
        self._schedulers: dict[str, object] = {}
        self._weights: dict[str | None, dict] = {}  # each slot LoRA's state dict and scaling (None: the base model)
        self._slot: tuple = ({}, 0, None)  # the slot's layout, rank and device (``_load_slot``)
        fused = [lora for lora in profile.loras if lora.fuse]
        if fused:
            self._fuse(fused)
        if self.hotswap:
            self._load_slot()
        elif self.swapped:
            for lora in self.swapped:
                self._load(lora.path, self.adapter[lora.name], regroup=False)
            if transformer_fp8_stored(profile) and run_dtype is not None:
                _adapters_in(pipe.transformer, run_dtype)
            from .offload import regroup_offloaded

            regroup_offloaded(pipe.transformer)  # the adapters, in the dtype they run in, join their blocks' groups
            pipe.transformer.disable_lora()
        for lora in profile.loras:
            log.info("LoRA %s (rank %d, scale %g) %s", lora.name, lora.rank, lora.scale,
                     "fused" if lora.fuse else "slot hot-swap" if self.hotswap else "adapter")  # fmt: skip

    def _load(self, path, adapter_name: str, regroup: bool = True) -> None:
        """A LoRA file into the transformer as ``adapter_name`` (what ``pipe.load_lora_weights`` does, through
        ``_into_transformer``)."""
        state, metadata = self.pipe.lora_state_dict(path, return_lora_metadata=True)
        if not all("lora" in key for key in state):
            raise LoraError(f"{path}: not a LoRA checkpoint (a tensor name without 'lora')")
        self._into_transformer(state, adapter_name, metadata=metadata, regroup=regroup)

    def _into_transformer(
        self, state: dict, adapter_name: str, metadata=None, hotswap: bool = False, regroup: bool = True
    ) -> None:
        """Load (or, ``hotswap``, copy in place) LoRA weights into the transformer, leaving the pipeline's offload as
        it is.

        diffusers' loaders, given the pipeline, take every component's offload hooks off and put them back after:
        under group offload each group of the transformer, the text encoder and the VAE is made anew (the text
        encoder's token embeddings, kept on the device by ``offload.group_offload``, become a group of their own
        again), under model offload the whole chain (every component moved to the CPU). Only the transformer
        changes, and a swap changes no layer at all: the slot's weights are copied into what is there (under group
        offload, the offloaded copies, which the next onload reads). So the pipeline is passed only under
        sequential offload, whose hooks leave the weights on no device while they are on; a new adapter's layers
        join their blocks' groups by making the transformer's groups again (``regroup``; nothing without group
        offload). A swap writes the offloaded copies: a group still on the device (one a step cache's skipped
        blocks left there after the last call) is put back first, or the swap would go to its device copy only and
        the next onload would read the LoRA before."""
        from .offload import offload_groups, regroup_offloaded

        sequential = self.profile.offload == "sequential"
        if hotswap and not sequential:
            offload_groups(self.pipe.transformer)
        with warnings.catch_warnings():  # peft's warning for every adapter after the first, which a LoraSet means
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            self.pipe.load_lora_into_transformer(
                state, transformer=self.pipe.transformer, adapter_name=adapter_name, metadata=metadata,
                hotswap=hotswap, _pipeline=self.pipe if sequential else None,
            )  # fmt: skip
        if regroup and not (hotswap or sequential):
            regroup_offloaded(self.pipe.transformer)

    def _fuse(self, fused) -> None:
        pipe = self.pipe
        names = [self.adapter[lora.name] for lora in fused]
        for lora in fused:
            self._load(lora.path, self.adapter[lora.name])
        pipe.set_adapters(names, [lora.scale for lora in fused])
        pipe.fuse_lora(components=["transformer"], adapter_names=names)
        pipe.unload_lora_weights()  # the merged weights stay; the adapter layers go

    def _load_slot(self) -> None:
        """One adapter slot covering every LoRA's layers at one rank, zero until a LoRA is swapped in.

        Every LoRA goes in laid out the same way (``_uniform``): each layer any LoRA targets, at the largest rank,
        zero where it has none, its scaling folded into B. peft checks on every swap that the new adapter's config
        matches the slot's, and a LoRA of other layers or ranks (or its own alpha or dropout) derived another config
        (rank and alpha patterns): the swap failed, diffusers deleted the slot, and later requests for a LoRA ran
        without it, as the base model. One layout, one config, no such failure."""
        import torch

        pipe = self.pipe
        rank = max(lora.rank for lora in self.swapped)
        pipe.enable_lora_hotswap(target_rank=rank)
        device = self.home or pipe.transformer.device
        loaded = {lora.name: pipe.lora_state_dict(lora.path, return_lora_metadata=True) for lora in self.swapped}
        layout: dict[str, tuple[int, int, object]] = {}  # layer -> (in features, out features, dtype)
        for name, (state, _) in loaded.items():
            for key, value in state.items():
                layer, _, part = key.partition(".lora_")
                if part not in ("A.weight", "B.weight"):
                    raise LoraError(f"LoRA {name}: its tensor {key} does not fit the compiled model's adapter slot")
                known = layout.get(layer, (0, 0, value.dtype))
                shape = (value.shape[1], known[1]) if part == "A.weight" else (known[0], value.shape[0])
                # the widest of the LoRAs' dtypes: a half-precision LoRA listed first rounded the others' weights
                layout[layer] = (*shape, torch.promote_types(known[2], value.dtype))
        # Each LoRA is kept as it is (on the device) with its scaling, and laid out for a swap only: the laid-out
        # copies (every layer at the largest rank; zeros for the base model) would take as much memory per LoRA.
        for name, (state, metadata) in loaded.items():
            self._weights[name] = {"state": {k: v.to(device) for k, v in state.items()}, "scaling": _scaling(name, metadata)}
        self._weights[None] = {"state": {}, "scaling": 1.0}  # the base model: zeros everywhere
        self._slot = (layout, rank, device)
        self._into_transformer(self._laid_out(None, 1.0), SLOT)

    def _laid_out(self, name: str | None, factor: float) -> dict:
        """``name``'s LoRA (None: the base model) in the slot's layout, at ``factor`` times its strength (new tensors:
        the loader may consume what it is given)."""
        weights = self._weights[name]
        return _uniform(weights["state"], weights["scaling"] * factor, *self._slot)

    def activate(self, name: str | None, scale: float | None = None) -> None:
        """Make ``name``'s adapter the only one active at ``scale`` (None: the one it is served with); None, or a
        fused LoRA: the base weights alone."""
        if name is not None and (name not in self.by_name or self.by_name[name].fuse):
            name = None
        key = None if name is None else (name, self.by_name[name].scale if scale is None else scale)
        if key == self.current or not self.swapped:
            self.current = key
            return
        transformer = self.pipe.transformer
        if self.hotswap:
            state = self._laid_out(name, 1.0 if key is None else key[1])  # B scaled: the slot has no scale of its own
            self._into_transformer(state, SLOT, hotswap=True)
        else:
            import torch

            # Under inference mode, as the calls: model offload moves the transformer inside them, which makes its
            # adapter weights inference tensors, and peft's switch sets their requires_grad (outside inference mode,
            # an error for such tensors)
            with torch.inference_mode():
                if key is None:
                    transformer.disable_lora()
                else:
                    transformer.enable_lora()
                    transformer.set_adapters([self.adapter[key[0]]], [key[1]])
        self.current = key

    def scheduler_for(self, base_scheduler, overrides: dict):
        """A scheduler with the preset's ``overrides``, built once per preset from the model's own config."""
        key = json.dumps(overrides, sort_keys=True)
        if key not in self._schedulers:
            self._schedulers[key] = type(base_scheduler).from_config(base_scheduler.config, **overrides)
        return self._schedulers[key]

    @contextlib.contextmanager
    def applied(self, pipe, lora_name: str | None, scale: float | None = None) -> Iterator[None]:
        """For one call of ``pipe``: ``lora_name``'s adapter (at ``scale``, None: its own) and its preset's scheduler;
        the scheduler is restored after."""
        self.activate(lora_name, scale)
        overrides = preset_for(self.profile, lora_name).get("scheduler")
        if not overrides:
            yield
            return
        saved = pipe.scheduler
        pipe.scheduler = self.scheduler_for(saved, overrides)
        try:
            yield
        finally:
            pipe.scheduler = saved


def _adapters_in(transformer, dtype) -> None:
    """The LoRA adapters of a transformer stored in FP8 (``weights_dtype=fp8``) in the run dtype: peft gives a new
    adapter its base layer's weight dtype, float8 there, in which the adapters' matmuls cannot run (and the LoRA's
    values lose precision). The base layers keep their FP8 storage and casting."""
    import torch

    for module in transformer.modules():
        for attr in ("lora_A", "lora_B"):
            adapters = getattr(module, attr, None)
            if isinstance(adapters, torch.nn.ModuleDict):
                adapters.to(dtype)


def _scaling(name: str, metadata: dict | None) -> float:
    """What peft would multiply a LoRA's ``B @ A`` by, from the LoRA's saved config (none: alphas are already in the
    weights, as diffusers' converters leave them): ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
    if metadata and any(key.startswith("transformer.") for key in metadata):  # a pipeline's save: per component
        metadata = {key.removeprefix("transformer."): v for key, v in metadata.items() if key.startswith("transformer.")}
    if not metadata:
        return 1.0
    if metadata.get("rank_pattern") or metadata.get("alpha_pattern"):
        raise LoraError(f"LoRA {name}: per-layer ranks or alphas in its config do not fit the compiled model's slot")
    rank = float(metadata.get("r") or 1)
    alpha = float(metadata.get("lora_alpha") or rank)
    return alpha / (rank**0.5 if metadata.get("use_rslora") else rank)


def _uniform(state: dict, scaling: float, layout: dict, rank: int, device) -> dict:
    """``state`` in the slot's layout: every layer of ``layout`` at ``rank`` (zero rows of A and columns of B pad a
    smaller rank: ``B @ A`` is unchanged; layers it lacks are zero), ``scaling`` folded into B."""
    import torch

    out = {}
    for layer, (inputs, outputs, dtype) in layout.items():
        a = torch.zeros(rank, inputs, dtype=dtype, device=device)  # on the device: a swap copies nothing to or from
        b = torch.zeros(outputs, rank, dtype=dtype, device=device)  # the host
        if f"{layer}.lora_A.weight" in state:
            own_a, own_b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
            a[: own_a.shape[0]] = own_a
            b[:, : own_b.shape[1]] = own_b * scaling
        out[f"{layer}.lora_A.weight"], out[f"{layer}.lora_B.weight"] = a, b
    return out
