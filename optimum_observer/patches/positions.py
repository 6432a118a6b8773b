"""Scoped patches of position embeddings that look up positions by their values in Python.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Why: Reformer's axial position embeddings, in inference, cut the embedding grid to the rows the
largest position needs (`position_ids.max().item()`, a data-dependent size) and then select each
row's positions in a Python loop over the batch (`for i in range(batch_size)`), which fixes the
batch axis at the example's size: "tracing inferred a static shape of 2 for dimension
inputs['input_ids'].shape[0]". The replacement gathers the positions from the whole grid in one
indexing: the same rows, as the cut only saved memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .registry import Patch


def _axial_positions_gathered(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(self: torch.nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
        """`AxialPositionEmbeddings.forward` in inference: one gather from the whole grid."""
        if self.training:
            return original(self, position_ids)
        grid = self.axial_pos_shape
        if functools.reduce(lambda a, b: a * b, grid) < position_ids.shape[1]:
            return original(self, position_ids)  # upstream's error for a sequence beyond the grid
        weights = torch.cat([w.expand(tuple(grid) + w.shape[-1:]) for w in self.weights], dim=-1)
        return weights.reshape(-1, weights.shape[-1])[position_ids]

    return forward


PATCHES = (
    Patch(
        name="reformer_axial_positions_gathered",
        target="transformers.models.reformer.modeling_reformer:AxialPositionEmbeddings.forward",
        wrap=_axial_positions_gathered,
        fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of 2 for "
        "dimension inputs['input_ids'].shape[0] (the axial position embeddings cut the grid at "
        "`position_ids.max().item()` and select each row's positions in a loop over the batch)",
    ),
)
