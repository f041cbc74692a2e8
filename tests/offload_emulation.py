"""Group offload as it runs on a CUDA device, emulated on the CPU, for the tests of the memory modes.

On the CPU the server's group offload moves weights from the CPU to the CPU: a weight used while its group is
offloaded computes the same, where on a GPU it is on the wrong device ("Expected all tensors to be on the same
device"). This emulation keeps the CUDA options (``offload.group_offload`` is called with a CUDA device: side
stream, prefetching in the traced order) and diffusers' own hooks, and changes only what needs a GPU: the devices
are the CPU, the stream and pinned memory are stand-ins, and an onload copies each weight (as a transfer to a GPU
does: a change made to an onloaded weight is not in the CPU copy the next onload reads). It records which group is
on the "device", and ``OffloadEmulation.watching()`` notes every weight an operation uses while its group is not.
One difference stays: diffusers onloads a prefetched group once more when its weights are still on the offload
device (its fallback for groups the prefetch chain missed), which here, with the CPU as both devices, is every
group: groups are onloaded twice as often as on a GPU.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.overrides import TorchFunctionMode

#: Operations that read a tensor's metadata only (a dtype or device query is no use of the weight).
_METADATA = {"__get__", "is_floating_point", "dim", "size", "numel", "is_complex", "element_size", "data_ptr", "requires_grad_"}


class _Stream:
    def synchronize(self) -> None:
        pass


class _Backend:
    """What diffusers asks of ``torch.cuda`` for a stream (``TorchDeviceBackend``)."""

    Stream = _Stream

    @staticmethod
    def current_stream() -> _Stream:
        return _Stream()

    @staticmethod
    def stream(stream: _Stream):
        return contextlib.nullcontext()


class OffloadEmulation:
    def __init__(self, monkeypatch):
        import diffusers.hooks
        from diffusers.hooks import group_offloading as go

        from qwen_image_server.models import offload as offload_module

        self.onloaded: dict[int, bool] = {}  # id(group) -> on the device
        self.owner: dict[int, object] = {}  # id(tensor) -> its group
        self.names: dict[int, str] = {}
        self.used_offloaded: list[str] = []  # "weight name:operation"
        self.applied: list[str] = []  # the class of each module group offload was applied to (or applied to again)
        self._busy = 0  # inside an onload or offload: its copies are no use of the weights
        onload, offload = go.ModuleGroup.onload_, go.ModuleGroup.offload_

        def onload_(group) -> None:
            self._busy += 1
            try:
                onload(group)
            finally:
                self._busy -= 1
            self.onloaded[id(group)] = True

        def offload_(group) -> None:
            self.onloaded[id(group)] = False
            self._busy += 1
            try:
                offload(group)
            finally:
                self._busy -= 1

        #: the storages of the stand-ins for pinned tensors (``pin``)
        self.pinned_storages: set[int] = set()
        self.pinned_copies = 0
        #: the most unpinned weights that were still in memory beside their pinned copies when a copy was made
        self.unpinned_beside_copies = 0
        copied: list[weakref.ref] = []  # the storage each pinned copy was made from

        def pin(tensor: torch.Tensor) -> torch.Tensor:
            """torch's ``pin_memory``: a copy in pinned memory (here: a copy, noted as pinned), or the tensor itself
            when it is pinned already."""
            storage = tensor.untyped_storage()
            if storage.data_ptr() in self.pinned_storages:
                return tensor
            beside = sum(1 for ref in copied if ref() is not None)
            self.unpinned_beside_copies = max(self.unpinned_beside_copies, beside)
            copied.append(weakref.ref(storage))
            copy = tensor.clone()
            self.pinned_storages.add(copy.untyped_storage().data_ptr())
            self.pinned_copies += 1
            return copy

        def to_cpu(tensor: torch.Tensor, low_cpu_mem_usage: bool) -> torch.Tensor:  # diffusers' ``_to_cpu``
            return tensor.data.cpu() if low_cpu_mem_usage else pin(tensor.data.cpu())

        @contextlib.contextmanager
        def pinned(group):  # the stand-in for pinned copies: the CPU copies themselves
            yield dict(group.cpu_param_dict)

        def transfer(group, tensor, source, default_stream) -> None:
            # a copy, as a host-to-GPU transfer makes: what is written into an onloaded weight stays on the "device"
            # and is gone at the next offload (the group's CPU copy is what the next onload reads)
            tensor.data = source.clone()

        def apply(module, onload_device, offload_device=None, use_stream=False, record_stream=False, **options):
            block_modules = options.pop("block_modules", None)
            exclude_kwargs = options.pop("exclude_kwargs", None)
            config = go.GroupOffloadingConfig(
                onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                offload_type=go.GroupOffloadingType(options.pop("offload_type", "block_level")),
                stream=_Stream() if use_stream else None, record_stream=False, non_blocking=options.pop("non_blocking", False),
                block_modules=block_modules if block_modules is not None else getattr(module, "_group_offload_block_modules", None),
                exclude_kwargs=exclude_kwargs if exclude_kwargs is not None else getattr(module, "_skip_keys", None),
                **options,
            )  # fmt: skip
            go._apply_group_offloading(module, config)  # the tracking version below

        real_group_offload = offload_module.group_offload
        self.resident: list[torch.nn.Module] = []  # modules group offload keeps on the "device" (no group of theirs)
        monkeypatch.setattr(offload_module, "keep_on_device", lambda module, device: (self.resident.append(module), module)[1])
        monkeypatch.setattr(go.ModuleGroup, "onload_", onload_)
        monkeypatch.setattr(go.ModuleGroup, "offload_", offload_)
        monkeypatch.setattr(go.ModuleGroup, "_to_cpu", staticmethod(to_cpu))
        monkeypatch.setattr(offload_module, "pin_host_copy", pin)
        monkeypatch.setattr(go.ModuleGroup, "_pinned_memory_tensors", pinned)
        monkeypatch.setattr(go.ModuleGroup, "_transfer_tensor_to_device", transfer)
        monkeypatch.setattr(go, "TorchDeviceBackend", lambda device: _Backend)
        monkeypatch.setattr(go, "_apply_group_offloading", self._tracking(go._apply_group_offloading))
        monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", apply)
        monkeypatch.setattr(offload_module, "group_offload", lambda module, device: real_group_offload(module, "cuda:0"))

    def _tracking(self, apply):
        """diffusers' ``_apply_group_offloading`` (also what re-applies it after a change), then the groups noted."""

        def tracked(module, config):
            self.applied.append(type(module).__name__)
            apply(module, config)
            self._track(module)

        return tracked

    def _track(self, module: torch.nn.Module) -> None:
        for submodule in module.modules():
            registry = getattr(submodule, "_diffusers_hook", None)
            hook = registry.get_hook("group_offloading") if registry is not None else None
            if hook is None:
                continue
            group = hook.group
            self.onloaded.setdefault(id(group), False)
            tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
            for tensor in tensors + list(group.parameters) + list(group.buffers):
                self.owner[id(tensor)] = group
        self.names.update({id(t): name for name, t in (*module.named_parameters(), *module.named_buffers())})

    def left_on_device(self) -> list[str]:
        """The weights (parameters and buffers) of the groups now offloaded that are not their group's CPU copy: on a
        GPU these would still hold device memory (a quantized layer's weights are buffers: diffusers' stream offload
        put only parameters back)."""
        groups = {id(group): group for group in self.owner.values()}
        left = []
        for key, group in groups.items():
            if self.onloaded.get(key) or not group.cpu_param_dict:
                continue
            tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
            for tensor in tensors + list(group.parameters) + list(group.buffers):
                copy = group.cpu_param_dict.get(tensor)
                if copy is not None and tensor.data_ptr() != copy.data_ptr():
                    left.append(self.names.get(id(tensor), "?"))
        return sorted(left)

    @contextlib.contextmanager
    def watching(self):
        """Note each use of a weight whose group is off the device (in ``used_offloaded``)."""
        emulation = self

        class Uses(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not emulation._busy and getattr(func, "__name__", "") not in _METADATA:
                    for value in (*args, *kwargs.values()):
                        group = emulation.owner.get(id(value)) if isinstance(value, torch.Tensor) else None
                        if group is not None and not emulation.onloaded[id(group)]:
                            emulation.used_offloaded.append(f"{emulation.names.get(id(value), '?')}:{func.__name__}")
                return func(*args, **kwargs)

        with Uses():
            yield
