"""Export: `torch.onnx.export(..., dynamo=True)` of the model under the task contract.

Takes: the loaded model, the task contract and an :class:`~optimum_observer.synthesis.ExportExample`.
Gives: a `torch.onnx.ONNXProgram` whose inputs are the example's flattened leaves in contract
order and whose outputs are the contract's output fields, flattened (logits, then the cache).

The model is wrapped in a module whose `forward` takes exactly the contract's inputs by name
and returns the contract's output fields as a tuple, so graph inputs and outputs come in a
known order for the naming stage. The export runs inside the patches of :mod:`optimum_observer.patches`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ObserverExportError, Stage
from .patches import PATCHES, Patch, applied
from .synthesis import ExportExample
from .tasks import TaskContract

logger = logging.getLogger(__name__)


class ContractModule(torch.nn.Module):
    """Calls `model(**inputs)` and returns the contract's output fields as a tuple."""

    def __init__(self, model: torch.nn.Module, contract: TaskContract):
        super().__init__()
        self.model = model
        self.contract = contract

    def forward(self, **inputs: Any) -> tuple[Any, ...]:
        extra = {"use_cache": True} if self.contract.with_past else {"use_cache": False}
        outputs = self.model(**inputs, **extra, return_dict=True)
        return tuple(outputs[name] for name in self.contract.outputs)


def contract_module(model: torch.nn.Module, contract: TaskContract, input_names: list[str]) -> ContractModule:
    module = ContractModule(model, contract).eval()
    # torch.export maps keyword arguments and dynamic shapes through forward's signature.
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in input_names]
    )

    def forward(**inputs: Any) -> tuple[Any, ...]:
        return ContractModule.forward(module, **inputs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    module.forward = forward  # type: ignore[method-assign]
    return module


def convert(
    model: torch.nn.Module,
    contract: TaskContract,
    example: ExportExample,
    model_type: str,
    opset: int | None = None,
    patches: Sequence[Patch] = PATCHES,
) -> torch.onnx.ONNXProgram:
    module = contract_module(model, contract, list(example.kwargs))
    try:
        with applied(patches), torch.no_grad():
            return torch.onnx.export(
                module,
                (),
                kwargs=example.kwargs,
                dynamic_shapes=example.dynamic_shapes,
                dynamo=True,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ObserverExportError(
            model_type,
            Stage.EXPORT,
            f"torch.onnx.export(dynamo=True) rejected the model: {type(error).__name__}: {first_line}",
            "this usually means a data-dependent branch or an operator torch.export cannot trace; "
            "rerun with logging at DEBUG for the full error, and check "
            "optimum_observer.patches for a fix of the same kind.",
        ) from error
