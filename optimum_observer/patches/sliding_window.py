"""Scoped patches that make Longformer and LED's encoder exportable for any input length.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Longformer (and LED's encoder, a copy of it) attends within a sliding window, computed in
chunks of the window's size, and pads its input to a multiple of the window first. Four things
in transformers' code keep torch.export and torch.onnx from producing one graph that is right
for every length:

- the encoder asks the data whether any token has global attention (`.item()` on the mask),
  and branches on the answer. The exported graphs' inputs are `input_ids`, `attention_mask`
  (0/1) and, for Longformer, `token_type_ids`, never `global_attention_mask`, so no token of any
  runtime input is global: the local-attention program is the exact one;
- chunk counts are `torch.div(seq_len, w, rounding_mode="trunc")` of two integers, a tensor
  that sizes views and becomes a data-dependent symbol; integer division of the sizes is the
  same number for the non-negative sizes it sees;
- the padding (and LED's unpadding) sit behind `if padding_len > 0`, a branch torch.export
  keeps for the example's length: LED's graph made from a length that needs padding returned
  an empty sequence for a length that does not (`hidden_states[:, :-0]`). The replacement always
  pads (by zero when nothing is missing); LED unpads by slicing to the input length (Longformer
  already slices without a branch, so its values are right without the patch, but the mask,
  padded by a size computed from the ids', came out with its axis bounded to 1..5; the mask is
  now padded by what its own length lacks);
- `_chunk` calls `as_strided` on a non-contiguous view of the queries and keys. ONNX has no
  strides: onnxscript's `aten_as_strided` reads its input in logical order ("non-contiguous
  views remain unsupported"), so the exported encoder computed other chunks than torch's
  without an error. The replacement hands `_chunk` a contiguous copy.

Each replacement is exact: the exported encoders match torch for every length (tests/
test_sliding_window_patches.py, which also shows each patch's failure without it).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .registry import Patch


class _TorchWithIntegerDivision(types.ModuleType):
    """`torch` for one model's module, except that truncating division of sizes stays a size."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def div(dividend: Any, divisor: Any, *, rounding_mode: str | None = None) -> Any:
        sizes = (int, torch.SymInt)
        if rounding_mode == "trunc" and isinstance(dividend, sizes) and isinstance(divisor, sizes):
            return dividend // divisor
        return torch.div(dividend, divisor, rounding_mode=rounding_mode)


class _PaddingToInputLength:
    """The padding length LEDEncoder.forward unpads with, as a slice bound to the input length.

    The encoder does `if padding_len > 0: hidden_states = hidden_states[:, :-padding_len]` (and
    the same for hidden states and attentions it returns); with this object the test always
    holds and `-padding_len` is the input length, so the slice keeps the input's positions
    whether or not anything was padded.
    """

    def __init__(self, input_length: int | torch.SymInt) -> None:
        self.input_length = input_length

    def __gt__(self, other: int) -> bool:
        return True

    def __neg__(self) -> int | torch.SymInt:
        return self.input_length


