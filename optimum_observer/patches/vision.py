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


def _best_tiles(image_sizes: torch.Tensor, pinpoints: list[list[int]], tile: int) -> torch.Tensor:
    """[images, 2]: the (rows, columns) of tiles of each image's best resolution among `pinpoints`,
    in tensor ops. transformers' `select_best_resolution` (image_processing_utils.py) in Python
    floats: the largest effective resolution, then the least wasted one, the first on a tie."""
    sizes = image_sizes.to(torch.float64)
    height, width = sizes[:, :1], sizes[:, 1:]
    candidates = torch.tensor(pinpoints, dtype=torch.float64, device=image_sizes.device)
    scale = torch.minimum(candidates[:, 1] / width, candidates[:, 0] / height)
    effective = torch.minimum(torch.floor(width * scale) * torch.floor(height * scale), width * height)
    wasted = candidates[:, 0] * candidates[:, 1] - effective
    # One integer key, exact in int64: effective first, less waste on a tie.
    largest = max(h * w for h, w in pinpoints) + 1
    best = torch.argmax(effective.to(torch.int64) * largest - wasted.to(torch.int64), dim=1)
    return candidates.to(torch.int64)[best] // tile


def _kept_span(
    original: torch.Tensor, other_original: torch.Tensor, current: torch.Tensor, other_current: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end along one axis of llava_next's `unpad_image` (modeling_llava_next.py): the
    padding the resize to the other axis added, split between both ends."""
    new = torch.floor(torch.round(original * (other_current / other_original) * 1e7) / 1e7)
    padding = torch.div(current - new, 2, rounding_mode="floor")
    return padding, current - padding


def _llava_next_image_features_packed(
    self: Any,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
) -> torch.Tensor:
    # Upstream's features, packed as upstream's `pack_image_features` packs them, for the images'
    # [images, tiles, channels, height, width] as the processor pads them: every image of
    # `image_sizes` gets its base tile, then its grid of tiles unpadded to the image's aspect
    # ratio, row by row, each row followed by `image_newline`. Upstream computes each image's tile
    # count and kept rows with Python numbers read from `image_sizes` and loops over the images,
    # which fixes the number of images and the sizes in the graph; here they are tensors, every
    # image is laid out on the largest grid and the positions it keeps are selected by a mask.
    if pixel_values.dim() != 5:
        raise NotImplementedError(
            "llava_next exports images as its processor makes them, [images, tiles, channels, height, "
            f"width]; got pixel_values of {pixel_values.dim()} dimensions"
        )
    config = self.config
    layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    images, tiles = pixel_values.shape[:2]
    hidden_states = self.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    selected = torch.cat([hidden_states[i] for i in layers], dim=-1)
    selected = selected[:, 1:] if strategy == "default" else selected
    features = self.multi_modal_projector(selected)
    side = config.vision_config.image_size // config.vision_config.patch_size
    tokens, dim = features.shape[1:]
    features = features.reshape(images, tiles, tokens, dim)

    grid = _best_tiles(image_sizes, config.image_grid_pinpoints, config.vision_config.image_size)
    rows, columns = max(p[0] for p in config.image_grid_pinpoints), max(p[1] for p in config.image_grid_pinpoints)
    rows, columns = rows // config.vision_config.image_size * side, columns // config.vision_config.image_size * side
    r = torch.arange(rows, device=features.device)[None, :, None]
    c = torch.arange(columns, device=features.device)[None, None, :]
    grid_columns = grid[:, 1, None, None]
    tile = 1 + (r // side) * grid_columns + c // side
    token = (r % side) * side + c % side
    index = (torch.arange(images, device=features.device)[:, None, None] * tiles + tile.clamp(max=tiles - 1)) * tokens
    placed = features.reshape(-1, dim)[(index + token).reshape(-1)].reshape(images, rows, columns, dim)

    original = image_sizes.to(torch.float64)
    current = (grid * side).to(torch.float64)
    wider = original[:, 1] / original[:, 0] > current[:, 1] / current[:, 0]
    row_span = _kept_span(original[:, 0], original[:, 1], current[:, 0], current[:, 1])
    column_span = _kept_span(original[:, 1], original[:, 0], current[:, 1], current[:, 0])
    first_row = torch.where(wider, row_span[0], 0.0)[:, None, None]
    end_row = torch.where(wider, row_span[1], current[:, 0])[:, None, None]
    first_column = torch.where(wider, 0.0, column_span[0])[:, None, None]
    end_column = torch.where(wider, current[:, 1], column_span[1])[:, None, None]
    kept_row = (r >= first_row) & (r < end_row)
    kept = kept_row & (c >= first_column) & (c < end_column)

    newline = self.image_newline.to(features.dtype).expand(images, rows, 1, dim)
    laid_out = torch.cat([features[:, 0], torch.cat([placed, newline], dim=2).reshape(images, -1, dim)], dim=1)
    mask = torch.cat(
        [
            torch.ones(images, tokens, dtype=torch.bool, device=features.device),
            torch.cat([kept, kept_row[:, :, :1].expand(images, rows, 1)], dim=2).reshape(images, -1),
        ],
        dim=1,
    )
    return laid_out[mask]


def _mistral3_image_features_on_a_grid(
    self: Any,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    # Upstream's features (pixtral's vision tower, mistral3's projector and patch merger), for the
    # images' [images, channels, height, width] as the processor pads them, as one
    # [image_tokens, hidden] tensor. Upstream cuts each image's patches by its size, attends
    # over all images as one sequence under a block-diagonal mask and merges patches image by
    # image, reading `image_sizes` as Python numbers; here every image keeps the padded grid, its
    # attention masks the keys outside its own size (the same scores as upstream's blocks), its
    # positions are upstream's `row * max_width + column`, and a mask selects the merged patches
    # inside its size, in upstream's row-major order.
    layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    tower, projector = self.vision_tower, self.multi_modal_projector
    patch, merge = tower.patch_size, self.config.spatial_merge_size
    embeds = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype))
    images, dim, rows, columns = embeds.shape
    device = embeds.device
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(columns, device=device)[None, :]
    patch_rows, patch_columns = image_sizes[:, 0, None, None] // patch, image_sizes[:, 1, None, None] // patch
    inside = ((r < patch_rows) & (c < patch_columns)).reshape(images, -1)
    hidden = tower.ln_pre(embeds.flatten(2).transpose(1, 2))
    positions = (r * (tower.config.image_size // tower.config.patch_size) + c).reshape(-1)
    position_embeddings = tower.patch_positional_embedding(hidden, positions)
    attention_mask = torch.zeros(inside.shape, dtype=hidden.dtype, device=device)
    attention_mask = attention_mask.masked_fill(~inside, torch.finfo(hidden.dtype).min)[:, None, None, :]
    attention_mask = attention_mask.expand(images, 1, rows * columns, rows * columns)
    states = tower.transformer(
        hidden,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        output_hidden_states=True,
        return_dict=True,
    ).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    selected = torch.cat([states[i] for i in layers], dim=-1)

    features = projector.norm(selected)
    width = features.shape[-1]
    grid = features.transpose(1, 2).reshape(images, width, rows, columns)
    merged = torch.nn.functional.unfold(grid, kernel_size=merge, stride=merge).transpose(1, 2)
    features = projector.linear_2(projector.act(projector.linear_1(projector.patch_merger.merging_layer(merged))))
    merged_r = torch.arange(rows // merge, device=device)[:, None]
    merged_c = torch.arange(columns // merge, device=device)[None, :]
    kept = (merged_r < patch_rows // merge) & (merged_c < patch_columns // merge)
    return features[kept.reshape(images, -1)]


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
    Patch(
        name="llava_next_image_features_packed",
        target="transformers.models.llava_next.modeling_llava_next:LlavaNextModel.get_image_features",
        replacement=_llava_next_image_features_packed,
        fixes="GuardOnDataDependentSymNode: Could not guard on data-dependent expression "
        "(IntTrueDiv(24, u0)) < (IntTrueDiv(24, u1)) (get_image_features reads each image's tile count "
        "and unpadded size from image_sizes as Python numbers and loops over the images)",
    ),
    Patch(
        name="llava_next_video_image_features_packed",
        target="transformers.models.llava_next_video.modeling_llava_next_video:LlavaNextVideoModel.get_image_features",
        replacement=_llava_next_image_features_packed,
        fixes="GuardOnDataDependentSymNode: Could not guard on data-dependent expression (llava_next's "
        "get_image_features, the same code)",
    ),
    Patch(
        name="mistral3_image_features_on_a_grid",
        target="transformers.models.mistral3.modeling_mistral3:Mistral3Model.get_image_features",
        replacement=_mistral3_image_features_on_a_grid,
        fixes="GuardOnDataDependentSymNode: Could not extract specialized integer from data-dependent "
        "expression u8 (pixtral's generate_block_attention_mask; its vision model and mistral3's patch "
        "merger read each image's size from image_sizes as Python numbers and loop over the images)",
    ),
)
