"""Scoped patches for the known torch.export blockers of transformers 4.56-4.57.

Takes: nothing. Gives: :func:`export_patches`, a context manager that applies every patch in
:data:`PATCHES` and restores the original attributes on exit, also when the block raises.

Each patch is one small function plus a :class:`Patch` record naming the failure it removes;
tests/test_patches.py shows each failure happening without its patch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import cache_utils

logger = logging.getLogger(__name__)


_INHERITED = object()


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace `owner.attribute` by `replacement` for the duration of an export."""

    name: str
    owner: Any
    attribute: str
    replacement: Callable[..., Any]
    fixes: str


def _lazy_initialization_from_key_states(self: cache_utils.DynamicLayer, key_states: torch.Tensor) -> None:
    # An empty slice of the incoming states instead of `torch.tensor([])`: the latter is a
    # constant created inside the traced graph, which torch.export lifts and then loses.
    self.dtype, self.device = key_states.dtype, key_states.device
    self.keys = key_states[..., :0, :]
    self.values = key_states[..., :0, :]
    self.is_initialized = True


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="dynamic_layer_lazy_initialization",
        owner=cache_utils.DynamicLayer,
        attribute="lazy_initialization",
        replacement=_lazy_initialization_from_key_states,
        fixes="Constant tensor lifted_tensor_N is not in the constants dictionary "
        "(DynamicLayer.lazy_initialization creates torch.tensor([]) inside the graph)",
    ),
)


@contextlib.contextmanager
def applied(patches: Sequence[Patch]) -> Iterator[None]:
    """Applies `patches` in order and restores the originals in reverse order on exit."""
    originals: list[tuple[Patch, Any]] = []
    try:
        for patch in patches:
            # Inherited attributes are absent from the owner's __dict__: restoring means deleting.
            originals.append((patch, patch.owner.__dict__.get(patch.attribute, _INHERITED)))
            setattr(patch.owner, patch.attribute, patch.replacement)
            logger.debug("patched %s (%s)", patch.name, patch.fixes)
        yield
    finally:
        for patch, original in reversed(originals):
            if original is _INHERITED:
                delattr(patch.owner, patch.attribute)
            else:
                setattr(patch.owner, patch.attribute, original)


def export_patches() -> contextlib.AbstractContextManager[None]:
    return applied(PATCHES)
