"""Tiny random encoder-decoder, speech and encoder-only models for the tests, built from configs.

Sizes are given under every name the config classes use (`d_model` and `hidden_size`,
`num_layers` and `encoder_layers`...); a config keeps the ones it does not know as plain
attributes. Per-type overrides exist only where the shared sizes cannot work; each says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from optimum_observer.demo import build_tokenizer

_SHARED_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=2,
    max_position_embeddings=512,
)

SEQ2SEQ_SIZES: dict[str, Any] = dict(
    _SHARED_SIZES,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
)

SEQ2SEQ_OVERRIDES: dict[str, dict[str, Any]] = {
    # Two experts in every other layer keep the routing real and the model tiny.
    "switch_transformers": dict(num_experts=2, expert_capacity=64, num_sparse_encoder_layers=1,
                                num_sparse_decoder_layers=1),
    # LED pads the encoder input to a multiple of its (even) local attention window.
    "led": dict(attention_window=[4, 4], max_encoder_position_embeddings=512, max_decoder_position_embeddings=512),
    # Pegasus-X attends in blocks with global tokens; small blocks keep the tiny inputs meaningful.
    "pegasus_x": dict(block_size=4, num_global_tokens=2),
}

ENCODER_SIZES: dict[str, Any] = dict(
    _SHARED_SIZES,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    # distilbert's names
    dim=64,
    n_layers=2,
    n_heads=4,
    hidden_dim=128,
    type_vocab_size=2,
)

ENCODER_OVERRIDES: dict[str, dict[str, Any]] = {
    # Funnel pools the sequence between blocks: one layer per block, two blocks.
    # (None: the shared size is not given at all; funnel refuses num_hidden_layers.)
    "funnel": dict(
        block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128, num_decoder_layers=1, num_hidden_layers=None
    ),
    # Canine embeds code points by hashing; it has no vocabulary, and downsamples by 2 here.
    "canine": dict(downsampling_rate=2, num_hash_buckets=64, max_position_embeddings=2048),
    # LUKE's entity table is separate from the word vocabulary.
    "luke": dict(entity_vocab_size=8, entity_emb_size=16),
    # A window of 4 (default 512) so that inputs of a few tokens span several chunks.
    "longformer": dict(attention_window=4),
}

#: Whisper's mel frames: 30 s chunks (hop 160 at 16 kHz) = 3000 frames = 2 * max_source_positions,
#: the length the legacy exporter's dummy inputs assume.
WHISPER_CHUNK_SECONDS = 30


def save_seq2seq_lm(model_type: str, directory: Path, with_tokenizer: bool = True, seed: int = 0) -> Path:
    config = transformers.AutoConfig.for_model(model_type, **{**SEQ2SEQ_SIZES, **SEQ2SEQ_OVERRIDES.get(model_type, {})})
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    model.save_pretrained(directory)
    if with_tokenizer:
        build_tokenizer(directory)
    return Path(directory)


def whisper_feature_extractor(**overrides: Any) -> transformers.WhisperFeatureExtractor:
    settings = dict(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=WHISPER_CHUNK_SECONDS)
    return transformers.WhisperFeatureExtractor(**{**settings, **overrides})


def save_whisper(directory: Path, seed: int = 0) -> Path:
    """A tiny random Whisper with its feature extractor (80 mel bins, 30 s chunks)."""
    frames = whisper_feature_extractor().nb_max_frames
    config = transformers.WhisperConfig(
        vocab_size=256,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=frames // 2,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(directory)
    whisper_feature_extractor().save_pretrained(directory)
    return Path(directory)


def save_encoder(model_type: str, auto_class: str, directory: Path, with_tokenizer: bool = True, seed: int = 0) -> Path:
    sizes = {**ENCODER_SIZES, **ENCODER_OVERRIDES.get(model_type, {})}
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if v is not None})
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(config)
    model.save_pretrained(directory)
    if with_tokenizer and model_type != "canine":
        # It returns token_type_ids; the default run keeps them for the types whose forward takes them.
        build_tokenizer(directory)
    return Path(directory)


def sine_waves(sampling_rate: int, seconds: tuple[float, ...]) -> list[np.ndarray]:
    return [
        np.sin(2 * np.pi * 440 * np.arange(int(s * sampling_rate)) / sampling_rate).astype(np.float32)
        for s in seconds
    ]
