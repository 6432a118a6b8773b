"""Decoder generation over any cache the graph declares, not only key/value pairs.

Upstream `ORTModelForCausalLM` recognises a cache by `.key` / `.value` in the input names,
sizes the first step's empty cache from config attributes (`num_attention_heads`...) and reads
the past length off the cache. A state-space model's cache is neither: per layer a convolution
window and an SSM state of fixed size (`past_key_values.{i}.value.conv_state`, `.value.ssm_state`:
carried in value slots, so that upstream feeds them too, see
optimum_observer.portable_cache.carry_states_as_values), zeros before the first step. For a
graph with such inputs (and for key/value graphs upstream cannot
size: different key and value head sizes, configs without `num_attention_heads` /
`hidden_size`), :func:`forward_by_name` feeds:

- every `past_key_values.*` input: zeros before the first step, shaped from the graph (batch
  from `input_ids`, other symbolic dimensions, such as a key/value past length, 0, static
  dimensions as declared); then the matching `present.*` output of the previous step, by name;
- `attention_mask` over past and new tokens, as generate keeps it (the graph reads the new
  tokens' columns);
- `position_ids`, when the graph takes them, from the mask as upstream computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from onnxruntime.transformers.io_binding_helper import TypeHelper
from transformers.modeling_outputs import CausalLMOutputWithPast

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_KEY_VALUE_SUFFIXES = (".key", ".value")


def cache_input_names(input_names: Sequence[str]) -> list[str]:
    return [name for name in input_names if name.startswith(PAST_PREFIX)]


def has_state_inputs(input_names: Sequence[str]) -> bool:
    """Whether the graph's cache has inputs other than key/value pairs (a state carried in a
    value slot, `past_key_values.0.value.conv_state`, is a state: its name does not end in
    `.value`)."""
    return any(not name.endswith(_KEY_VALUE_SUFFIXES) for name in cache_input_names(input_names))


def present_name(input_name: str) -> str:
    return PRESENT_PREFIX + input_name[len(PAST_PREFIX) :]


def first_step_shape(shape: Sequence[int | str | None], batch_size: int) -> tuple[int, ...]:
    """The empty cache's shape: batch where the graph says batch, 0 for any other symbolic
    dimension (a past length), the declared size for a static one."""
    return tuple(
        dim if isinstance(dim, int) else batch_size if index == 0 else 0 for index, dim in enumerate(shape)
    )


def forward_by_name(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Sequence[torch.Tensor] | None,
    position_ids: torch.Tensor | None,
) -> CausalLMOutputWithPast:
    """One step of `model`, an `ORTModelForCausalLM` whose cache is fed by name."""
    names = cache_input_names(model.input_names)
    batch_size, length = input_ids.shape
    if past_key_values is None:
        past = [_zeros(model.input_shapes[n], model.input_dtypes[n], batch_size) for n in names]
    else:
        past = list(_flat(past_key_values))
    if attention_mask is None:
        attention_mask = torch.ones((batch_size, length), dtype=torch.long)
    inputs: dict[str, Any] = {"input_ids": input_ids, **dict(zip(names, past))}
    if "attention_mask" in model.input_names:
        inputs["attention_mask"] = attention_mask
    if "position_ids" in model.input_names:
        if position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids = position_ids.masked_fill(attention_mask == 0, 1)[:, -length:]
        inputs["position_ids"] = position_ids
    outputs = model.session.run(None, model._prepare_onnx_inputs(True, inputs))
    returned: Mapping[str, torch.Tensor] = model._prepare_onnx_outputs(True, outputs)
    return CausalLMOutputWithPast(
        logits=returned["logits"], past_key_values=tuple(returned[present_name(n)] for n in names)
    )


def _zeros(shape: Sequence[int | str | None], ort_type: str, batch_size: int) -> torch.Tensor:
    return torch.zeros(first_step_shape(shape, batch_size), dtype=TypeHelper.ort_type_to_torch_type(ort_type))


def _flat(past: Sequence[Any]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for item in past:
        flat.extend(_flat(item) if isinstance(item, (tuple, list)) else [item])
    return flat
