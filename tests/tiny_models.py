"""Tiny random models for the tests: the demo's builders plus per-type config overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimum_observer.demo import build_tokenizer, save_tiny_causal_lm

__all__ = ["DECODER_OVERRIDES", "build_tokenizer", "save_causal_lm"]

#: Per-type sizes beside the real-shaped DECODER_SIZES every tiny decoder has (grouped-query
#: attention, explicit head_dim): expert counts of the MoE types.
DECODER_OVERRIDES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def save_causal_lm(model_type: str, directory: Path, with_tokenizer: bool = True, **overrides: Any) -> Path:
    return save_tiny_causal_lm(
        model_type, directory, with_tokenizer, **{**DECODER_OVERRIDES.get(model_type, {}), **overrides}
    )
