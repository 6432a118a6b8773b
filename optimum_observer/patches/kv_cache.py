"""Patches of how key/value caches are created inside the exported graph.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import Patch


def _lazy_initialization_from_key_states(
    self: Any, key_states: torch.Tensor, value_states: torch.Tensor | None = None
) -> None:
    # An empty tensor made from the incoming states instead of `torch.tensor([])`: the latter is
    # a constant created inside the traced graph, which torch.export lifts and then loses. It
    # stays 1-d like upstream's, which `torch.cat` skips, so values whose head size differs from
    # the keys' (DeepSeek's multi-head latent attention) still concatenate. transformers 5 passes
    # the value states too.
    self.dtype, self.device = key_states.dtype, key_states.device
    self.keys = key_states.new_zeros((0,))
    self.values = (key_states if value_states is None else value_states).new_zeros((0,))
    self.is_initialized = True


PATCHES = (
    Patch(
        name="dynamic_layer_lazy_initialization",
        target="transformers.cache_utils:DynamicLayer.lazy_initialization",
        replacement=_lazy_initialization_from_key_states,
        # The cache is no submodule of the model: nothing to select it by.
        everywhere=True,
        fixes="Constant tensor lifted_tensor_N is not in the constants dictionary "
        "(DynamicLayer.lazy_initialization creates torch.tensor([]) inside the graph)",
    ),
    Patch(
        name="fsmt_decoder_config",
        target="transformers.models.fsmt.modeling_fsmt:FSMTDecoder.config",
        # `DynamicCache(config=None)` is the plain cache FSMT's own generate() passes in.
        replacement=property(lambda self: None),
        fixes="AttributeError: 'FSMTDecoder' object has no attribute 'config' (the decoder builds "
        "its cache from `self.config` when its first call gets none: decoder_model.onnx's graph; "
        "transformers 4.57 never sets it)",
    ),
)
