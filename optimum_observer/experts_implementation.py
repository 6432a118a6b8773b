"""transformers 5's pluggable MoE experts, exported without the data-dependent expert loop.

Takes a loaded model; gives what to change for its export (the export stage enters
:func:`batched_experts` and drops :func:`superseded_patches` from the model's patches).

transformers 5 moved the expert loop of mixtral-style sparse MoE blocks (mixtral, qwen2_moe,
qwen3_moe, ...) into experts modules decorated with `use_experts_implementation`, whose forward
dispatches on `config._experts_implementation`: "eager" is the old loop over the experts the data
selected (GuardOnDataDependentSymNode at torch.export), "grouped_mm" (the CPU default) sizes its
groups by the routing, "batched_mm" gathers each token's top-k expert weights and runs one batched
matmul, with no data-dependent shape or branch. The 4.x dense-MoE patches replace the block's
forward and call `self.gate(x)` as a linear layer; on transformers 5 the gate is a router that
returns `(logits, weights, indices)`, so they fail with "softmax(): argument 'input' must be
Tensor, not tuple".

- :func:`pluggable_experts`: the experts modules of a model that take an implementation (none on
  transformers 4.57).
- :func:`superseded_patches`: the block patches that must not apply to such a model (the patch
  of a class that holds a pluggable experts module).
- :func:`batched_experts`: a `with` block in which every pluggable experts module runs
  "batched_mm", through transformers' own `set_experts_implementation`; the previous
  implementations are restored on exit, also when the block raises.

Measured on transformers 5.25 (tiny mixtral, 2 key/value heads of 4, 4 experts, top 2): without
`dense_mixtral_moe` and with "batched_mm", `optimum_observer.export` validates every observed call
(max |diff| 2.1e-07) and greedy generation through `legacy_shim.ORTModelForCausalLM`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

EXPORTABLE_IMPLEMENTATION = "batched_mm"


@functools.cache
def _decorated_forward_code() -> Any:
    """The code object of the forward `use_experts_implementation` gives every class it
    decorates (one closure per class, one code object for all); None before transformers 5."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None
    probe = type("Probe", (torch.nn.Module,), {"forward": lambda self: None})
    return use_experts_implementation(probe).forward.__code__


def is_pluggable(module: torch.nn.Module) -> bool:
    code = _decorated_forward_code()
    return code is not None and getattr(type(module).forward, "__code__", None) is code


def pluggable_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if is_pluggable(module)]


def superseded_patches(patches: Sequence[Any], model: torch.nn.Module) -> tuple[Any, ...]:
    """The `patches` (registry records) that replace a method of a class one of whose instances in
    `model` holds a pluggable experts module directly: on transformers 5 the experts module is
    exported as is (see :func:`batched_experts`). Targets missing here are not superseded (the
    registry skips them anyway)."""
    holders = {
        type(module)
        for module in model.modules()
        if any(is_pluggable(child) for child in module.children())
    }
    if not holders:
        return ()
    return tuple(patch for patch in patches if patch.exists() and patch.resolve().owner in holders)


@contextlib.contextmanager
def batched_experts(model: torch.nn.Module) -> Iterator[bool]:
    """Every pluggable experts module of `model` runs "batched_mm" for the block (yields whether
    `model` has any); the previous implementation of each (sub)config is restored on exit."""
    if not pluggable_experts(model):
        yield False
        return
    original = model.get_experts_implementation()
    model.set_experts_implementation({key: EXPORTABLE_IMPLEMENTATION for key in original})
    try:
        yield True
    finally:
        model.set_experts_implementation(original)
