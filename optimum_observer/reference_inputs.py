"""Reference inputs: the batches a task family runs the model on, by default and in its checks.

Takes: a model (its config sizes random inputs), and the tokenizer or feature extractor when
there is one. Gives: batches of 2 and 3 inputs of different sizes per kind of main input (texts,
left padded for generation or right padded for an encoder; waveforms through a feature
extractor; images; raw waveforms), built from fixed prompts and synthetic audio, so the default
run and the runtime checks need neither a data set nor the hub.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch

DEFAULT_PROMPTS = (
    "Hello, my dog is cute",
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time",
)
#: Durations (seconds) of the synthetic waveforms of the default speech run.
DEFAULT_AUDIO_SECONDS = (0.7, 1.6, 1.1)
#: The speech batches of 2 and 3 waveforms: their longest differ, so a model fed features of the
#: audio's own length (not whisper's fixed window) is seen at two lengths.
SPEECH_BATCH_SECONDS = ((DEFAULT_AUDIO_SECONDS[0], DEFAULT_AUDIO_SECONDS[2]), DEFAULT_AUDIO_SECONDS)


def _vocab_size(model: Any) -> int:
    # Character-level models (canine) have no vocabulary size; any code point is an id.
    return getattr(model.config.get_text_config(), "vocab_size", None) or 256


def random_token_batch(
    model: Any, lengths: list[int], generator: torch.Generator, left_padding: bool
) -> dict[str, torch.Tensor]:
    """Random ids for prompts of `lengths` tokens, padded with the pad id to the longest (as a
    tokenizer pads: models that find padding in the ids, RoBERTa's positions, see it), with their mask."""
    longest = max(lengths)
    input_ids = torch.randint(3, _vocab_size(model), (len(lengths), longest), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(lengths):
        if left_padding:
            attention_mask[row, : longest - length] = 0
        else:
            attention_mask[row, length:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id(model, None))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def text_batches(model: Any, tokenizer: Any | None) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 and 3 texts of different lengths, right padded, as an encoder is fed:
    tokenized when a tokenizer is given (keeping only what `forward` takes), else random ids."""
    batches = [[DEFAULT_PROMPTS[0], DEFAULT_PROMPTS[2]], list(DEFAULT_PROMPTS)]
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        return [random_token_batch(model, [5 + 3 * i for i in range(len(b))], generator, False) for b in batches]
    accepted = set(inspect.signature(model.forward).parameters)
    encoded = [tokenizer(b, return_tensors="pt", padding=True) for b in batches]
    return [{k: v for k, v in e.items() if k in accepted} for e in encoded]


def synthetic_waveforms(sampling_rate: int, seconds: tuple[float, ...]) -> list[Any]:
    """Sine sweeps of the given durations: real-looking audio without a data set."""
    import numpy as np

    waves = []
    for index, duration in enumerate(seconds):
        t = np.arange(int(duration * sampling_rate)) / sampling_rate
        waves.append((0.5 * np.sin(2 * math.pi * (220 + 110 * index) * t * (1 + t))).astype(np.float32))
    return waves


def speech_batches(model: Any, feature_extractor: Any | None) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 and 3 waveforms of different durations, as the model's users feed them.

    Through the feature extractor when there is one (keeping what `forward` takes: whisper's
    `input_features`, speech_to_text's features and attention mask, moonshine's `input_values`);
    without one, by the model's main input: raw waveforms for `input_values`, random features of
    whisper's layout for `input_features` when the config states its sizes."""
    batches = SPEECH_BATCH_SECONDS
    if feature_extractor is not None:
        rate = feature_extractor.sampling_rate
        accepted = set(inspect.signature(model.forward).parameters)
        # An extractor that pads on its own (whisper's, to its fixed window) keeps its padding;
        # one that does not pads a batch to its longest waveform, as a batched call must.
        padding = inspect.signature(feature_extractor.__call__).parameters.get("padding")
        pads = padding is not None and padding.default not in (False, None)
        settings = {} if pads else {"padding": True}
        encoded = [
            feature_extractor(synthetic_waveforms(rate, b), sampling_rate=rate, return_tensors="pt", **settings)
            for b in batches
        ]
        return [{k: v for k, v in e.items() if k in accepted} for e in encoded]
    main_input = getattr(model, "main_input_name", "input_features")
    if main_input == "input_values":
        return waveform_batches(model, batches)
    config = model.config
    if not all(hasattr(config, key) for key in _WHISPER_FEATURE_SIZES):
        raise ValueError(
            f"no feature extractor was given, and {type(config).__name__} does not state the sizes of random "
            f"input features of whisper's layout ({', '.join(_WHISPER_FEATURE_SIZES)})"
        )
    frames = 2 * config.max_source_positions
    generator = torch.Generator().manual_seed(0)
    return [{main_input: torch.randn(len(b), config.num_mel_bins, frames, generator=generator)} for b in batches]


#: The config sizes of random whisper-layout features (batch, mel bins, 2 x encoder positions).
_WHISPER_FEATURE_SIZES = ("num_mel_bins", "max_source_positions")


def image_batches(model: Any) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 and 3 random images of the size and channels the (vision) config states."""
    config = getattr(model.config, "vision_config", None) or model.config
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    channels = getattr(config, "num_channels", 3)
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.rand(b, channels, height, width, generator=generator)} for b in (2, 3)]


def waveform_batches(
    model: Any, batches: tuple[tuple[float, ...], ...] | None = None, sampling_rate: int = 16000
) -> list[dict[str, torch.Tensor]]:
    """Batches of waveforms of different durations (default: 2 and 3, the batches differ in
    padded length), normalised and zero padded as a wav2vec2-style feature extractor without
    attention mask does."""
    if batches is None:
        batches = SPEECH_BATCH_SECONDS
    result = []
    for seconds in batches:
        waves = [torch.from_numpy(w) for w in synthetic_waveforms(sampling_rate, seconds)]
        waves = [(w - w.mean()) / (w.std() + 1e-7) for w in waves]
        result.append({"input_values": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)})
    return result


def encoder_batches(model: Any, tokenizer: Any | None) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 and 3 of the model's main input (`model.main_input_name`): texts, images or
    waveforms."""
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        return image_batches(model)
    if main_input == "input_values":
        return waveform_batches(model)
    return text_batches(model, tokenizer)



def left_padding_copy(tokenizer: Any | None) -> Any | None:
    """A copy padding on the left (as batched generation needs); the caller's is left as it is."""
    if tokenizer is None:
        return None
    padding_tokenizer = copy.deepcopy(tokenizer)
    padding_tokenizer.padding_side = "left"
    if padding_tokenizer.pad_token is None:
        padding_tokenizer.pad_token = padding_tokenizer.eos_token or padding_tokenizer.unk_token
    return padding_tokenizer


def pad_token_id(model: Any, tokenizer: Any | None) -> int:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        # Encoders have no generation config (None): their config names the pad id (RoBERTa's 1).
        getattr(getattr(model, "config", None), "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0



def generation_inputs(model: Any, tokenizer: Any | None) -> list[dict[str, torch.Tensor]]:
    """Two batches: two prompts of different lengths left padded, and one prompt alone."""
    padding_tokenizer = left_padding_copy(tokenizer)
    if padding_tokenizer is not None:
        batches = [list(DEFAULT_PROMPTS[1::-1]), [DEFAULT_PROMPTS[2]]]
        encoded = [padding_tokenizer(b, return_tensors="pt", padding=True) for b in batches]
        return [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    generator = torch.Generator().manual_seed(1)
    return [
        random_token_batch(model, [9, 5], generator, left_padding=True),
        random_token_batch(model, [5], generator, left_padding=True),
    ]

