"""Patches of how vision-language models hand their image features over.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

import sys
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


# qwen2_vl-style vision towers (flattened patches with a (t, h, w) grid per image). Upstream loops
# over the grid's rows in Python (`rot_pos_emb`: `for t, h, w in grid_thw`, `torch.arange(h)`),
# sizes a rotary table by `grid_thw[:, 1:].max()`, and attends frame by frame through
# `torch.split(..., lengths.tolist())`: each fixes the number of images or reads a tensor's value,
# which torch.export cannot. The replacements compute the same per-patch positions and a
# block-diagonal attention mask with tensor operations on the patch axis.


def _grid_positions(grid_thw: torch.Tensor, patches: int, merge: int) -> tuple[torch.Tensor, ...]:
    """Per patch, in the processor's order: its image, its frame, its row and column in the image
    (the order of upstream's `rot_pos_emb`: frames, then merge blocks row by row, then the
    `merge` x `merge` patches of a block)."""
    per_image = grid_thw.prod(-1)
    ends = per_image.cumsum(0)
    index = torch.arange(patches, device=grid_thw.device)
    image = (index[:, None] >= ends[None, :]).sum(-1)
    local = index - (ends - per_image)[image]
    height, width = grid_thw[image, 1], grid_thw[image, 2]
    frame, in_frame = local // (height * width), local % (height * width)
    block, in_block = in_frame // (merge * merge), in_frame % (merge * merge)
    row = block // (width // merge) * merge + in_block // merge
    column = block % (width // merge) * merge + in_block % merge
    return image, frame, row, column


def _frame_mask(same: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [1, 1, patches, patches] mask of a patch-by-patch `same` chunk relation."""
    mask = torch.zeros(same.shape, dtype=dtype, device=same.device)
    return mask.masked_fill(~same, torch.finfo(dtype).min)[None, None]


