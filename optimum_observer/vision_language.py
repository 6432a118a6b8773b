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

* ``vision_encoder.onnx``: ``pixel_values`` as the processor makes them ([num_images, channels,
  height, width], llava_next's [num_images, tiles, channels, height, width]) and every other
  tensor the model passes its `get_image_features` (``image_sizes``...: observed, see
  `GraphContract.observed_inputs`) -> ``image_features`` [image_tokens, hidden], the features of
  every image concatenated in order (the vision tower, its feature-layer selection and the
  multimodal projector, i.e. the model's `get_image_features`);
* ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds`` (the text embedding);
* ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask``, ``position_ids``,
  ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value`` (language model and
  head). "Merged" as in transformers.js: one graph serves the prompt (fed zero-length past
  tensors) and every later step, like the decoder-only ``model.onnx``.

The merge of image features into the embeddings is not a graph: the runtime does it (the
image-token positions of ``input_ids`` take the rows of ``image_features`` in order, however many
tokens each image has; see ``legacy_shim.ORTModelForImageTextToText``), as optimum-intel's
visual-LM runtime does: it is plain indexing.

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
import math
from collections.abc import Iterator
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


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """How the model's own `get_image_features` returned what the part returns as one
    [image_tokens, hidden] tensor: one tensor of `shapes[0]` (gemma3), or a list or tuple of
    tensors of `shapes` (llava: one per image; llava_next: one per image, of its own length)."""

    kind: type
    shapes: tuple[tuple[int, ...], ...]

    def restore(self, features: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]:
        if self.kind is torch.Tensor:
            return features.reshape(self.shapes[0])
        lengths = [math.prod(shape[:-1]) for shape in self.shapes]
        return self.kind(f.reshape(shape) for f, shape in zip(features.split(lengths), self.shapes))


class VisionEncoder(torch.nn.Module):
    """`pixel_values` (and whatever else the model passes its `get_image_features`: `image_sizes`,
    ...) -> `image_features` [image_tokens, hidden]: the model's own `get_image_features` with its
    config's feature layer and selection strategy, the features of every image concatenated in
    order, so that every model's features replace its placeholder tokens the same way."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = _inner(model)
        #: what the model's own `get_image_features` returned on the last eager call: what
        #: :func:`routed` hands back to the model's code.
        self.layout: FeatureLayout | None = None

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **inputs: Any) -> VisionEncoderOutput:
        features = type(self.inner).get_image_features(self.inner, pixel_values=pixel_values, **inputs)
        pieces = (features,) if isinstance(features, torch.Tensor) else tuple(features)
        if not torch.compiler.is_exporting():
            self.layout = FeatureLayout(type(features), tuple(tuple(p.shape) for p in pieces))
        flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in pieces])
        return VisionEncoderOutput(image_features=flat)


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

    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        # The tensors the model passes are the part's inputs; the other arguments are settings,
        # the config's (what generate passes), which the part reads from the same config.
        bound = signature.bind(inner, *args, **kwargs)
        bound.apply_defaults()
        named = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        tensors = {name: value for name, value in named.items() if isinstance(value, torch.Tensor)}
        features = vision(**tensors).image_features
        return vision.layout.restore(features)

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


def tokens_per_image(model: Any) -> int:
    """How many placeholder tokens one image takes: observed, from one image through the part."""
    with torch.no_grad():
        one = torch.zeros((1, *image_size(model)), dtype=model.dtype, device=model.device)
        return VisionEncoder(model)(pixel_values=one).image_features.shape[0]


#: text tokens after the image, per batch: two prompt lengths, then three.
PROMPT_LENGTHS = ((3, 6), (4, 2, 7))


#: image (height, width) per batch, as fractions of the vision tower's image size: two sizes in the
#: batch of 2, one past the tower's size, so that what grows with the image (tiles, tokens) is seen
#: at two sizes; three smaller ones in the batch of 3, so that images the processor pads to the
#: largest of the batch (pixtral's) are seen at two heights and two widths, the height and width
#: told apart. None is small: torch.export takes the export example's sizes, the smallest observed,
#: as hints, and a size that makes a derived axis 1 (one merged patch column) gets fixed to 1.
IMAGE_SCALES = (((1, 1), (1, 2)), ((0.75, 0.5), (0.5, 0.5), (0.25, 0.25)))


def reference_batches(model: Any, pad_token_id: int, processor: Any = None) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of 2 and 3 prompts of different lengths, one image each.

    With the model's processor (one that has an `image_token`), the processor makes them from
    random images of :data:`IMAGE_SCALES` and prompts that start with the image token: it knows
    how many placeholders an image of a given size takes, its tiles or patches and what else the
    model needs (`image_sizes`, ...). Without one, each prompt is the image's placeholder tokens
    (their count observed from one image through the part) then random text ids (never the image
    token), with random pixel values of the config's image size: the layout of llava-style models.
    """
    if getattr(processor, "image_token", None) is not None:
        return processor_batches(model, processor)
    generator = torch.Generator().manual_seed(3)
    image_id, image_tokens = image_token_id(model), tokens_per_image(model)
    vocab = model.config.get_text_config().vocab_size
    batches = []
    for lengths in PROMPT_LENGTHS:
        longest = image_tokens + max(lengths)
        input_ids = torch.full((len(lengths), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, length in enumerate(lengths):
            text = torch.randint(3, vocab, (length,), generator=generator)
            text = text.masked_fill(text == image_id, 3)
            prompt = torch.cat([torch.full((image_tokens,), image_id), text])
            input_ids[row, longest - len(prompt) :] = prompt
            attention_mask[row, longest - len(prompt) :] = 1
        pixel_values = torch.randn((len(lengths), *image_size(model)), generator=generator).to(model.dtype)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values})
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
