"""Patches of model constants that forward recomputes or rewrites on every call.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Gemma 3n's text layers do two such things, each breaking a different export step: AltUp's
`correct` clamps its weight in place through `.data` (a parameter update inside forward, which
torch.export records as a fake lifted constant), and the sparse MLP computes its activation cutoff
as the normal distribution's inverse CDF of a number (an `erfinv` of a constant in the graph,
which ONNX has no operator for). The replacements compute the same values without either: the
clamp on the weight as it is read, and the cutoff in Python.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from .registry import Patch


def _gemma3n_altup_correct(self: Any, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
    # Upstream's Gemma3nTextAltUp.correct with `self.correction_coefs.weight.data.clamp_(...)`
    # replaced by the clamped weight as it is read: the same coefficients, the parameter left
    # unchanged (a checkpoint's, and a model that has run once, are within the clip already).
    modalities = self.compute_router_modalities(activated)
    innovation = activated - predictions[self.config.altup_active_idx]
    innovation = innovation.repeat(self.config.altup_num_inputs, 1, 1, 1)
    weight = self.correction_coefs.weight
    if self.config.altup_coef_clip is not None:
        weight = weight.clamp(-self.config.altup_coef_clip, self.config.altup_coef_clip)
    all_coefs = nn.functional.linear(modalities, weight) + 1.0
    all_coefs = all_coefs.permute(2, 0, 1).unsqueeze(-1)
    corrected = torch.mul(innovation, all_coefs)
    corrected += predictions
    return corrected.contiguous().type_as(activated)


def _gemma3n_gaussian_topk(self: Any, inputs: torch.Tensor) -> torch.Tensor:
    # Upstream's Gemma3nTextMLP._gaussian_topk with the standard normal's inverse CDF of the
    # sparsity (a number of the config) computed in Python, not as a tensor in the graph.
    std_multiplier = statistics.NormalDist().inv_cdf(self.activation_sparsity)
    inputs_mean = torch.mean(inputs, dim=-1, keepdim=True)
    inputs_std = torch.std(inputs, dim=-1, keepdim=True, unbiased=False)
    cutoff_x = inputs_mean + inputs_std * std_multiplier
    return nn.functional.relu(inputs - cutoff_x)


_GEMMA3N = "transformers.models.gemma3n.modeling_gemma3n"

PATCHES = (
    Patch(
        name="gemma3n_altup_clip_as_read",
        target=f"{_GEMMA3N}:Gemma3nTextAltUp.correct",
        replacement=_gemma3n_altup_correct,
        fixes="RuntimeError: We found a fake tensor in the exported program constant's list "
        "(model.model.layers.0.lifted_tensor_N: AltUp's `correct` clamps its weight in place through "
        "`.data` inside forward)",
    ),
    Patch(
        name="gemma3n_sparsity_cutoff_as_number",
        target=f"{_GEMMA3N}:Gemma3nTextMLP._gaussian_topk",
        replacement=_gemma3n_gaussian_topk,
        fixes="DispatchError: No ONNX function found for prims.erf_inv (the activation-sparsity cutoff "
        "is `Normal(0, 1).icdf(torch.tensor(sparsity))`, an erfinv of a constant in the graph)",
    ),
)
