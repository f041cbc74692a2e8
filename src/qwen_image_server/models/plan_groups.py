"""Planning with ``--share-components``: slot ``i`` of every model is one worker process, placed as one.

A text encoder or VAE with the same files (and the same FP8 storage and offload) as
another model's in the process is counted once; so are the working memory (the models
of a process take turns) and the process overhead. No torch here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .footprint import Footprint
    from .plan_result import Placement

#: The name of a group of models served by one worker process (``--share-components``).
GROUP_SEPARATOR = "+"


def shared_keys(specs) -> dict[tuple[str, str], tuple]:
    """``{(model, component): key}`` of the text encoders and VAEs that can be shared (``models/shared.py``):
    equal keys are one copy in a process. Local folders, hub caches and ``random:`` sources (their architecture
    values and seed, as the worker compares them); others count whole."""
    from .random_source import component_key
    from .shared import SHAREABLE, ComponentCache, cached_component_folder
    from .spec import ModelConfigError

    keys = {}
    for spec in specs:
        for name in SHAREABLE:
            options = {"weights_dtype": spec.profile.weights_dtype, "offload": spec.profile.offload}
            if spec.is_random:
                try:
                    content = component_key(spec.source, name)
                except ModelConfigError:  # a source that names no packaged architecture: counted whole
                    content = None
                key = ComponentCache.content_key(content, name, dtype="run", device="worker", **options)
            else:
                folder = cached_component_folder(spec.source, spec.revision, name)
                key = ComponentCache.key(folder, name, dtype="run", device="worker", **options)
            if key is not None:
                keys[(spec.id, name)] = key
    return keys


def group_needs(specs, footprints: dict[str, Footprint], keys: dict[tuple[str, str], tuple]) -> dict[str, int | None]:
    """What each model adds to one process serving all of ``specs``: its own weights, the shared components
    only for the first model that has them, and the working memory and process overhead for the first model
    (the models of a process run one at a time: the largest working memory counts once)."""
    if any(spec.id not in footprints for spec in specs):
        return {spec.id: (footprints[spec.id].total if spec.id in footprints else None) for spec in specs}
    seen: set[tuple] = set()
    work = max(max(fp.activations, fp.text_encoder_work) for fp in footprints.values() if fp.model in {s.id for s in specs})
    overhead = max(footprints[spec.id].overhead for spec in specs)
    out: dict[str, int | None] = {}
    for index, spec in enumerate(specs):
        fp = footprints[spec.id]
        weights = 0
        for name, size in fp.components.items():
            key = keys.get((spec.id, name))
            if key is not None and key in seen:
                continue
            if key is not None:
                seen.add(key)
            weights += size
        out[spec.id] = weights + (work + overhead if index == 0 else 0)
    return out


def group_name(specs) -> str:
    """The name the planner gives the worker process that serves every one of ``specs``."""
    return GROUP_SEPARATOR.join(spec.id for spec in specs)


def group_slots(specs, footprints, workers: int, keys) -> list[tuple[str, int, int | None]]:
    """One slot per worker process that serves every model (``--share-components``)."""
    needs = group_needs(specs, footprints, keys)
    total = None if any(n is None for n in needs.values()) else sum(n or 0 for n in needs.values())
    return [(group_name(specs), slot, total) for slot in range(workers)]


def expand_groups(placed: list[Placement], specs, needs: dict[str, int | None]) -> list[Placement]:
    """Group placements as one placement per model, each with what it adds to its process."""
    out = []
    for p in placed:
        if GROUP_SEPARATOR not in p.model or p.model in needs:
            out.append(p)
            continue
        out += [replace(p, model=spec.id, need=needs[spec.id]) for spec in specs]
    return sorted(out, key=lambda p: (p.model, p.slot))
