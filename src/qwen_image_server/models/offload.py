"""Group offload as the memory modes run it: a component kept in host memory and streamed to the device one block at
a time while it runs (``--offload text-encoder|group``), on diffusers' group offload hooks.

On CUDA the next block is copied from pinned memory on a side stream while the current one computes; each weight is
pinned in place before the groups are made (``pin_one_by_one``), so the host never holds a weight twice. Two class
patches of diffusers 0.42 keep what the server relies on: the buffers of a group go back to host memory with its
parameters (the quantized layers keep their weights in buffers: ``offload_buffers_too``), and removing a hook keeps
the hooks after it in the chain (batched CFG's: ``keep_later_hooks_forward``). ``regroup_offloaded`` makes the groups
again after the layers change (FP8 or 4-bit layers, LoRA adapters); ``offload_groups`` puts every group back in its
host copy before the weights are written. On a CPU, onload = offload = CPU: the hooks run, nothing moves.
"""

from __future__ import annotations

from typing import Any

import torch

#: Submodules of the text encoder that group offload leaves on the device (``group_offload``): the token embeddings.
#: Qwen2.5-VL embeds the prompt before it calls its language model, so in the language model's group (moved on that
#: call) they would still be on the CPU when used; as a group of their own they were moved without pinned memory or
#: the side stream, before every encoding and once more by the language model's prefetch (1.1 GB each way for
#: Qwen2.5-VL-7B, twice per prompt), and stayed on the device between encodings anyway.
TEXT_ENCODER_RESIDENT = ("embed_tokens",)
#: Submodules of Qwen2.5-VL that group offload descends into to find its per-layer ``ModuleList`` blocks; and the
#: token embeddings, a group of their own should diffusers apply the offload again (it does so after loading a LoRA,
#: with these settings): then they are moved with each prompt as above, but are on the device when used.
TEXT_ENCODER_BLOCK_MODULES = ["model", "visual", "language_model", *TEXT_ENCODER_RESIDENT]


