"""The embedded default: a tiny random causal LM and a small BPE tokenizer, built on the fly.

Needs no hub access, so `optimum-observer export --demo OUT` works on a fresh machine. Tests
build their tiny models with the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SENTENCES = (
    "Hello, my dog is cute",
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time there was a small model that wanted to run everywhere",
    "ONNX Runtime executes graphs exported by PyTorch",
    "A quick brown fox jumps over the lazy dog",
)
DEMO_MODEL_TYPE = "starcoder2"

#: Sizes every decoder-only tiny model shares, shaped like real checkpoints: grouped-query
#: attention (2 key/value heads of 4) and, for types that read `head_dim`, a head size (32) other
#: than hidden_size // heads (16), as Qwen3, Gemma or Mistral-Nemo checkpoints have.
DECODER_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


#: Keys of DECODER_SIZES given only to configs that have them.
_SHAPE_KEYS = ("num_key_value_heads", "head_dim")


def trained_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE model trained on :data:`SENTENCES`, `special_tokens` at ids 0, 1, ..."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens)
    tokenizer.train_from_iterator(list(SENTENCES) * 4, trainer)
    return tokenizer


def build_tokenizer(directory: Path | None = None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, saved to `directory` if given."""
    tokenizer = trained_bpe(200, ["<pad>", "<s>", "</s>", "<unk>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def save_tiny_causal_lm(
    model_type: str, directory: Path, with_tokenizer: bool = True, seed: int = 0, **config_overrides: Any
) -> Path:
    """Builds a tiny random `AutoModelForCausalLM` of `model_type` and saves it to `directory`."""
    # Shape keys a type's config does not have are not invented: a `head_dim` its modules
    # partly read and partly derive (olmoe, qwen2_moe) gives a model no checkpoint has.
    known = transformers.AutoConfig.for_model(model_type).to_dict()
    sizes = {k: v for k, v in DECODER_SIZES.items() if k not in _SHAPE_KEYS or k in known}
    config = transformers.AutoConfig.for_model(model_type, **{**sizes, **config_overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(directory)
    if with_tokenizer:
        build_tokenizer(directory)
    return Path(directory)
