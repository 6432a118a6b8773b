"""`ORTModelForImageTextToText`: greedy generation from an image-text-to-text export.

Takes: a directory written by `optimum_observer.export(..., task="image-text-to-text")`:
``vision_encoder.onnx`` (pixel_values and the other inputs the model's vision part takes, such as
image_sizes -> image_features), ``embed_tokens.onnx`` (input_ids ->
inputs_embeds), ``decoder_model_merged.onnx`` (inputs_embeds, attention_mask, position_ids,
token_type_ids where the model builds its decoder mask from them, past_key_values.{i}.key|value -> logits,
present.{i}.key|value) and ``config.json`` (see
:mod:`optimum_observer.vision_language` for the convention).
Gives: Optimum's calling style, `from_pretrained(directory)` and
`generate(**processor(images=..., text=..., padding=True, return_tensors="pt"), max_new_tokens=...)`,
returning the prompt and the new tokens as `model.generate` does.

What it runs: the vision encoder once (its inputs other than pixel_values taken by name from what
`generate` is given, as the processor names them), the image features merged into the token
embeddings at the image placeholder tokens in order (the models' `masked_scatter`; an image's
token count is whatever its features are), then the decoder on
the prompt with zero-length past tensors and on one token at a time with the cache fed back by
name, its positions counted from the attention mask as transformers' generate counts them
(left padding). Greedy decoding only. optimum-onnx 0.1.0 has no class for the task, so this one
is not a subclass of an upstream class; it stands alone on ONNX Runtime. It loads and generates;
:class:`legacy_shim.modeling.ORTModelForImageTextToText` (the one users import) adds
`from_pretrained(..., export=True)` through the router, like the other `ORTModelFor*` classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import transformers

TASK = "image-text-to-text"
VISION_ENCODER_FILE = "vision_encoder.onnx"
TEXT_EMBEDDING_FILE = "embed_tokens.onnx"
TEXT_DECODER_FILE = "decoder_model_merged.onnx"
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _positions(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' generate positions: the mask counted from 0, 1 on padding, last `new_tokens`."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -new_tokens:].astype(np.int64)


def _rope_index(input_ids: np.ndarray, attention_mask: np.ndarray, grids: np.ndarray | None, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Multimodal rotary positions [3, batch, sequence] of a prompt and each row's delta (what a
    later step adds to its past length): text counts on one position per token in all three
    rows, each run of image tokens takes (frame, row, column) of the next image's merged grid from
    where the text stopped, and the text after it goes on from the image's largest position + 1;
    padding gets 1.

    A numpy adaptation of transformers' `get_rope_index` for images (4.57:
    models/qwen2_vl/modeling_qwen2_vl.py `Qwen2VLModel.get_rope_index`, which finds an image by its
    vision start token, and models/glm4v/modeling_glm4v.py `Glm4vModel.get_rope_index`, which groups
    runs of image tokens: the same positions for prompts the processors build). Those loop over
    images with values read from tensors, which torch.export cannot capture
    (GuardOnDataDependentSymNode), so the runtime computes them, outside the graph as in generate."""
    merge = config.vision_config.spatial_merge_size
    image = int(config.image_token_id)
    batch, length = input_ids.shape
    positions = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    next_image = 0
    for row in range(batch):
        visible = attention_mask[row] == 1
        is_image = input_ids[row][visible] == image
        # Runs of image tokens: [start, end) where the token kind changes.
        edges = np.flatnonzero(np.diff(np.concatenate([[False], is_image, [False]]).astype(np.int8)))
        pieces, position, cursor = [], 0, 0
        for start, end in zip(edges[::2], edges[1::2]):
            pieces.append(np.broadcast_to(np.arange(start - cursor) + position, (3, start - cursor)))
            frames, height, width = (int(v) for v in grids[next_image])
            next_image += 1
            grid = np.indices((frames, height // merge, width // merge)).reshape(3, -1) + position + start - cursor
            pieces.append(grid)
            position, cursor = int(grid.max()) + 1, end
        pieces.append(np.broadcast_to(np.arange(len(is_image) - cursor) + position, (3, len(is_image) - cursor)))
        placed = np.concatenate(pieces, axis=1)
        positions[:, row, visible] = placed
        deltas[row] = placed.max() + 1 - length
    return positions, deltas


#: The keyword arguments of :meth:`ORTModelForImageTextToText.from_pretrained` that load (the
#: others configure the export or the config).
LOADING_ARGUMENTS = ("provider", "session_options", "config")


class ORTModelForImageTextToText:
    """Image-text-to-text generation with ONNX Runtime (see the module docstring)."""

    def __init__(self, directory: Path, config: Any, sessions: dict[str, ort.InferenceSession], generation_config: Any):
        self.model_save_dir = directory
        self.config = config
        self.generation_config = generation_config
        self.vision_encoder = sessions[VISION_ENCODER_FILE]
        self.embed_tokens = sessions[TEXT_EMBEDDING_FILE]
        self.decoder = sessions[TEXT_DECODER_FILE]
        self.past_names = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_key_values.")]
        #: the decoder builds the model's own mask from token types (gemma3's image blocks).
        self.takes_token_type_ids = any(i.name == "token_type_ids" for i in self.decoder.get_inputs())
        self._past_type = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.decoder.get_inputs()}
        #: position_ids of rank 3 are multimodal rotary positions ([3, batch, sequence], or
        #: [4, ...] with the text positions first, as qwen2_vl's generate passes them).
        positions = next(i for i in self.decoder.get_inputs() if i.name == "position_ids").shape
        self.position_rows = positions[0] if len(positions) == 3 else None
    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        provider: str = "CPUExecutionProvider",
        session_options: ort.SessionOptions | None = None,
        config: Any = None,
        **kwargs: Any,
    ) -> ORTModelForImageTextToText:
        """Loads an export from the directory `model_id` (keyword arguments beyond these go to
        `AutoConfig.from_pretrained`). Exporting first (`export=True`) is
        :class:`legacy_shim.modeling.ORTModelForImageTextToText`'s."""
        directory = Path(model_id)
        missing = [f for f in (VISION_ENCODER_FILE, TEXT_EMBEDDING_FILE, TEXT_DECODER_FILE) if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} has no {', '.join(missing)}: export the model for image-text-to-text first "
                "(optimum_observer.export(model, directory, task='image-text-to-text'))."
            )
        config = config or transformers.AutoConfig.from_pretrained(directory, **kwargs)
        try:
            generation_config = transformers.GenerationConfig.from_pretrained(directory)
        except OSError:
            generation_config = transformers.GenerationConfig.from_model_config(config)
        sessions = {
            name: ort.InferenceSession(str(directory / name), sess_options=session_options, providers=[provider])
            for name in (VISION_ENCODER_FILE, TEXT_EMBEDDING_FILE, TEXT_DECODER_FILE)
        }
        return cls(directory, config, sessions, generation_config)

    def _check_images(self, pixel_values: np.ndarray) -> None:
        """Refuses images whose rank or fixed sizes (channels, height, width) differ from what the
        vision encoder graph declares."""
        declared = next(i.shape for i in self.vision_encoder.get_inputs() if i.name == "pixel_values")
        fixed_sizes_differ = any(isinstance(e, int) and e != g for e, g in zip(declared, pixel_values.shape))
        if pixel_values.ndim != len(declared) or fixed_sizes_differ:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: the vision encoder takes pixel_values of "
                f"[{', '.join(map(str, declared))}] ({len(declared)} axes); make them with the model's image "
                "processor (processor(images=..., text=..., return_tensors='pt')), which resizes them, gives them "
                "the channels the model expects and lays them out as the model takes them."
            )

    def vision_inputs(self, pixel_values: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The vision encoder's feeds: `pixel_values` and the other inputs the graph takes (a pixel
        attention mask...), read from `inputs` (what the processor returned), each cast to the
        graph's type."""
        feeds = {}
        for graph_input in self.vision_encoder.get_inputs():
            value = pixel_values if graph_input.name == "pixel_values" else inputs.get(graph_input.name)
            if value is None:
                raise ValueError(
                    f"the vision encoder takes {graph_input.name!r} beside pixel_values and none was given: pass "
                    "everything the model's processor returns (model.generate(**processor(images=..., text=..., "
                    "return_tensors='pt')))."
                )
            feeds[graph_input.name] = _array(value).astype(_NUMPY_TYPES.get(graph_input.type, np.float32))
        self._check_images(feeds["pixel_values"])
        return feeds

    def merged_embeddings(self, input_ids: np.ndarray, vision_feeds: dict[str, np.ndarray] | None) -> np.ndarray:
        """The prompt's embeddings, the image features in place of the image placeholder tokens,
        in order (`vision_feeds`: from :meth:`vision_inputs`, None for a prompt without images)."""
        embeds = self.embed_tokens.run(None, {"input_ids": input_ids})[0]
        placeholders = input_ids == int(self.config.image_token_id)
        if vision_feeds is None:
            if placeholders.any():
                raise ValueError("input_ids hold image tokens but no pixel_values were given.")
            return embeds
        features = self.vision_encoder.run(None, vision_feeds)[0]
        features = features.reshape(-1, embeds.shape[-1])
        if int(placeholders.sum()) != features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {int(placeholders.sum())}, "
                f"features {features.shape[0]}; build the prompt with the model's processor, which puts "
                "one image token per image feature."
            )
        embeds[placeholders] = features.astype(embeds.dtype)
        return embeds

    def _prompt_positions(self, ids: np.ndarray, mask: np.ndarray, images: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The prompt's position_ids in the graph's layout, and the rotary deltas of later steps."""
        if self.position_rows is None:
            return _positions(mask, ids.shape[1]), None
        grids = None if images is None else images.get("image_grid_thw")
        rotary, deltas = _rope_index(ids, mask, grids, self.config)
        return self._with_text_row(rotary, mask), deltas

    def _step_positions(self, mask: np.ndarray, deltas: np.ndarray | None) -> np.ndarray:
        """position_ids of one new token (after the prompt): its rotary positions are the past
        length + the row's delta, as transformers' generate adds `rope_deltas`."""
        if deltas is None:
            return _positions(mask, 1)
        rotary = np.broadcast_to(mask.shape[1] - 1 + deltas, (3, mask.shape[0], 1)).astype(np.int64)
        return self._with_text_row(rotary, mask)

    def _with_text_row(self, rotary: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.position_rows != 4:
            return rotary
        return np.concatenate([_positions(mask, rotary.shape[-1])[None], rotary])

    def _empty_past(self, batch_size: int) -> dict[str, np.ndarray]:
        text = self.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return {name: np.zeros((batch_size, heads, 0, head_dim), self._past_type[name]) for name in self.past_names}

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        token_type_ids: Any = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Greedy generation; returns the prompt followed by the new tokens (finished rows padded).

        `token_type_ids` (the processor's, 1 at image tokens) go to a decoder that takes them for
        the prompt, zeros for the new tokens; without them the prompt counts as text, as in
        transformers' generate."""
        if do_sample or (kwargs.get("num_beams") or 1) > 1:
            raise NotImplementedError("ORTModelForImageTextToText generates greedily only (do_sample=False, num_beams=1).")
        settings = self.generation_config
        max_new_tokens = max_new_tokens or settings.max_new_tokens or 20
        min_new_tokens = min_new_tokens or settings.min_new_tokens or 0
        eos = settings.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else settings.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)

        ids = _array(input_ids).astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else _array(attention_mask).astype(np.int64)
        vision_feeds = None if pixel_values is None else self.vision_inputs(pixel_values, kwargs)
        embeds = self.merged_embeddings(ids, vision_feeds)
        positions, deltas = self._prompt_positions(ids, mask, vision_feeds)
        past = self._empty_past(ids.shape[0])
        types = np.zeros_like(ids) if token_type_ids is None else _array(token_type_ids).astype(np.int64)
        finished = np.zeros(ids.shape[0], dtype=bool)
        tokens = ids
        for step in range(max_new_tokens):
            feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
            if self.takes_token_type_ids:
                feeds["token_type_ids"] = types
            outputs = self.decoder.run(None, {**feeds, **past})
            names = [o.name for o in self.decoder.get_outputs()]
            logits = outputs[names.index("logits")][:, -1, :].astype(np.float32)
            if step < min_new_tokens and eos:
                # As transformers' MinNewTokensLengthLogitsProcessor: ids past the vocabulary are
                # ignored (a config's eos id may be one the head does not have).
                logits[:, [e for e in eos if 0 <= e < logits.shape[-1]]] = -np.inf
            next_tokens = np.where(finished, pad, logits.argmax(-1)).astype(np.int64)
            finished |= np.isin(next_tokens, eos)
            tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
            if finished.all():
                break
            past = {
                name.replace("present.", "past_key_values.", 1): value
                for name, value in zip(names, outputs)
                if name.startswith("present.")
            }
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
            embeds = self.embed_tokens.run(None, {"input_ids": next_tokens[:, None]})[0]
            types = np.zeros_like(next_tokens[:, None])
            positions = self._step_positions(mask, deltas)
        return torch.from_numpy(tokens)