def _grid_rotary(self: Any, row: torch.Tensor, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # rot_pos_emb's table lookup `outer(arange(max), inv_freq)[position]` is `position * inv_freq`.
    inv_freq = self.rotary_pos_emb.inv_freq
    rotary = torch.cat([row[:, None].to(inv_freq.dtype) * inv_freq, column[:, None].to(inv_freq.dtype) * inv_freq], -1)
    emb = torch.cat((rotary, rotary), dim=-1)
    return emb.cos(), emb.sin()


def _qwen2_vl_vision_forward(self: Any, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    hidden_states = self.patch_embed(hidden_states)
    image, frame, row, column = _grid_positions(grid_thw, hidden_states.shape[0], self.spatial_merge_size)
    # cu_seqlens' chunks are the frames of each image: a patch attends to its own frame only.
    same_frame = (image[:, None] == image[None, :]) & (frame[:, None] == frame[None, :])
    mask = _frame_mask(same_frame, hidden_states.dtype)
    embeddings = _grid_rotary(self, row, column)
    for block in self.blocks:
        hidden_states = block(hidden_states, cu_seqlens=None, position_embeddings=embeddings, attention_mask=mask, **kwargs)
    return self.merger(hidden_states)


def _qwen2_5_vl_vision_forward(self: Any, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    # Upstream reorders the merge blocks window by window (get_window_index), attends chunk by
    # chunk and orders them back after the merger. Attention over a chunk does not depend on the
    # order of its tokens, and the merger takes each merge block whole, so attending in the
    # processor's order with a mask of the same chunks gives the same features.
    hidden_states = self.patch_embed(hidden_states)
    image, frame, row, column = _grid_positions(grid_thw, hidden_states.shape[0], self.spatial_merge_size)
    same_frame = (image[:, None] == image[None, :]) & (frame[:, None] == frame[None, :])
    # A window is `window_size` pixels of merge blocks, counted from the image's top left.
    window = self.window_size // self.spatial_merge_size // self.patch_size * self.spatial_merge_size
    same_window = same_frame & (row[:, None] // window == row[None, :] // window)
    same_window &= column[:, None] // window == column[None, :] // window
    full, windowed = _frame_mask(same_frame, hidden_states.dtype), _frame_mask(same_window, hidden_states.dtype)
    embeddings = _grid_rotary(self, row, column)
    for index, block in enumerate(self.blocks):
        mask = full if index in self.fullatt_block_indexes else windowed
        hidden_states = block(hidden_states, cu_seqlens=None, position_embeddings=embeddings, attention_mask=mask, **kwargs)
    return self.merger(hidden_states)


def _qwen2_vl_vision_attention(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    rotary_pos_emb: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    # Upstream's non-flash branch with the frames' block-diagonal mask instead of one attention
    # call per frame.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(self).__module__]

    length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = modeling.apply_rotary_pos_emb_vision(query, key, *position_embeddings)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    implementation = self.config._attn_implementation
    attention = modeling.eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    output, _ = attention(
        self, query, key, value, attention_mask=attention_mask, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
    )
    return self.proj(output.reshape(length, -1).contiguous())


def _qwen2_vl_image_features_in_one_tensor(
    self: Any, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None
) -> torch.Tensor:
    # Upstream splits the features per image with `split_sizes.tolist()` (values of a tensor);
    # the vision encoder graph returns them concatenated, in image order.
    return self.visual(pixel_values.type(self.visual.dtype), grid_thw=image_grid_thw)


_QWEN2_VL = "transformers.models.qwen2_vl.modeling_qwen2_vl"
_GRID_FAILURE = (
    "torch.export cannot trace qwen2_vl's vision tower over a dynamic number of images: it loops over "
    "grid_thw's rows, sizes tensors by their values and splits by split_sizes.tolist() "
    "(GuardOnDataDependentSymNode / a dynamic image axis specialized)"
)

PATCHES += (
    Patch(
        name="qwen2_vl_vision_positions_from_grid",
        target=f"{_QWEN2_VL}:Qwen2VisionTransformerPretrainedModel.forward",
        replacement=_qwen2_vl_vision_forward,
        fixes=_GRID_FAILURE,
    ),
    Patch(
        name="qwen2_vl_vision_attention_masked",
        target=f"{_QWEN2_VL}:VisionAttention.forward",
        replacement=_qwen2_vl_vision_attention,
        fixes=_GRID_FAILURE,
    ),
    Patch(
        name="qwen2_vl_image_features_in_one_tensor",
        target=f"{_QWEN2_VL}:Qwen2VLModel.get_image_features",
        replacement=_qwen2_vl_image_features_in_one_tensor,
        fixes=_GRID_FAILURE,
    ),
)

_QWEN2_5_VL = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
_WINDOW_FAILURE = (
    "torch.export cannot trace qwen2_5_vl's vision tower over a dynamic number of images: besides "
    "qwen2_vl's grid loops, get_window_index loops over grid_thw's rows and reads window lengths "
    "with .tolist() / .item() (GuardOnDataDependentSymNode / a dynamic image axis specialized)"
)

PATCHES += (
    Patch(
        name="qwen2_5_vl_vision_windows_from_grid",
        target=f"{_QWEN2_5_VL}:Qwen2_5_VisionTransformerPretrainedModel.forward",
        replacement=_qwen2_5_vl_vision_forward,
        fixes=_WINDOW_FAILURE,
    ),
    Patch(
        name="qwen2_5_vl_vision_attention_masked",
        target=f"{_QWEN2_5_VL}:Qwen2_5_VLVisionAttention.forward",
        replacement=_qwen2_vl_vision_attention,
        fixes=_WINDOW_FAILURE,
    ),
    Patch(
        name="qwen2_5_vl_image_features_in_one_tensor",
        target=f"{_QWEN2_5_VL}:Qwen2_5_VLModel.get_image_features",
        replacement=_qwen2_vl_image_features_in_one_tensor,
        fixes=_WINDOW_FAILURE,
    ),
)


def _glm4v_vision_forward(self: Any, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    # qwen2_vl's tower with glm4v's additions around it (post-conv norm, interpolated learned
    # position embeddings, downsampling convolution): upstream's order, frames by mask.
    hidden_states = self.post_conv_layernorm(self.patch_embed(hidden_states))
    image, frame, row, column = _grid_positions(grid_thw, hidden_states.shape[0], self.spatial_merge_size)
    mask = _frame_mask((image[:, None] == image[None, :]) & (frame[:, None] == frame[None, :]), hidden_states.dtype)
    embeddings = _grid_rotary(self, row, column)
    # The embeddings take each patch's image size instead of per-frame lengths (see below).
    hidden_states = self.embeddings(hidden_states, None, grid_thw[image], row, column)
    for block in self.blocks:
        hidden_states = block(hidden_states, cu_seqlens=None, position_embeddings=embeddings, attention_mask=mask, **kwargs)
    hidden_states = self.post_layernorm(hidden_states)
    hidden_states = hidden_states.view(-1, self.spatial_merge_size, self.spatial_merge_size, hidden_states.shape[-1])
    hidden_states = self.downsample(hidden_states.permute(0, 3, 1, 2)).view(-1, self.config.out_hidden_size)
    return self.merger(hidden_states)


def _glm4v_position_embeddings(
    self: Any, embeddings: torch.Tensor, lengths: Any, patch_shapes: torch.Tensor, h_coords: torch.Tensor, w_coords: torch.Tensor
) -> torch.Tensor:
    # Upstream's bicubic interpolation of the learned position table at each patch's place in its
    # image (Glm4vVisionEmbeddings.forward), with the image size read per patch (`patch_shapes`:
    # (t, h, w) of each patch's image) instead of concatenated in a loop over per-frame lengths.
    weight = self.position_embedding.weight
    side = int(weight.shape[0] ** 0.5)
    table = weight.view(side, side, weight.shape[1]).permute(2, 0, 1).unsqueeze(0).float()
    height, width = patch_shapes[:, 1].float(), patch_shapes[:, 2].float()
    grid = torch.stack(((w_coords.float() + 0.5) / width * 2 - 1, (h_coords.float() + 0.5) / height * 2 - 1), dim=-1)
    sampled = torch.nn.functional.grid_sample(
        table, grid[None, :, None], mode="bicubic", align_corners=False, padding_mode="border"
    )
    return embeddings + sampled.squeeze(0).squeeze(-1).permute(1, 0).to(weight.dtype)


_GLM4V_FAILURE = (
    "torch.export cannot trace glm4v's vision tower over a dynamic number of images: qwen2_vl's grid "
    "loops, and its position embeddings concatenate each image's size in a loop over per-frame "
    "lengths read with .tolist() (GuardOnDataDependentSymNode / a dynamic image axis specialized)"
)

#: glm4v and glm4v_moe (the same vision tower, its classes copied under the type's prefix).
_GLM4V_TYPES = (("glm4v", "Glm4v"), ("glm4v_moe", "Glm4vMoe"))

PATCHES += tuple(
    patch
    for model_type, prefix in _GLM4V_TYPES
    for patch in (
        Patch(
            name=f"{model_type}_vision_positions_from_grid",
            target=f"transformers.models.{model_type}.modeling_{model_type}:{prefix}VisionModel.forward",
            replacement=_glm4v_vision_forward,
            fixes=_GLM4V_FAILURE,
        ),
        Patch(
            name=f"{model_type}_vision_position_embeddings_per_patch",
            target=f"transformers.models.{model_type}.modeling_{model_type}:{prefix}VisionEmbeddings.forward",
            replacement=_glm4v_position_embeddings,
            fixes=_GLM4V_FAILURE,
        ),
        Patch(
            name=f"{model_type}_vision_attention_masked",
            target=f"transformers.models.{model_type}.modeling_{model_type}:{prefix}VisionAttention.forward",
            replacement=_qwen2_vl_vision_attention,
            fixes=_GLM4V_FAILURE,
        ),
        Patch(
            name=f"{model_type}_image_features_in_one_tensor",
            target=f"transformers.models.{model_type}.modeling_{model_type}:{prefix}Model.get_image_features",
            replacement=_qwen2_vl_image_features_in_one_tensor,
            fixes=_GLM4V_FAILURE,
        ),
    )
)
