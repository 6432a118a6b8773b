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
* ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask`` (2-D), ``position_ids``,
  ``token_type_ids`` (where the decoder part builds the model's mask and the run passed them, see
  :class:`TextDecoder`),
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
    """`pixel_values` -> `image_features` [num_images, image_tokens, hidden]: the model's own
    `get_image_features` with its config's feature layer and selection strategy."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = _inner(model)
        #: the model's own `get_image_features` returned one tensor per image (llava), not one
        #: tensor (gemma3): what :func:`routed` hands back to the model's code.
        self.returns_list = False

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> VisionEncoderOutput:
        features = type(self.inner).get_image_features(self.inner, pixel_values=pixel_values)
        self.returns_list = not isinstance(features, torch.Tensor)
        if self.returns_list:
            # Every image has the same token count here.
            features = torch.stack(tuple(features))
        return VisionEncoderOutput(image_features=features)


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
        self.decoder = model.get_decoder()
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
    embedding, decoder, head = model.get_input_embeddings(), model.get_decoder(), model.get_output_embeddings()
    had_features = "get_image_features" in vars(inner)
    vision = parts[VISION_ENCODER]
    text_decoder = parts[TEXT_DECODER]

    def get_image_features(pixel_values: torch.Tensor, **settings: Any) -> torch.Tensor | list[torch.Tensor]:
        # The settings are the config's (what generate passes); the part reads the same config.
        features = vision(pixel_values=pixel_values).image_features
        return list(features) if vision.returns_list else features

    recording = None
    try:
        model.set_input_embeddings(_Returning(parts[TEXT_EMBEDDING], "inputs_embeds"))
        if text_decoder.mask_hook is None:
            model.set_decoder(text_decoder)
        else:
            stand_in = _DecoderGivenModelInputs(text_decoder, inner)
            recording = inner.register_forward_pre_hook(stand_in.record, with_kwargs=True)
            model.set_decoder(stand_in)
        model.set_output_embeddings(torch.nn.Identity())
        inner.get_image_features = get_image_features
        yield
    finally:
        if recording is not None:
            recording.remove()
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
        return VisionEncoder(model)(pixel_values=one).image_features.shape[1]


#: text tokens after the image, per batch: two prompt lengths, then three.
PROMPT_LENGTHS = ((3, 6), (4, 2, 7))


def reference_batches(model: Any, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches of 2 and 3 prompts of different lengths, one image each: each prompt
    is the image's placeholder tokens then random text ids (never the image token), with random
    pixel values of the config's image size; and, for a model whose forward takes them,
    `token_type_ids` 1 at the image tokens (what processors return as multimodal token types,
    `return_mm_token_type_ids`; gemma3 attends bidirectionally within an image by them)."""
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if "token_type_ids" in inspect.signature(model.forward).parameters:
            batch["token_type_ids"] = (input_ids == image_id).long()
        batches.append(batch)
    return batches
