"""Patches of how vision-language models hand their image features over.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

import sys
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
