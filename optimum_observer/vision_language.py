"""Vision-language models (image-text-to-text): the three graphs a runtime needs, and how the
observed generate() is routed through them.

Takes: a loaded `AutoModelForImageTextToText` model of transformers' common layout (an outer
`...ForConditionalGeneration` whose `.model` has `get_image_features`, with the standard
`get/set_input_embeddings`, `get/set_decoder`, `get/set_output_embeddings`).
Gives: the three parts, each an `nn.Module` whose forward is exactly one graph
(:data:`PARTS`), :func:`routed`, which sends the model's own calls through those parts for the
duration of one observed run, and the synthetic batches of the default run
(:func:`reference_batches`).

File set (the convention of the Hugging Face ONNX VLM exports that transformers.js loads,
`onnx-community/*`; the same three roles as onnxruntime-genai's vision / embedding / text split,
with Optimum's input and output names):

* ``vision_encoder.onnx``: ``pixel_values`` [num_images, channels, height, width] ->
  ``image_features`` [num_images, image_tokens, hidden] (the vision tower, its feature-layer
  selection and the multimodal projector, i.e. the model's `get_image_features`);
* ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds`` (the text embedding);
* ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value`` (language model and
  head). "Merged" as in transformers.js: one graph serves the prompt (fed zero-length past
  tensors) and every later step, like the decoder-only ``model.onnx``.

The merge of image features into the embeddings is not a graph: the runtime does it (llava:
the image-token positions of ``input_ids`` take the features one to one, in order; see
``legacy_shim.ORTModelForImageTextToText``), as optimum-intel's visual-LM runtime does, because
it differs per model (variable tokens per image, grid positions) and is plain indexing.

Observation: :func:`routed` swaps, for one `with` block, the model's embedding (through
`set_input_embeddings`), its decoder (`set_decoder`) and head (`set_output_embeddings`, an
identity: the decoder part already applies it) and the inner model's `get_image_features`
for the parts, so one real `generate()` calls each part the way the runtime will, and the
observers on the parts record real calls and real outputs. Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

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


class VisionEncoder(torch.nn.Module):
    """`pixel_values` (and the other tensors the model's `get_image_features` is called with, such
    as qwen2_vl's `image_grid_thw`, under their parameter names) -> `image_features`: the model's
    own `get_image_features` with its config's feature layer and selection strategy."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = _inner(model)
        #: the model's own `get_image_features` returned one tensor per image (llava), not one
        #: tensor (gemma3): what :func:`routed` hands back to the model's code.
        self.returns_list = False

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **vision_inputs: torch.Tensor) -> VisionEncoderOutput:
        features = type(self.inner).get_image_features(self.inner, pixel_values=pixel_values, **vision_inputs)
        self.returns_list = not isinstance(features, torch.Tensor)
        if self.returns_list:
            # Images given by their pixels alone have one size, so one token count: stacked,
            # [num_images, image_tokens, hidden]. With a grid or sizes per image the counts
            # differ: concatenated in image order, [total_image_tokens, hidden].
            features = torch.cat(tuple(features)) if vision_inputs else torch.stack(tuple(features))
        return VisionEncoderOutput(image_features=features)


class TextEmbedding(torch.nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.embedding = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, return_dict: bool = True) -> TextEmbeddingOutput:
        return TextEmbeddingOutput(inputs_embeds=self.embedding(input_ids))


class TextDecoder(torch.nn.Module):
    """The language model and its head on `inputs_embeds`.

    Returns the logits of every position as `last_hidden_state`: during the observed run this
    module stands in for the decoder, whose caller reads `last_hidden_state` and applies the
    (then identity) head to it; the graph contract reads that field as `logits`.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()

    # While it stands in for the decoder, the model reaches its embedding through it.
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
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


@contextlib.contextmanager
def routed(model: Any, parts: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The model's own calls go through `parts` (built by :data:`PARTS` from this model) for the
    block; the model is given back as it was, also on an exception."""
    inner = _inner(model)
    embedding, decoder, head = model.get_input_embeddings(), model.get_decoder(), model.get_output_embeddings()
    had_features = "get_image_features" in vars(inner)
    vision = parts[VISION_ENCODER]

    signature = inspect.signature(type(inner).get_image_features)

    def get_image_features(*args: Any, **kwargs: Any) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]:
        # Tensors are the images' inputs (pixel values, grids, sizes); the other arguments are
        # the config's settings (what generate passes), which the part reads from the same config.
        bound = signature.bind(inner, *args, **kwargs).arguments
        tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
        features = vision(**tensors).image_features
        if not vision.returns_list:
            return features
        # The model concatenates the per-image tensors it gets back: one piece per image, or the
        # concatenation as one piece.
        return list(features) if features.dim() == 3 else (features,)

    try:
        model.set_input_embeddings(_Returning(parts[TEXT_EMBEDDING], "inputs_embeds"))
        model.set_decoder(parts[TEXT_DECODER])
        model.set_output_embeddings(torch.nn.Identity())
        inner.get_image_features = get_image_features
        yield
    finally:
        # The decoder first: the embedding is set through it.
        model.set_decoder(decoder)
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


#: text tokens after the image, per batch: two prompt lengths, then three.
PROMPT_LENGTHS = ((3, 6), (4, 2, 7))


def reference_batches(model: Any, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of 2 and 3 prompts of different lengths, one image each: each prompt
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
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(lengths), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = prompt
            attention_mask[row, longest - len(prompt) :] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, **images})
    return batches
