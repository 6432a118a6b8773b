"""Patches of attention masks built with Python branches or lists that torch.export freezes.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .registry import Patch


def _not_compiling() -> bool:
    return False


#: The 2-d attention mask GitModel.forward was called with, for the mask function below.
_GIT_ATTENTION_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "git_attention_mask", default=None
)


def _git_forward_handing_mask_to_mask_function(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Upstream adds the padding mask in forward behind `if past_key_values_length > 0`; the
        # mask function below adds it instead, so forward gets none.
        bound = signature.bind(self, *args, **kwargs)
        token = _GIT_ATTENTION_MASK.set(bound.arguments.get("attention_mask"))
        bound.arguments["attention_mask"] = None
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            _GIT_ATTENTION_MASK.reset(token)

    return forward


def _git_attention_mask(
    self: torch.nn.Module,
    tgt: torch.Tensor,
    memory: torch.Tensor,
    tgt_mask: torch.Tensor,
    past_key_values_length: int,
    memory_key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GitModel's additive mask, padding included, with no Python branch on the cache length.

    Upstream, without a cache the text block is causal and the padding mask is added; with one
    it is all zeros (one new token sees every key) and padding is ignored. torch.export keeps the
    branch of its example (with a cache), so the exported first step was neither causal nor
    padded. Here a text query at position `past + i` sees the keys up to it (the same two masks
    for the calls generate makes), and padding is weighted by a tensor that is 1 without a cache.
    """
    num_memory, num_tgt = memory.shape[1], tgt.shape[1]
    dtype, device = tgt.dtype, tgt.device
    text_queries = torch.arange(num_tgt, device=device)[:, None] + past_key_values_length
    text_keys = torch.arange(past_key_values_length + num_tgt, device=device)[None, :]
    text = torch.zeros(text_keys.shape[1], device=device, dtype=dtype).masked_fill(
        text_keys > text_queries, float("-inf")
    )
    memory_rows = torch.cat(
        (
            torch.zeros((num_memory, num_memory), device=device, dtype=dtype),
            torch.full((num_memory, text_keys.shape[1]), float("-inf"), device=device, dtype=dtype),
        ),
        dim=1,
    )
    text_rows = torch.cat((torch.zeros((num_tgt, num_memory), device=device, dtype=dtype), text), dim=1)
    mask = torch.cat((memory_rows, text_rows), dim=0)[None, None]
    batch = memory.shape[0]
    memory_padding = torch.zeros((batch, num_memory), device=device, dtype=dtype)
    if memory_key_padding_mask is not None:
        memory_padding = memory_padding.masked_fill(memory_key_padding_mask, float("-inf"))
    text_padding = torch.zeros((batch, text_keys.shape[1]), device=device, dtype=dtype)
    attention_mask = _GIT_ATTENTION_MASK.get()
    if attention_mask is not None:
        # A tensor, not a Python bool: a value torch.export cannot fold into its example's branch.
        without_cache = (attention_mask.new_ones(past_key_values_length).sum() == 0).to(dtype)
        text_padding = (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min * without_cache
    return mask + torch.cat((memory_padding, text_padding), dim=1)[:, None, None, :]


def _cpmant_attention_mask(
    self: torch.nn.Module, input_ids: torch.Tensor, span: torch.Tensor, context: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """CpmAntModel._prepare_attention_mask with the left-padding mask from `arange`, not from a
    Python list of `seqlen` numbers (which makes the sequence length a constant)."""
    batch, seqlen, device = input_ids.size(0), input_ids.size(1), input_ids.device
    directional_mask_2d = torch.arange(seqlen, device=device) <= torch.arange(seqlen, device=device).view(-1, 1)
    attention_mask = context[:, None, :] | (
        context[:, :, None].logical_not() & directional_mask_2d.view(1, seqlen, seqlen)
    )
    attention_mask = attention_mask & (span[:, None, :] == span[:, :, None])
    distance_to_end = torch.arange(seqlen - self.prompt_length, device=device).flip(0)
    mask_1d = distance_to_end[None, :].repeat(batch, 1) < length[:, None]
    mask_1d = torch.cat((torch.ones(batch, self.prompt_length, device=device).bool(), mask_1d), dim=1)
    return mask_1d.view(batch, seqlen, 1) & mask_1d.view(batch, 1, seqlen) & attention_mask


_GIT_FIRST_STEP = (
    "first generate step (empty cache) of the exported GIT decoder neither causal nor padded: "
    "observed call 0 off by about 0.02 (GitModel branches on `past_key_values_length > 0` in "
    "Python, and torch.export keeps the branch of its example, which has a cache)"
)

def _doge_dynamic_mask_causal(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def prepare_dynamic_mask(
        self: Any,
        hidden_states: torch.Tensor,
        dt_states: torch.Tensor,
        keep_window_size: int = 2048,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`DogeAttention.prepare_dynamic_mask`, given the causal mask sdpa's skipped one stands for."""
        if attention_mask is None:
            queries, keys = hidden_states.shape[1], dt_states.shape[-1]
            positions = torch.arange(keys - queries, keys, device=dt_states.device)
            future = torch.arange(keys, device=dt_states.device)[None, :] > positions[:, None]
            blocked = torch.finfo(hidden_states.dtype).min
            attention_mask = hidden_states.new_zeros((queries, keys)).masked_fill(future, blocked)[None, None]
        return original(self, hidden_states, dt_states, keep_window_size, attention_mask)

    return prepare_dynamic_mask


PATCHES = (
    Patch(
        name="pegasus_x_decoder_mask_while_exporting",
        target="transformers.models.pegasus_x.modeling_pegasus_x:is_torchdynamo_compiling",
        replacement=_not_compiling,
        fixes="The size of tensor a (s + 1) must match the size of tensor b (s + 2) (while compiling, "
        "the Pegasus-X decoder builds no all-ones mask, and its causal mask built without one is one "
        "position longer than the keys)",
    ),
    Patch(
        name="bigbird_pegasus_decoder_mask_while_exporting",
        target="transformers.models.bigbird_pegasus.modeling_bigbird_pegasus:is_torchdynamo_compiling",
        replacement=_not_compiling,
        fixes="The size of tensor a (s) must match the size of tensor b (s + 1) (the same decoder "
        "code as Pegasus-X's: while compiling it builds no all-ones mask, and the causal mask built "
        "without one is one position longer than the keys)",
    ),
    Patch(
        name="git_attention_mask_without_cache_branch",
        target="transformers.models.git.modeling_git:GitModel.create_attention_mask",
        replacement=_git_attention_mask,
        fixes=_GIT_FIRST_STEP,
    ),
    Patch(
        name="git_padding_in_attention_mask",
        target="transformers.models.git.modeling_git:GitModel.forward",
        wrap=_git_forward_handing_mask_to_mask_function,
        fixes=_GIT_FIRST_STEP,
    ),
    Patch(
        name="cpmant_attention_mask_from_arange",
        target="transformers.models.cpmant.modeling_cpmant:CpmAntModel._prepare_attention_mask",
        replacement=_cpmant_attention_mask,
        fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape for "
        "inputs['input_ids'].shape[1] (`torch.tensor(list(range(seqlen - prompt_length))[::-1])`)",
    ),
    Patch(
        name="doge_causal_dynamic_mask",
        target="transformers.models.doge.modeling_doge:DogeAttention.prepare_dynamic_mask",
        wrap=_doge_dynamic_mask_causal,
        fixes="torch itself generates other tokens without its cache (doge with sdpa: for a prompt without "
        "padding the causal mask is skipped (None, for sdpa's is_causal), and the dynamic mask built without "
        "it passes sdpa an explicit mask that lets every token attend to later ones)",
        model_runs=True,
    ),
)