def pin_host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned host memory (torch's ``pin_memory``: a tensor already pinned is returned as it is)."""
    return tensor.pin_memory()


def streamed_blocks(module: torch.nn.Module, block_modules=()) -> list[torch.nn.Module]:
    """The blocks diffusers' block-level group offload streams through the side stream: the members of each
    ``ModuleList`` or ``Sequential`` child of ``module``, looking into the children named in ``block_modules``. The
    rest (embedders, norms, the output projection) is its "unmatched" group, moved whole without pinned copies."""
    blocks: list[torch.nn.Module] = []
    for name, child in module.named_children():
        if name in block_modules:
            blocks += streamed_blocks(child, block_modules)
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            blocks += list(child)
    return blocks


def pin_one_by_one(module: torch.nn.Module, block_modules=()) -> int:
    """Put each CPU weight (parameter or buffer) of the blocks group offload will stream (``streamed_blocks``) into
    pinned memory in place, one at a time; how many.

    Group offload on CUDA pins a copy of every weight it streams while the weights it copies stay in memory until
    the first call moves them (diffusers pins them all before it frees any): the host held the weights twice while
    loading (for Qwen-Image's FP8 transformer and text encoder, 25 GiB of weights beside 43 GiB of pinned copies).
    Pinned here first, each weight's unpinned memory is freed as soon as its copy is made, and diffusers keeps the
    pinned tensor itself as its copy (``pin_memory`` of a pinned tensor is that tensor)."""
    pinned = 0
    with torch.no_grad():
        for block in streamed_blocks(module, block_modules):
            for tensor in [*block.parameters(), *block.buffers()]:
                if tensor.device.type == "cpu" and tensor.numel():
                    tensor.data = pin_host_copy(tensor.data)
                    pinned += 1
    return pinned


def group_offload(module: torch.nn.Module, device: str) -> None:
    """Keep ``module`` on the CPU and move it to ``device`` one block at a time while it runs.

    On CUDA the next block is copied on a side stream from pinned memory while the current
    one computes (``use_stream``, ``record_stream``); on the CPU onload = offload = CPU.
    A text encoder's token embeddings (``TEXT_ENCODER_RESIDENT``) are kept out of the groups
    and stay on ``device``.
    """
    from diffusers.hooks import apply_group_offloading
    from diffusers.models.modeling_utils import ModelMixin

    offload_buffers_too()
    keep_later_hooks_forward()
    if getattr(module, "_qis_group_offloaded", False):  # a component shared with a model loaded before
        return
    module._qis_group_offloaded = True  # type: ignore[assignment]
    cuda = device.startswith("cuda")
    options: dict[str, Any] = dict(
        onload_device=torch.device(device),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=cuda,
        record_stream=cuda,
        low_cpu_mem_usage=False,  # pin every block once at start-up rather than on each transfer
    )
    if isinstance(module, ModelMixin):
        if cuda:
            pin_one_by_one(module)
        module.enable_group_offload(**options)
        return
    resident = [(name, sub) for name, sub in module.named_modules() if name.rsplit(".", 1)[-1] in TEXT_ENCODER_RESIDENT]
    placeholders = []
    for name, sub in resident:  # out of the module while the groups are made: in no group
        parent, _, attribute = name.rpartition(".")
        placeholder = torch.nn.Module()
        setattr(module.get_submodule(parent), attribute, placeholder)
        placeholders.append((parent, attribute, sub))
    try:
        if cuda:
            pin_one_by_one(module, TEXT_ENCODER_BLOCK_MODULES)  # the resident modules are out of it meanwhile
        apply_group_offloading(module, block_modules=TEXT_ENCODER_BLOCK_MODULES, **options)
    finally:
        for parent, attribute, sub in placeholders:
            setattr(module.get_submodule(parent), attribute, keep_on_device(sub, device))


def offload_buffers_too() -> None:
    """Make diffusers' group offload with a side stream (CUDA) put the buffers of a group's modules back into their
    CPU copies as it does the parameters (once per process).

    Its onload moves both to the device, but its offload restored only the parameters (diffusers 0.42), so every
    buffer stayed on the GPU after its block's first call. The quantized layers (``FP8Linear``, ``Int4Linear``) keep
    their weights in buffers: with ``--quantize fp8|int4 --offload group`` the whole quantized transformer would have
    piled up on the GPU (about 19 or 11 GiB for Qwen-Image) while the plan counted two blocks. Patched on the class,
    not on the groups, because diffusers makes new groups itself (loading or removing a LoRA regroups the model)."""
    from diffusers.hooks.group_offloading import ModuleGroup

    if getattr(ModuleGroup, "_qis_offloads_buffers", False):
        return
    offload_parameters = ModuleGroup._offload_to_memory

    def _offload_to_memory(group) -> None:
        offload_parameters(group)
        if group.stream is None:  # without a stream the modules were moved whole (``Module.to``), buffers too
            return
        for group_module in group.modules:
            for buffer in group_module.buffers():
                copy = group.cpu_param_dict.get(buffer)
                if copy is not None:
                    buffer.data = copy

    ModuleGroup._offload_to_memory = _offload_to_memory  # type: ignore[method-assign]
    ModuleGroup._qis_offloads_buffers = True  # type: ignore[attr-defined]


def keep_later_hooks_forward() -> None:
    """Make diffusers' ``HookRegistry.remove_hook`` keep the ``new_forward`` of the hook registered after the removed
    one (once per process).

    A hook with ``new_forward`` (batched CFG's, the step caches' head hooks) calls ``fn_ref.original_forward``, what
    ran below it; its ``fn_ref.forward`` is its own ``new_forward``. Removing the hook before it set the latter to the
    removed hook's forward (diffusers 0.42), so the later hook fell out of the chain: under group offload with CUDA's
    side stream, whose order-tracing hook removes itself after the first call, batched CFG stopped batching after a
    worker's warm-up (two passes a step while ``/ready`` said it was on); regrouping (a LoRA's loading, a change of
    the layers) did the same on any device. Here what the removal hands on goes to ``original_forward`` instead."""
    from diffusers.hooks.hooks import HookRegistry

    if getattr(HookRegistry, "_qis_keeps_new_forward", False):
        return
    remove = HookRegistry.remove_hook

    def remove_hook(registry, name: str, recurse: bool = True) -> None:
        after = own = None
        if name in registry.hooks:
            index = registry._hook_order.index(name)
            if index + 1 < len(registry._fn_refs) and registry._fn_refs[index + 1].original_forward is not None:
                after = registry._fn_refs[index + 1]
                own = after.forward
        remove(registry, name, recurse)
        if after is not None:  # diffusers put what the removed hook ran below it in ``forward``: it goes below
            after.original_forward, after.forward = after.forward, own

    HookRegistry.remove_hook = remove_hook  # type: ignore[method-assign,assignment]
    HookRegistry._qis_keeps_new_forward = True  # type: ignore[attr-defined]


def regroup_offloaded(module: torch.nn.Module) -> None:
    """Under group offload, make ``module``'s groups again after its layers changed (FP8 layers made after the hooks,
    LoRA adapters, their dtype): a group still lists the old weights, and with CUDA's side stream finds no CPU copy of
    the new ones (KeyError on the first call). Nothing without group offload."""
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook, _maybe_remove_and_reapply_group_offloading

    hook = _get_top_level_group_offload_hook(module)  # made by ``group_offload``, which patched diffusers already
    config = hook.config if hook is not None and hook.config.stream is not None else None  # streamed: CUDA
    if config is not None:  # the new weights, pinned one at a time as at first (``pin_one_by_one``); the rest are
        pin_one_by_one(module, config.block_modules or ())
    _maybe_remove_and_reapply_group_offloading(module)
    if config is not None:  # the pinned copies of the weights replaced (bf16 layers now FP8 or 4-bit) go back
        release_host_cache()


def release_host_cache() -> None:
    """Give the pinned memory torch's allocator keeps for reuse back to the system (it keeps every pinned block it
    freed: after the layers of a group-offloaded transformer are replaced, the pinned copies of the old ones); nothing
    without CUDA or where this torch has no such call."""
    if not torch.cuda.is_available():
        return
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def offload_groups(module: torch.nn.Module) -> None:
    """Put every offload group of ``module`` back in its CPU copies (with CUDA's stream: the weights point at them
    again; a group already there is unchanged), so that a write into the weights reaches what the next onload reads;
    nothing without group offload. The next call onloads each group as it comes."""
    groups = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        group.offload_()


def keep_on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` moved to ``device`` for good (the text encoder's token embeddings under group offload)."""
    return module.to(device)
