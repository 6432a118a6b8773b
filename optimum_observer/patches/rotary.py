"""Patches of rotary embeddings computed in complex numbers, which ONNX cannot hold.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Patch


def _real_rotary_forward(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    # Upstream returns `torch.polar(1, freqs) * scaling`, a complex tensor; this returns the same
    # numbers as real pairs (..., dim / 2, 2): (cos, sin) * scaling.
    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv_freq.to(x.device) @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """`view_as_real(view_as_complex(x as pairs) * complex(cos, sin)).flatten(3)`, in real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


def _llama4_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Queries and keys are (batch, positions, heads, head size) here.
    freqs = freqs[:, :, None]
    return _rotate_pairs(xq, freqs), _rotate_pairs(xk, freqs)


def _deepseek_v2_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Queries and keys are (batch, heads, positions, head size) here.
    freqs = freqs.unsqueeze(1)
    return _rotate_pairs(xq, freqs), _rotate_pairs(xk, freqs)


_COMPLEX_ROTARY = (
    "DispatchError: No ONNX function found for aten.unsqueeze: No decompositions registered for the "
    "complex-valued input (rotary embedding as complex numbers, torch.polar / view_as_complex)"
)

#: Rotary embeddings computed in complex numbers: (module, rotary class, real apply function).
_COMPLEX_ROTARY_MODELS = (
    ("llama4", "Llama4TextRotaryEmbedding", _llama4_apply_rotary_emb),
    ("deepseek_v2", "DeepseekV2RotaryEmbedding", _deepseek_v2_apply_rotary_emb),
)


def _real_rotary_method(original: Any) -> Any:
    """The real-valued rotary forward, with upstream's decorators (the original is replaced whole)."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    return torch.no_grad()(dynamic_rope_update(_real_rotary_forward))


PATCHES = tuple(
    patch
    for module_name, rotary_class, apply_function in _COMPLEX_ROTARY_MODELS
    for patch in (
        Patch(
            name=f"real_{module_name}_rotary_embedding",
            target=f"transformers.models.{module_name}.modeling_{module_name}:{rotary_class}.forward",
            wrap=_real_rotary_method,
            fixes=_COMPLEX_ROTARY,
        ),
        # Module attribute: the attention looks it up at call time.
        Patch(
            name=f"real_{module_name}_apply_rotary_emb",
            target=f"transformers.models.{module_name}.modeling_{module_name}:apply_rotary_emb",
            replacement=apply_function,
            fixes=_COMPLEX_ROTARY,
        ),
    )
)
