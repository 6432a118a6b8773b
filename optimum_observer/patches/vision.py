"""Patches of how vision-language models hand their image features over.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

import types
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


def _smolvlm_image_features_as_idefics3(
    self: Any, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    # SmolVLM's get_image_features is idefics3's plus one branch, `if not any(real_images_inds)`
    # (no image is real: keep the first, all-zero one), which torch.export cannot trace. Without
    # it the graph is idefics3's computation, whose attributes (dtype, config, vision_model,
    # connector) SmolVLMModel has under the same names: the same features whenever at least one
    # image is real, as every image a processor makes is (an all-zero normalized image).
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Model

    return Idefics3Model.get_image_features(self, pixel_values, pixel_attention_mask)


class _TorchWithPaddedPatchesAssumed(types.ModuleType):
    """`torch` for idefics2's modeling module, except that `torch.any` answers True.

    Its one call is Idefics2VisionTransformer's `if not torch.any(~patch_attention_mask):
    patch_attention_mask = None`, a shortcut for images without padded patches that branches on
    the data. With it answering True the graph always builds the 4-D attention mask from the patch
    mask, upstream's path for padded images, which masks nothing when no patch is padded.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def any(*args: Any, **kwargs: Any) -> bool:
        return True


PATCHES = (
    Patch(
        name="llava_image_features_in_one_tensor",
        target="transformers.models.llava.modeling_llava:LlavaModel.get_image_features",
        replacement=_llava_image_features_in_one_tensor,
        fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of 2 "
        "for dimension inputs['pixel_values'].shape[0] (get_image_features ends with "
        "list(image_features), one tensor per image)",
    ),
    Patch(
        name="smolvlm_image_features_as_idefics3",
        target="transformers.models.smolvlm.modeling_smolvlm:SmolVLMModel.get_image_features",
        replacement=_smolvlm_image_features_as_idefics3,
        fixes="GuardOnDataDependentSymNode: Could not guard on data-dependent expression at "
        "`if not any(real_images_inds)` (whether any image is not padding decides a branch)",
    ),
    Patch(
        name="idefics2_vision_mask_always_built",
        target="transformers.models.idefics2.modeling_idefics2:torch",
        replacement=_TorchWithPaddedPatchesAssumed("torch"),
        fixes="GuardOnDataDependentSymNode at `if not torch.any(~patch_attention_mask)` in "
        "Idefics2VisionTransformer.forward (the mask is dropped when no patch is padded)",
    ),
)
