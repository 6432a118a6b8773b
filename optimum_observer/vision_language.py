"""Vision-language models (image-text-to-text): the three graphs a runtime needs, and how the
observed generate() is routed through them.

Takes: a loaded `AutoModelForImageTextToText` model of transformers' common layout (an outer
`...ForConditionalGeneration` whose `.model` has `get_image_features` and, as a child module, the
language model holding the input embeddings, with the standard `get/set_input_embeddings` and
`get/set_output_embeddings`).
Gives: the three parts, each an `nn.Module` whose forward is exactly one graph
(:data:`PARTS`), :func:`routed`, which sends the model's own calls through those parts for the
duration of one observed run, and the synthetic batches of the default run
(:func:`reference_batches`).

File set (the convention of the Hugging Face ONNX VLM exports that transformers.js loads,
`onnx-community/*`; the same three roles as onnxruntime-genai's vision / embedding / text split,
with Optimum's input and output names):

* ``vision_encoder.onnx``: ``pixel_values`` of the rank the model takes ([num_images, channels,
  height, width]; llava_next's [num_images, tiles, channels, height, width]; [prompts, images per
  prompt, channels, height, width] for models that tile images, idefics3) and every other tensor
  `get_image_features` is called with, under its parameter name (``image_sizes``,
  ``pixel_attention_mask``: observed, see `GraphContract.observed_inputs`) -> ``image_features``
  [image_tokens, hidden], every image's features concatenated in order (the vision tower, its
  feature-layer selection and the
  multimodal projector, i.e. the model's `get_image_features`);
* ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds`` (the text embedding);
* ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask`` (2-D), ``position_ids``,
  ``token_type_ids`` (where the decoder part builds the model's mask and the run passed them, see
  :class:`TextDecoder`),
  ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value`` (language model and
  head). "Merged" as in transformers.js: one graph serves the prompt (fed zero-length past
  tensors) and every later step, like the decoder-only ``model.onnx``.

The merge of image features into the embeddings is not a graph: the runtime does it (the
image-token positions of ``input_ids`` take the rows of ``image_features`` in order, however many
tokens each image has; see ``legacy_shim.ORTModelForImageTextToText``), as optimum-intel's
visual-LM runtime does: it is plain indexing.

Observation: :func:`routed` swaps, for one `with` block, the model's embedding (through
`set_input_embeddings`), its language model (the inner model's attribute holding it) and head (`set_output_embeddings`, an
identity: the decoder part already applies it) and the inner model's `get_image_features`
for the parts, so one real `generate()` calls each part the way the runtime will, and the
observers on the parts record real calls and real outputs. Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from .tasks import TEXT_DECODER, TEXT_EMBEDDING, VISION_ENCODER


@dataclasses.dataclass
class VisionEncoderOutput(ModelOutput):
    image_features: torch.Tensor | None = None


@dataclasses.dataclass
class TextEmbeddingOutput(ModelOutput):
    inputs_embeds: torch.Tensor | None = None


def _inner(model: Any) -> torch.nn.Module:
    """The inner model whose forward merges the image features (`LlavaModel` of a llava)."""
    return model.model


def _decoder_attribute(model: Any) -> str:
    """The inner model's attribute holding the language model: its child that holds the model's
    input embeddings (`language_model` of a llava, `text_model` of an idefics3, which
    `get_decoder()` does not find: it returns the inner model itself, and `set_decoder` is a no-op)."""
    embedding = model.get_input_embeddings()
    for name, child in _inner(model).named_children():
        if any(module is embedding for module in child.modules()):
            return name
    raise ValueError(f"{type(_inner(model)).__name__} has no child module holding the input embeddings")


class VisionEncoder(torch.nn.Module):
    """`pixel_values` (of the rank the model takes) and whatever else the model's
    `get_image_features` is called with (`pixel_attention_mask`, `image_sizes`, qwen2_vl's
    `image_grid_thw`, ...: tensors, passed by their parameter names) -> `image_features`
    [image_tokens, hidden]: the features of every image, concatenated in order, as the image
    placeholder tokens take them; the model's own `get_image_features` with its config's feature
    layer and selection strategy."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = _inner(model)
        #: the features of the last call in the structure the model's own `get_image_features`
        #: returned them (one tensor per image, llava; one [images, tokens, hidden] tensor,
        #: idefics3, whose merge reads that shape): what :func:`routed` hands back to the model.
        self.as_returned: Callable[[torch.Tensor], Any] | None = None

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **vision_inputs: torch.Tensor
    ) -> VisionEncoderOutput:
        features = type(self.inner).get_image_features(self.inner, pixel_values=pixel_values, **vision_inputs)
        concatenated, self.as_returned = _concatenated(features)
        return VisionEncoderOutput(image_features=concatenated)


