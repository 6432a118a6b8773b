"""Patches of per-row adapters: each row's adapter applied by gathering its weights, not by a loop.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

X-MOD gives every language its own bottleneck adapter after each layer and picks it per batch
row from `lang_ids`. Upstream groups consecutive rows of one language
(`torch.unique_consecutive`), splits the batch by those run lengths and loops over the runs,
reading each run's language with `.item()`: sizes and a loop that depend on the data, which
torch.export cannot trace. The replacement gathers each row's adapter weights by its language id
and applies them in one batched product: the same adapter on the same row, for any mix of
languages in the batch.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Patch


def _linear_per_row(layers: list[torch.nn.Linear], rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`layers[rows[b]](x[b])` for every row b of `x` ([batch, sequence, features]) in one product."""
    weight = torch.stack([layer.weight for layer in layers])[rows]
    bias = torch.stack([layer.bias for layer in layers])[rows]
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _xmod_lang_adapter_per_row(self: Any, lang_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    # Upstream's XmodOutput.lang_adapter with its split-and-loop replaced: the adapters are those
    # of `adapter_modules` in order, as upstream indexes them by language id.
    if not self.ln_before_adapter:
        residual = hidden_states
    if self.adapter_layer_norm is not None:
        hidden_states = self.adapter_layer_norm(hidden_states)
    elif self.adapter_reuse_layer_norm:
        hidden_states = self.LayerNorm(hidden_states)
    if self.ln_before_adapter:
        residual = hidden_states
    adapters = list(self.adapter_modules.values())
    rows = lang_ids.long()
    hidden_states = _linear_per_row([a.dense1 for a in adapters], rows, hidden_states)
    hidden_states = adapters[0].adapter_act_fn(hidden_states)
    hidden_states = _linear_per_row([a.dense2 for a in adapters], rows, hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states += residual
    return hidden_states


PATCHES = (
    Patch(
        name="xmod_language_adapter_per_row",
        target="transformers.models.xmod.modeling_xmod:XmodOutput.lang_adapter",
        replacement=_xmod_lang_adapter_per_row,
        fixes="GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 0) "
        "(`torch.split(hidden_states, lang_lengths.tolist(), 0)`: the batch is split by runs of one "
        "language found by torch.unique_consecutive, and each run's adapter picked with `.item()`)",
    ),
)
