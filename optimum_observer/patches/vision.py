"""Patches of how vision-language models hand their image features over.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Patch


def _llava_image_features_in_one_tensor(
    self: Any,
    pixel_values: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    # Upstream's computation, returning the projected features as one [num_images, tokens,
    # hidden] tensor: upstream ends with `list(image_features)`, which iterates over the image
    # axis and so fixes the number of images in the graph. Only the vision encoder graph calls
    # it under the patch (vision_language.VisionEncoder takes a tensor or a list).
    layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    hidden_states = self.vision_tower(pixel_values, output_hidden_states=True, **kwargs).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    selected = [hidden_states[i][:, 1:] if strategy == "default" else hidden_states[i] for i in layers]
    return self.multi_modal_projector(torch.cat(selected, dim=-1))


PATCHES = (
    Patch(
        name="llava_image_features_in_one_tensor",
        target="transformers.models.llava.modeling_llava:LlavaModel.get_image_features",
        replacement=_llava_image_features_in_one_tensor,
        fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of 2 "
        "for dimension inputs['pixel_values'].shape[0] (get_image_features ends with "
        "list(image_features), one tensor per image)",
    ),
)
