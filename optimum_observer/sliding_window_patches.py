"""Scoped patches that make LED's Longformer-style encoder exportable for any input length.

Takes: nothing. Gives: :func:`sliding_window_patches`, :class:`~optimum_observer.patches.Patch`
records that :data:`optimum_observer.patches.PATCHES` applies during export.

LED's encoder attends within a sliding window, computed in chunks of the window's size, and
pads its input to a multiple of the window first. Four things in transformers' code keep
torch.export and torch.onnx from producing one graph that is right for every length:

- the encoder asks the data whether any token has global attention (`.item()` on the mask),
  and branches on the answer. The exported encoder's inputs are `input_ids` and
  `attention_mask` (0/1), never `global_attention_mask`, so no token of any runtime input is
  global: the local-attention program is the exact one;
- chunk counts are `torch.div(seq_len, w, rounding_mode="trunc")` of two integers, a tensor
  that sizes views and becomes a data-dependent symbol; integer division of the sizes is the
  same number for the non-negative sizes it sees;
- the padding and the unpadding sit behind `if padding_len > 0`, a branch torch.export keeps
  for the example's length: a graph made from a length that needs padding returns an empty
  sequence for a length that does not (`hidden_states[:, :-0]`). The replacement always pads
  (by zero when nothing is missing) and unpads by slicing to the input length;
- `_chunk` calls `as_strided` on a non-contiguous view of the queries and keys. ONNX has no
  strides: onnxscript's `aten_as_strided` reads its input in logical order ("non-contiguous
  views remain unsupported"), so the exported encoder computed other chunks than torch's
  without an error. The replacement hands `_chunk` a contiguous copy.

Each replacement is exact: the exported encoder matches torch for every length (tests/
test_sliding_window_patches.py, which also shows each patch's failure without it).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .patches import Patch


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


def _pad_to_window_size_unconditionally(
    self: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[_PaddingToInputLength, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    window = self.config.attention_window
    window = window if isinstance(window, int) else max(window)
    batch_size, input_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]

    def missing(length: int | torch.SymInt) -> int | torch.SymInt:
        return (window - length % window) % window

    if input_ids is not None:
        input_ids = nn.functional.pad(input_ids, (0, missing(input_length)), value=pad_token_id)
    if inputs_embeds is not None:
        padding_ids = inputs_embeds.new_full((batch_size, missing(input_length)), pad_token_id, dtype=torch.long)
        inputs_embeds = torch.cat([inputs_embeds, self.embed_tokens(padding_ids)], dim=-2)
    # Padded by what its own length lacks: the same number, but written with the mask's own
    # size torch.export keeps the mask's axis unbounded (computed from the ids' size, it came
    # out bounded to 1..5).
    attention_mask = nn.functional.pad(attention_mask, (0, missing(attention_mask.shape[1])), value=False)
    return _PaddingToInputLength(input_length), input_ids, attention_mask, inputs_embeds


def _contiguous_chunks(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def chunk(hidden_states: torch.Tensor, window_overlap: int, onnx_export: bool = False) -> torch.Tensor:
        return original(hidden_states.contiguous(), window_overlap, onnx_export)

    return chunk


def sliding_window_patches() -> tuple[Patch, ...]:
    from transformers.models.led import modeling_led as led

    attention = led.LEDEncoderSelfAttention
    return (
        Patch(
            name="led_local_attention_only",
            owner=attention,
            attribute="forward",
            replacement=_local_attention_only(attention.forward),
            fixes="GuardOnDataDependentSymNode (LEDEncoder asks `is_index_global_attn.flatten().any().item()` "
            "and branches on it; the exported encoder has no global_attention_mask input)",
        ),
        Patch(
            name="led_integer_window_division",
            owner=led,
            attribute="torch",
            replacement=_TorchWithIntegerDivision("torch"),
            fixes="GuardOnDataDependentSymNode (chunk counts are `torch.div(seq_len, w, rounding_mode='trunc')`, "
            "a tensor that sizes views)",
        ),
        Patch(
            name="led_pad_to_window_size_unconditionally",
            owner=led.LEDEncoder,
            attribute="_pad_to_window_size",
            replacement=_pad_to_window_size_unconditionally,
            fixes="wrong sequence length for inputs whose padding differs from the example's (padding and "
            "unpadding behind `if padding_len > 0`, kept for the example's length)",
        ),
        Patch(
            name="led_contiguous_chunks",
            owner=attention,
            attribute="_chunk",
            replacement=staticmethod(_contiguous_chunks(attention._chunk)),
            fixes="encoder differs from torch by ~1e-2 without an error (`_chunk` calls `as_strided` on a "
            "non-contiguous view; onnxscript's aten_as_strided reads its input in logical order)",
        ),
    )
