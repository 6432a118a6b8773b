"""Tiny random models and a small tokenizer, built locally (no hub access)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SENTENCES = [
    "Hello, my dog is cute",
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time there was a small model that wanted to run everywhere",
    "ONNX Runtime executes graphs exported by PyTorch",
    "A quick brown fox jumps over the lazy dog",
]

#: Sizes every decoder-only tiny model shares; per-type entries below only add what differs.
DECODER_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

DECODER_OVERRIDES: dict[str, dict[str, Any]] = {
    # gemma reads head_dim from the config: one model with head_dim != hidden_size // heads.
    "gemma": dict(head_dim=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def build_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


def decoder_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(
        model_type, **{**DECODER_SIZES, **DECODER_OVERRIDES.get(model_type, {}), **overrides}
    )


def save_causal_lm(model_type: str, directory: Path, with_tokenizer: bool = True, **overrides: Any) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(decoder_config(model_type, **overrides))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    if with_tokenizer:
        build_tokenizer(directory)
    return directory