def _concatenated(features: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Image features as one [tokens, hidden] tensor, and the inverse: that tensor back in the
    structure `features` had."""
    if isinstance(features, torch.Tensor):
        shape = features.shape
        return features.reshape(-1, shape[-1]), lambda concatenated: concatenated.reshape(shape)
    shapes = [f.shape for f in features]
    sizes = [f.numel() // f.shape[-1] for f in features]

    def as_list(concatenated: torch.Tensor) -> list[torch.Tensor]:
        return [part.reshape(shape) for part, shape in zip(concatenated.split(sizes), shapes)]

    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features]), as_list


class TextEmbedding(torch.nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.embedding = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, return_dict: bool = True) -> TextEmbeddingOutput:
        return TextEmbeddingOutput(inputs_embeds=self.embedding(input_ids))


#: transformers' own hooks that build a model's decoder mask (a causal mask with bidirectional
#: image or prefix blocks, or a mapping of one mask per attention kind) from the 2-D padding mask,
#: which its outer model calls between merging the images and calling the decoder, and which
#: `generate` calls itself for compilable caches: (owner, method). "outer" is the
#: `...ForConditionalGeneration` class (gemma3's `create_masks_for_generate`, a mapping with
#: full/sliding masks and bidirectional image blocks from `token_type_ids`), "inner" its `.model`
#: (paligemma's `_update_causal_mask`, a 4-D prefix-LM mask). A model with none of them hands the
#: 2-D mask to its decoder unchanged (llava).
DECODER_MASK_HOOKS: tuple[tuple[str, str], ...] = (
    ("outer", "create_masks_for_generate"),
    ("inner", "_update_causal_mask"),
)


def decoder_mask_hook(model: Any) -> tuple[str, str] | None:
    """The entry of :data:`DECODER_MASK_HOOKS` this model uses, or None (:func:`class_mask_hook`)."""
    return class_mask_hook(type(model), type(_inner(model)))


def class_mask_hook(outer: type, inner: type) -> tuple[str, str] | None:
    """The entry of :data:`DECODER_MASK_HOOKS` the outer class (or the inner model's class) defines
    itself, or None. Inherited ones do not count: mllama's shared base class has an
    `_update_causal_mask` for its text model, which its inner model never calls."""
    owners = {"outer": outer, "inner": inner}
    return next(((owner, name) for owner, name in DECODER_MASK_HOOKS if name in vars(owners[owner])), None)


class TextDecoder(torch.nn.Module):
    """The language model and its head on `inputs_embeds`.

    Returns the logits of every position as `last_hidden_state`: during the observed run this
    module stands in for the decoder, whose caller reads `last_hidden_state` and applies the
    (then identity) head to it; the graph contract reads that field as `logits`.

    Where the outer model builds the decoder's mask itself (:data:`DECODER_MASK_HOOKS`), this
    part takes the 2-D `attention_mask` (and `token_type_ids`, 1 at image tokens, of the tokens it
    is given) and builds that mask with the model's own hook, so the graph has the runtime's 2-D
    mask as input and the model's mask inside.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.decoder = getattr(_inner(model), _decoder_attribute(model))
        self.head = model.get_output_embeddings()
        self.config = model.config
        self.mask_hook = decoder_mask_hook(model)
        self._outer_class, self._inner = type(model), _inner(model)

    # While it stands in for the decoder, the model reaches its embedding through it.
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def decoder_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        cache_position: torch.Tensor,
        token_type_ids: torch.Tensor | None,
    ) -> Any:
        """The mask the model's decoder takes, built by the model's own hook (`token_type_ids`
        of every position, cached ones included)."""
        owner, name = self.mask_hook
        if owner == "outer":
            return getattr(self._outer_class, name)(
                config=self.config,
                input_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache_position=cache_position,
                past_key_values=past_key_values,
                position_ids=position_ids,
                token_type_ids=token_type_ids,
            )
        # The last argument, is_training: the inference mask.
        return getattr(type(self._inner), name)(
            self._inner, attention_mask, token_type_ids, past_key_values, cache_position, inputs_embeds, False
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if self.mask_hook is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            if cache_position is None:
                new_tokens = inputs_embeds.shape[1]
                cache_position = torch.arange(past_length, past_length + new_tokens, device=inputs_embeds.device)
            if token_type_ids is not None:
                # The hooks index token types by absolute position (generate only ever gives them
                # the prompt's); the cached positions before these tokens count as text here,
                # which is exact for generate, whose later steps are text tokens.
                cached = torch.zeros_like(token_type_ids[:, :1]).expand(-1, past_length)
                token_type_ids = torch.cat([cached, token_type_ids], dim=1)
            attention_mask = self.decoder_mask(
                inputs_embeds, attention_mask, position_ids, past_key_values, cache_position, token_type_ids
            )
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            cache_position=cache_position,
            return_dict=True,
            **kwargs,
        )
        return BaseModelOutputWithPast(
            last_hidden_state=self.head(outputs.last_hidden_state),
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


#: graph contract module name -> the part observed and exported for it.
PARTS: dict[str, type[torch.nn.Module]] = {
    VISION_ENCODER: VisionEncoder,
    TEXT_EMBEDDING: TextEmbedding,
    TEXT_DECODER: TextDecoder,
}


class _Returning(torch.nn.Module):
    """Calls `part` and returns one field of its output: what the model's code expects back."""

    def __init__(self, part: torch.nn.Module, field: str):
        super().__init__()
        self.part, self.field = part, field

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.part(*args, **kwargs)[self.field]


class _DecoderGivenModelInputs(torch.nn.Module):
    """Stands in for the decoder of a model that builds the decoder's mask itself: calls the
    decoder part with the 2-D `attention_mask` and the `token_type_ids` the inner model was given
    (:meth:`record`, a forward pre-hook on it) instead of the mask it built from them, which the
    part builds again with the same hook (:class:`TextDecoder`)."""

    def __init__(self, part: TextDecoder, inner: torch.nn.Module):
        super().__init__()
        self.part = part
        self._signature = inspect.signature(inner.forward)
        self._given: dict[str, Any] = {}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.part.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.part.set_input_embeddings(value)

    def record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = self._signature.bind_partial(*args, **kwargs).arguments
        self._given = {name: given.get(name) for name in ("attention_mask", "token_type_ids")}

    def forward(self, *args: Any, attention_mask: Any = None, **kwargs: Any) -> BaseModelOutputWithPast:
        # `attention_mask` is the mask the inner model built; the part builds it from the given one.
        return self.part(*args, **kwargs, **self._given)


@contextlib.contextmanager
def routed(model: Any, parts: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The model's own calls go through `parts` (built by :data:`PARTS` from this model) for the
    block; the model is given back as it was, also on an exception."""
    inner = _inner(model)
    slot = _decoder_attribute(model)
    embedding, decoder, head = model.get_input_embeddings(), getattr(inner, slot), model.get_output_embeddings()
    had_features = "get_image_features" in vars(inner)
    vision = parts[VISION_ENCODER]
    text_decoder = parts[TEXT_DECODER]
    signature = inspect.signature(type(inner).get_image_features)
    variadic = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        # The tensors it is called with go to the part by their parameter names; the settings
        # (feature layer, selection strategy) are the config's, which the part reads too.
        bound = signature.bind(inner, *args, **kwargs).arguments
        extra = bound.pop(variadic[0], {}) if variadic else {}
        tensors = {k: v for k, v in {**bound, **extra}.items() if isinstance(v, torch.Tensor)}
        features = vision(**tensors).image_features
        return vision.as_returned(features)

    recording = None
    try:
        model.set_input_embeddings(_Returning(parts[TEXT_EMBEDDING], "inputs_embeds"))
        if text_decoder.mask_hook is None:
            setattr(inner, slot, text_decoder)
        else:
            stand_in = _DecoderGivenModelInputs(text_decoder, inner)
            recording = inner.register_forward_pre_hook(stand_in.record, with_kwargs=True)
            setattr(inner, slot, stand_in)
        model.set_output_embeddings(torch.nn.Identity())
        inner.get_image_features = get_image_features
        yield
    finally:
        if recording is not None:
            recording.remove()
        # The decoder first: the embedding is set through it.
        setattr(inner, slot, decoder)
        model.set_input_embeddings(embedding)
        model.set_output_embeddings(head)
        if not had_features:
            vars(inner).pop("get_image_features", None)


def image_token_id(model: Any) -> int:
    return int(model.config.image_token_id)


def image_size(model: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the images the vision tower takes."""
    vision = model.config.vision_config
    size = vision.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return getattr(vision, "num_channels", 3), height, width


def _pixel_attention_mask(pixel_values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    # What the image processors of idefics2/idefics3/smolvlm give: 1 on every pixel of a real
    # image (their tiles are never padded), 0 on the all-zero padding images.
    height, width = pixel_values.shape[-2:]
    return real[..., None, None].expand(*real.shape, height, width).long()


def _takes_grids(model: Any) -> bool:
    """The vision tower takes flattened patches with a (t, h, w) grid per image (qwen2_vl's
    layout), as its config says."""
    vision = model.config.vision_config
    return all(hasattr(vision, a) for a in ("temporal_patch_size", "spatial_merge_size", "patch_size"))


def _grid_images(model: Any, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` images as qwen2_vl's image processor gives them: `pixel_values` [patches,
    channels * temporal_patch_size * patch_size**2] and `image_grid_thw` [count, 3], one frame
    each, grids of two sizes (2 x 2 and 2 x 3 merge blocks) in turn."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)
    grids = torch.tensor([[1, 2 * merge, (2 + i % 2) * merge] for i in range(count)])
    width = channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn((int(grids.prod(-1).sum()), width), generator=generator)
    return {"pixel_values": pixel_values.to(model.dtype), "image_grid_thw": grids}


def _images(model: Any, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` images in the layout the model's vision tower takes (see :func:`_takes_grids`),
    or [count, channels, height, width] of the config's image size."""
    if _takes_grids(model):
        return _grid_images(model, count, generator)
    return {"pixel_values": torch.randn((count, *image_size(model)), generator=generator).to(model.dtype)}


def _one_image(images: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    if "image_grid_thw" not in images:
        return {"pixel_values": images["pixel_values"][index : index + 1]}
    grids = images["image_grid_thw"]
    start = int(grids[:index].prod(-1).sum())
    end = start + int(grids[index].prod())
    return {"pixel_values": images["pixel_values"][start:end], "image_grid_thw": grids[index : index + 1]}


def tokens_per_image(model: Any, images: dict[str, torch.Tensor] | None = None) -> list[int]:
    """How many placeholder tokens each image takes: observed, image by image, through the part
    (default: one image of the model's layout)."""
    images = images or _images(model, 1, torch.Generator().manual_seed(0))
    count = len(images["image_grid_thw"]) if "image_grid_thw" in images else len(images["pixel_values"])
    part = VisionEncoder(model)
    with torch.no_grad():
        features = [part(**_one_image(images, i)).image_features for i in range(count)]
    return [f.reshape(-1, f.shape[-1]).shape[0] for f in features]


#: (start, end) config attributes of the tokens around an image's placeholders, first found wins
#: (qwen2_vl's rope index finds an image by its start token).
IMAGE_BOUNDARIES = (("vision_start_token_id", "vision_end_token_id"), ("image_start_token_id", "image_end_token_id"))


def _placeholders(model: Any, tokens: int) -> list[int]:
    config = model.config
    image = [image_token_id(model)] * tokens
    for start, end in IMAGE_BOUNDARIES:
        if getattr(config, start, None) is not None and getattr(config, end, None) is not None:
            return [int(getattr(config, start)), *image, int(getattr(config, end))]
    return image


def _special_ids(model: Any) -> set[int]:
    """Every `*_token_id` of the config (image, video, boundaries, pad...): random text avoids them."""
    config = model.config
    ids = {getattr(config, k, None) for k in dir(config) if k.endswith("_token_id") or k.endswith("_token_index")}
    return {int(i) for i in ids if isinstance(i, int)}


#: How the default run builds a tensor `get_image_features` takes beside `pixel_values`, by
#: parameter name, from the batch's pixel values and which of their images are real (a bool
#: tensor of their leading axes). A parameter without an entry is not passed.
VISION_INPUT_BUILDERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "pixel_attention_mask": _pixel_attention_mask,
}

#: The ranks of `pixel_values` the default run tries, in order: [images, C, H, W] (llava), then
#: [prompts, images per prompt, C, H, W] with all-zero padding images (idefics3, smolvlm).
PIXEL_VALUE_RANKS = (4, 5)


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How the model takes images, as asked from the model itself (:func:`image_layout`)."""

    #: 4: [images, C, H, W]; 5: [prompts, images per prompt, C, H, W].
    rank: int
    #: placeholder tokens one image takes: its features through the vision part.
    tokens_per_image: int
    #: the tensors `get_image_features` takes beside `pixel_values` that the run passes.
    extra_inputs: tuple[str, ...]

    def vision_inputs(self, pixel_values: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pixel_values` and the extra inputs for them."""
        extra = {name: VISION_INPUT_BUILDERS[name](pixel_values, real) for name in self.extra_inputs}
        return {"pixel_values": pixel_values, **extra}


def unbuilt_vision_inputs(model: Any) -> list[str]:
    """The parameters `get_image_features` requires beside `pixel_values` that the default run
    cannot build without the model's processor (`image_sizes`, `high_res_pixel_values`...: not
    in :data:`VISION_INPUT_BUILDERS`)."""
    parameters = inspect.signature(type(_inner(model)).get_image_features).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    required = [n for n, p in list(parameters.items())[1:] if p.default is p.empty and p.kind not in variadic]
    return [name for name in required if name != "pixel_values" and name not in VISION_INPUT_BUILDERS]


def image_layout(model: Any) -> ImageLayout:
    """Asks the model how it takes images: one random image through the vision part, as
    `pixel_values` of each rank of :data:`PIXEL_VALUE_RANKS` in turn, with the extra inputs
    :data:`VISION_INPUT_BUILDERS` knows among `get_image_features`' parameters; the first rank it
    runs at is the model's. Raises a ValueError naming what each rank raised."""
    unknown = unbuilt_vision_inputs(model)
    if unknown:
        raise ValueError(f"get_image_features requires {', '.join(unknown)}, which the default run does not build")
    parameters = inspect.signature(type(_inner(model)).get_image_features).parameters
    extra = tuple(name for name in VISION_INPUT_BUILDERS if name in parameters)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(image_size(model), generator=generator).to(device=model.device, dtype=model.dtype)
    failures = []
    for rank in PIXEL_VALUE_RANKS:
        pixel_values = image.reshape((1,) * (rank - 3) + image.shape)
        layout = ImageLayout(rank, 0, extra)
        inputs = layout.vision_inputs(pixel_values, torch.ones(pixel_values.shape[:-3], dtype=torch.bool))
        try:
            with torch.no_grad():
                features = VisionEncoder(model)(**inputs).image_features
        except Exception as error:  # noqa: BLE001 - every rank is tried, each failure reported
            failures.append(f"as {list(pixel_values.shape)}: {type(error).__name__}: {error}")
            continue
        return dataclasses.replace(layout, tokens_per_image=features.shape[0])
    raise ValueError("get_image_features fails on one image " + "; ".join(failures))


#: per batch, the images of each prompt: two prompts of one image, then three prompts with two
#: images in the middle one, so that the number of images varies per batch and per prompt.
IMAGES_PER_PROMPT = ((1, 1), (1, 2, 1))
#: text tokens after the images, per batch: two prompt lengths, then three.
PROMPT_LENGTHS = ((3, 6), (4, 2, 7))


#: image (height, width) per batch, as fractions of the vision tower's image size: two sizes in the
#: batch of 2, one past the tower's size, so that what grows with the image (tiles, tokens) is seen
#: at two sizes; three smaller ones in the batch of 3, so that images the processor pads to the
#: largest of the batch (pixtral's) are seen at two heights and two widths, the height and width
#: told apart. None is small: torch.export takes the export example's sizes, the smallest observed,
#: as hints, and a size that makes a derived axis 1 (one merged patch column) gets fixed to 1.
IMAGE_SCALES = (((1, 1), (1, 2)), ((0.75, 0.5), (0.5, 0.5), (0.25, 0.25)))


def _left_padded(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of `prompts` padded on the left to the longest (as
    generate() is fed a batch)."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = prompt
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def reference_batches(model: Any, pad_token_id: int, processor: Any = None) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of 2 and 3 prompts of different lengths with 1 or 2 images each: each
    prompt is its images' placeholder tokens then random text ids (never the image token), with
    random pixel values of the config's image size, laid out as the model takes them
    (:func:`image_layout`); and, for a model whose forward takes them, `token_type_ids` 1 at the
    image tokens (what processors return as multimodal token types, `return_mm_token_type_ids`;
    gemma3 attends bidirectionally within an image by them). A vision tower that takes
    flattened patches with a grid (qwen2_vl) gets them in that layout (:func:`_grid_batches`).

    A model whose images need more than these layouts (`image_sizes`: a token count that depends
    on the image's size, llava_next, mistral3) gets its batches from its processor, when it has one
    with an `image_token` (:func:`processor_batches`): the processor knows how many placeholders
    an image of a given size takes, its tiles and what else the model needs."""
    if _takes_grids(model):
        return _grid_batches(model, pad_token_id)
    try:
        layout = image_layout(model)
    except ValueError:
        if getattr(processor, "image_token", None) is None:
            raise
        return processor_batches(model, processor)
    generator = torch.Generator().manual_seed(3)
    image_id = image_token_id(model)
    vocab = model.config.get_text_config().vocab_size
    batches = []
    for lengths, counts in zip(PROMPT_LENGTHS, IMAGES_PER_PROMPT):
        prompts = []
        for length, count in zip(lengths, counts):
            text = torch.randint(3, vocab, (length,), generator=generator)
            text = text.masked_fill(text == image_id, 3)
            prompts.append(torch.cat([torch.full((count * layout.tokens_per_image,), image_id), text]))
        input_ids, attention_mask = _left_padded(prompts, pad_token_id)
        images = torch.randn((sum(counts), *image_size(model)), generator=generator).to(model.dtype)
        if layout.rank == 4:
            pixel_values, real = images, torch.ones(len(images), dtype=torch.bool)
        else:
            # Prompts with fewer images than the most are padded with all-zero images, as the
            # image processors of these models do.
            real = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
            pixel_values = images.new_zeros((len(counts), max(counts), *images.shape[1:]))
            pixel_values[real] = images
        vision_inputs = layout.vision_inputs(pixel_values, real)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **vision_inputs}
        if "token_type_ids" in inspect.signature(model.forward).parameters:
            batch["token_type_ids"] = (input_ids == image_id).long()
        batches.append(batch)
    return batches


def _grid_batches(model: Any, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """:func:`reference_batches` for a vision tower that takes grids (:func:`_takes_grids`):
    left-padded batches of 2 and 3 prompts of different lengths, one image each: each prompt
    is the image's placeholder tokens (inside the config's image boundary tokens, if it has
    them) then random text ids (never a special token), with random images in the vision
    tower's layout (:func:`_images`)."""
    generator = torch.Generator().manual_seed(3)
    special = _special_ids(model)
    vocab = model.config.get_text_config().vocab_size
    batches = []
    for lengths in PROMPT_LENGTHS:
        images = _images(model, len(lengths), generator)
        prompts = []
        for length, tokens in zip(lengths, tokens_per_image(model, images)):
            text = torch.randint(3, vocab, (length,), generator=generator)
            text = text.masked_fill(torch.isin(text, torch.tensor(sorted(special))), 3)
            prompts.append(torch.cat([torch.tensor(_placeholders(model, tokens)), text]))
        input_ids, attention_mask = _left_padded(prompts, pad_token_id)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, **images})
    return batches


def processor_batches(model: Any, processor: Any) -> list[dict[str, torch.Tensor]]:
    """The batches of :func:`reference_batches` made by the model's processor (left padded)."""
    channels, height, width = image_size(model)
    generator = np.random.default_rng(3)
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    batches = []
    try:
        tokenizer.padding_side = "left"
        for scales, texts in zip(IMAGE_SCALES, _PROCESSOR_PROMPTS):
            shapes = [(max(1, round(height * h)), max(1, round(width * w)), channels) for h, w in scales]
            images = [generator.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
            prompts = [f"{processor.image_token}\n{text}" for text in texts]
            encoded = processor(images=images, text=prompts, padding=True, return_tensors="pt")
            batch = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            batches.append(batch)
    finally:
        tokenizer.padding_side = padding_side
    return batches


_PROCESSOR_PROMPTS = (
    ("What is this?", "Once upon a time, the capital of France was"),
    ("Describe the image.", "What is this?", "Hello, my dog is cute and"),
)