def _local_attention_only(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs["is_global_attn"] = False
        return original(self, *args, **kwargs)

    return forward


def _window(config: Any) -> int:
    window = config.attention_window
    return window if isinstance(window, int) else max(window)


def _missing(length: int | torch.SymInt, window: int) -> int | torch.SymInt:
    """How many positions pad `length` to a multiple of `window` (0 when it is one)."""
    return (window - length % window) % window


def _pad_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    # Padded by what its own length lacks: the same number as the ids', but written with the
    # mask's own size torch.export keeps the mask's axis unbounded (computed from the ids' size,
    # LED's came out bounded to 1..5).
    return nn.functional.pad(mask, (0, _missing(mask.shape[1], window)), value=0)


def _pad_tokens(
    config: Any,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    embed: Callable[[torch.Tensor], torch.Tensor],
    pad_token_id: int,
) -> tuple[int, Any, Any, torch.Tensor | None, torch.Tensor | None]:
    """Pads the ids or embeddings to the window: (window, input length, padding, ids, embeddings)."""
    window = _window(config)
    batch_size, input_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    padding = _missing(input_length, window)
    if input_ids is not None:
        input_ids = nn.functional.pad(input_ids, (0, padding), value=pad_token_id)
    if inputs_embeds is not None:
        padding_ids = inputs_embeds.new_full((batch_size, padding), pad_token_id, dtype=torch.long)
        inputs_embeds = torch.cat([inputs_embeds, embed(padding_ids)], dim=-2)
    return window, input_length, padding, input_ids, inputs_embeds


def _led_pad_to_window_size_unconditionally(
    self: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[_PaddingToInputLength, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    window, input_length, _, input_ids, inputs_embeds = _pad_tokens(
        self.config, input_ids, inputs_embeds, self.embed_tokens, pad_token_id
    )
    return _PaddingToInputLength(input_length), input_ids, _pad_mask(attention_mask, window), inputs_embeds


def _longformer_pad_to_window_size_unconditionally(
    self: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[Any, ...]:
    window, _, padding, input_ids, inputs_embeds = _pad_tokens(
        self.config, input_ids, inputs_embeds, self.embeddings, pad_token_id
    )
    if position_ids is not None:
        # Padded with pad_token_id as upstream does (RobertaEmbeddings' padding index).
        position_ids = nn.functional.pad(position_ids, (0, padding), value=pad_token_id)
    attention_mask, token_type_ids = _pad_mask(attention_mask, window), _pad_mask(token_type_ids, window)
    return padding, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds


def _contiguous_chunks(original: Callable[..., Any]) -> staticmethod:
    @functools.wraps(original)
    def chunk(hidden_states: torch.Tensor, window_overlap: int, onnx_export: bool = False) -> torch.Tensor:
        return original(hidden_states.contiguous(), window_overlap, onnx_export)

    return staticmethod(chunk)


def _attention_patches(prefix: str, module: str, attention: str) -> tuple[Patch, ...]:
    """The three patches Longformer's self-attention and LED's copy of it share."""
    return (
        Patch(
            name=f"{prefix}_local_attention_only",
            target=f"{module}:{attention}.forward",
            wrap=_local_attention_only,
            fixes="GuardOnDataDependentSymNode (the encoder asks `is_index_global_attn.flatten().any().item()` "
            "and branches on it; the exported graph has no global_attention_mask input)",
        ),
        Patch(
            name=f"{prefix}_integer_window_division",
            target=f"{module}:torch",
            replacement=_TorchWithIntegerDivision("torch"),
            fixes="GuardOnDataDependentSymNode (chunk counts are `torch.div(seq_len, w, rounding_mode='trunc')`, "
            "a tensor that sizes views)",
        ),
        Patch(
            name=f"{prefix}_contiguous_chunks",
            target=f"{module}:{attention}._chunk",
            wrap=_contiguous_chunks,
            fixes="encoder differs from torch by ~1e-2 without an error (`_chunk` calls `as_strided` on a "
            "non-contiguous view; onnxscript's aten_as_strided reads its input in logical order)",
        ),
    )


_LED = "transformers.models.led.modeling_led"
_LONGFORMER = "transformers.models.longformer.modeling_longformer"

PATCHES = (
    *_attention_patches("led", _LED, "LEDEncoderSelfAttention"),
    Patch(
        name="led_pad_to_window_size_unconditionally",
        target=f"{_LED}:LEDEncoder._pad_to_window_size",
        replacement=_led_pad_to_window_size_unconditionally,
        fixes="wrong sequence length or values for inputs whose padding differs from the example's "
        "(padding and unpadding behind `if padding_len > 0`, kept for the example's length)",
    ),
    *_attention_patches("longformer", _LONGFORMER, "LongformerSelfAttention"),
    Patch(
        name="longformer_pad_to_window_size_unconditionally",
        target=f"{_LONGFORMER}:LongformerModel._pad_to_window_size",
        replacement=_longformer_pad_to_window_size_unconditionally,
        fixes="torch.export bounds the attention mask's axis to 1..5 (the mask is padded by a size computed "
        "from the ids' length; Longformer's values are right either way, its unpadding has no branch)",
    ),
)
