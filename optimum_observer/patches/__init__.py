"""Scoped patches for the known torch.export blockers of transformers 4.56-4.57, by mechanism.

Takes: nothing. Gives: :data:`GROUPS` (mechanism -> patches), :data:`PATCHES` (all of them),
:func:`applied`, :func:`for_model` and the exporter environment's context managers.

Each patch is one small function plus a :class:`Patch` record naming its target as a dotted path
(resolved only when applied: importing this package imports no `transformers.models` module),
what it serves and the failure it removes; tests/test_patches.py and the tests named in each
group's module show each failure happening without its patch.
"""

from __future__ import annotations

from . import (
    adapters,
    cache_branches,
    constants,
    environment,
    kv_cache,
    layer_regions,
    masks,
    moe,
    positions,
    recurrent,
    rotary,
    sliding_window,
    state_space,
    vision,
)
from .environment import (
    exact_no_op_constants,
    fewer_garbage_collections,
    no_op_rule_constants,
    plain_tensor_buffers,
    split_to_sequence_folding_guard,
    unbounded_sympy_cache,
    uncached_fake_tensor_dispatch,
    untraced_no_op_mode_switches,
)
from .layer_regions import decoder_layer_regions, memoized_region_fake_impl
from .registry import (
    Applied,
    MissingTarget,
    Patch,
    Target,
    applied,
    for_model,
    for_model_runs,
    for_model_type,
    markdown_table,
    modules_used,
)

#: Every patch, grouped by the mechanism it fixes.
GROUPS: dict[str, tuple[Patch, ...]] = {
    "kv cache": kv_cache.PATCHES,
    "MoE dispatch": moe.PATCHES,
    "rotary": rotary.PATCHES,
    "position embeddings": positions.PATCHES,
    "masks": masks.PATCHES,
    "cache branches": cache_branches.PATCHES,
    "sliding window": sliding_window.PATCHES,
    "state-space mixers": state_space.PATCHES,
    "recurrent loops": recurrent.PATCHES,
    "vision features": vision.PATCHES,
    "per-row adapters": adapters.PATCHES,
    "constants in forward": constants.PATCHES,
    "exporter environment": environment.PATCHES,
}

PATCHES: tuple[Patch, ...] = tuple(patch for group in GROUPS.values() for patch in group)


def mechanism_of(patch: Patch) -> str:
    return next(mechanism for mechanism, group in GROUPS.items() if patch in group)


__all__ = [
    "GROUPS",
    "PATCHES",
    "Applied",
    "MissingTarget",
    "Patch",
    "Target",
    "applied",
    "decoder_layer_regions",
    "exact_no_op_constants",
    "fewer_garbage_collections",
    "for_model",
    "for_model_runs",
    "for_model_type",
    "markdown_table",
    "mechanism_of",
    "memoized_region_fake_impl",
    "modules_used",
    "no_op_rule_constants",
    "plain_tensor_buffers",
    "split_to_sequence_folding_guard",
    "unbounded_sympy_cache",
    "uncached_fake_tensor_dispatch",
    "untraced_no_op_mode_switches",
]
