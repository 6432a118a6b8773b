"""Scoped patches of position embeddings that look up positions by their values in Python.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Why, Reformer: Reformer's axial position embeddings, in inference, cut the embedding grid to the rows the
largest position needs (`position_ids.max().item()`, a data-dependent size) and then select each
row's positions in a Python loop over the batch (`for i in range(batch_size)`), which fixes the
batch axis at the example's size: "tracing inferred a static shape of 2 for dimension
inputs['input_ids'].shape[0]". The replacement gathers the positions from the whole grid in one
indexing: the same rows, as the cut only saved memory.

Why, NaViT-style vision embeddings (idefics2, idefics3, smolvlm): each image's position ids are
computed in a Python loop over the images (`for batch_idx, p_attn_mask in
enumerate(patch_attention_mask)`) from the counts of patches its mask covers; the images that
reach it are the non-padding ones, a data-dependent number, so torch.export fails at the loop
with "Could not guard on data-dependent expression Eq(u0, 0)". The replacement computes the same
ids for every image at once.
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


def _navit_position_ids_at_once(
    self: torch.nn.Module, pixel_values: torch.FloatTensor, patch_attention_mask: torch.BoolTensor
) -> torch.Tensor:
    # Upstream's formula (Idefics3VisionEmbeddings.forward, transformers 4.57), per image as a
    # batch: the rows and columns its patch mask covers give fractional coordinates, bucketed
    # onto the position grid; a padded patch keeps position 0. Upstream writes the ids into the
    # mask's True places in row-major order, which are the top-left rectangle of those rows and
    # columns (the image processors pad images at the bottom and right): the same ids.
    patch_embeds = self.patch_embedding(pixel_values)
    embeddings = patch_embeds.flatten(2).transpose(1, 2)
    boundaries = torch.arange(
        1 / self.num_patches_per_side, 1.0, 1 / self.num_patches_per_side, device=pixel_values.device
    )
    rows = patch_attention_mask[:, :, 0].sum(-1)
    columns = patch_attention_mask[:, 0, :].sum(-1)
    h_indices = torch.arange(patch_attention_mask.shape[1], device=pixel_values.device, dtype=pixel_values.dtype)
    w_indices = torch.arange(patch_attention_mask.shape[2], device=pixel_values.device, dtype=pixel_values.dtype)
    bucket_h = torch.bucketize(h_indices[None, :] / rows[:, None] * (1 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(w_indices[None, :] / columns[:, None] * (1 - 1e-6), boundaries, right=True)
    positions = bucket_h[:, :, None] * self.num_patches_per_side + bucket_w[:, None, :]
    position_ids = torch.where(patch_attention_mask, positions, 0).flatten(1)
    return embeddings + self.position_embedding(position_ids)


_NAVIT_FAILURE = (
    "GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 0) at "
    "`for batch_idx, p_attn_mask in enumerate(patch_attention_mask)` (position ids computed per "
    "image in a loop; the number of non-padding images is data-dependent)"
)

PATCHES = (
    Patch(
        name="reformer_axial_positions_gathered",
        target="transformers.models.reformer.modeling_reformer:AxialPositionEmbeddings.forward",
        wrap=_axial_positions_gathered,
        fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of 2 for "
        "dimension inputs['input_ids'].shape[0] (the axial position embeddings cut the grid at "
        "`position_ids.max().item()` and select each row's positions in a loop over the batch)",
    ),
    *(
        Patch(
            name=f"{model_type}_navit_position_ids_at_once",
            target=f"transformers.models.{model_type}.modeling_{model_type}:{prefix}VisionEmbeddings.forward",
            replacement=_navit_position_ids_at_once,
            fixes=_NAVIT_FAILURE,
        )
        for model_type, prefix in (("idefics2", "Idefics2"), ("idefics3", "Idefics3"), ("smolvlm", "SmolVLM"))
    ),
)
