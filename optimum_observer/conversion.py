"""Export: `torch.onnx.export(..., dynamo=True)` of the model under the task contract.

Takes: the loaded model, one graph contract and an :class:`~optimum_observer.synthesis.ExportExample`.
Gives: a `torch.onnx.ONNXProgram` whose inputs are the example's flattened leaves in contract
order and whose outputs are the contract's outputs, flattened (logits, then the cache).

The graph's module (the model, or its encoder) is wrapped in a module whose `forward` takes
exactly the graph's inputs by name, passes each as the `forward` argument it was observed in,
and returns the contract's outputs as a tuple, so graph inputs and outputs come in a known
order for the naming stage. The export runs inside the patches of :mod:`optimum_observer.patches`.

One `torch.onnx.export` call runs two stages: torch.export (step 1: the graph captured, by the
exporter's own capture strategies) and the ONNX conversion (steps 2 and 3: decompositions, then
translation at the opset). A failure names the one that failed, from the exporter's error class
(`TorchExportError` or `ConversionError`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.onnx._internal.exporter._errors import TorchExportError
from transformers.modeling_outputs import BaseModelOutput

from .errors import ObserverExportError, Stage
from .patches import (
    PATCHES,
    Patch,
    applied,
    decoder_layer_regions,
    exact_no_op_constants,
    fewer_garbage_collections,
    for_model,
    plain_tensor_buffers,
    split_to_sequence_folding_guard,
    unbounded_sympy_cache,
    uncached_fake_tensor_dispatch,
    untraced_no_op_mode_switches,
)
from .capture import observed_module
from .experts_implementation import batched_experts, superseded_patches
from .synthesis import ExportExample
from .tasks import GraphContract

logger = logging.getLogger(__name__)


def supported_opsets() -> range:
    """The opsets `torch.onnx.export(dynamo=True)` produces: its operators are implemented at
    torchlib's opset (18), below which it only tries a version conversion and silently keeps 18
    when that fails, up to the highest opset torch declares (23 in torch 2.13)."""
    from torch.onnx import _constants as onnx_constants
    from torch.onnx._internal.exporter import _constants as exporter_constants

    return range(exporter_constants.TORCHLIB_OPSET, onnx_constants.ONNX_MAX_OPSET + 1)


def check_opset(opset: int | None, model_type: str) -> None:
    """Refuses, before any work, an opset the exporter cannot give."""
    supported = supported_opsets()
    if opset is None or opset in supported:
        return
    raise ObserverExportError(
        model_type,
        Stage.ONNX_CONVERSION,
        f"opset {opset} is outside the opsets torch.onnx.export(dynamo=True) produces "
        f"({supported.start} to {supported.stop - 1})",
        f"pass an opset from {supported.start} to {supported.stop - 1}, or none for the exporter's "
        "default; for an older runtime, use optimum-onnx's exporter where it supports the model "
        "(optimum-cli export onnx --exporter legacy --opset N).",
    )


_AUXILIARY_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


class ContractModule(torch.nn.Module):
    """Calls the graph's module with the contract's inputs and returns its outputs as a tuple."""

    def __init__(self, model: torch.nn.Module, graph: GraphContract, position_offset: int = 0):
        super().__init__()
        self.model = model
        self.graph = graph
        self.position_offset = position_offset

    def forward(self, **inputs: Any) -> tuple[Any, ...]:
        accepted = inspect.signature(self.model.forward).parameters
        arguments = {}
        for contract_input in self.graph.inputs:
            if contract_input.name in inputs:
                value = inputs[contract_input.name]
                if contract_input.first_of:
                    # What generate() passes: a ModelOutput, read by index or by name (t5gemma
                    # reads `encoder_outputs.last_hidden_state`; a tuple fails there).
                    value = BaseModelOutput(last_hidden_state=value)
                arguments[contract_input.argument_for(accepted)] = value
        if self.position_offset and arguments.get("position_ids") is not None:
            # The graph takes the runtime's positions; the model counts from another origin.
            arguments["position_ids"] = arguments["position_ids"] + self.position_offset
        if self.graph.use_cache is not None:
            arguments["use_cache"] = self.graph.use_cache
        # Outputs no graph reads are not asked for. Router logits in particular: switch
        # transformers computes its auxiliary losses from them, reading the router logits of
        # `encoder_outputs`, which the decoder graph receives as its hidden states only.
        arguments.update({flag: False for flag in _AUXILIARY_OUTPUT_FLAGS if flag in accepted})
        outputs = self.model(**arguments, return_dict=True)
        return tuple(output.read(outputs) for output in self.graph.outputs)


def contract_module(
    model: torch.nn.Module, graph: GraphContract, input_names: list[str], position_offset: int = 0
) -> ContractModule:
    module = ContractModule(observed_module(model, graph.module), graph, position_offset).eval()
    # torch.export maps keyword arguments and dynamic shapes through forward's signature.
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in input_names]
    )

    def forward(**inputs: Any) -> tuple[Any, ...]:
        return ContractModule.forward(module, **inputs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    module.forward = forward  # type: ignore[method-assign]
    return module


def patches_for(model: torch.nn.Module, model_type: str) -> list[Patch]:
    """The patches `model`'s export applies: those its classes need
    (:func:`optimum_observer.patches.for_model`), less the MoE block patches transformers 5's
    pluggable experts supersede (:mod:`optimum_observer.experts_implementation`)."""
    selected = for_model(PATCHES, model, model_type)
    superseded = superseded_patches(selected, model)
    return [patch for patch in selected if patch not in superseded]


def convert(
    model: torch.nn.Module,
    graph: GraphContract,
    example: ExportExample,
    model_type: str,
    opset: int | None = None,
    patches: Sequence[Patch] | None = None,
    position_offset: int = 0,
) -> torch.onnx.ONNXProgram:
    """`patches`: the patches applied during the export; by default those `model` needs
    (:func:`optimum_observer.patches.for_model`). `position_offset`: added to the `position_ids`
    input inside the graph (see :func:`optimum_observer.capture.position_offset`)."""
    if patches is None:
        patches = patches_for(model, model_type)
    module = contract_module(model, graph, list(example.kwargs), position_offset)

    def export() -> torch.onnx.ONNXProgram:
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

    try:
        with applied(patches), batched_experts(model), plain_tensor_buffers(module), exact_no_op_constants(), \
                split_to_sequence_folding_guard(), unbounded_sympy_cache(), fewer_garbage_collections(), \
                untraced_no_op_mode_switches(), uncached_fake_tensor_dispatch(), torch.no_grad():
            program = None
            with decoder_layer_regions(model) as regions:
                try:
                    program = export()
                except Exception as error:
                    # Regions only save time: when torch rejects one, the export runs as before.
                    if regions is None or not regions.calls:
                        raise
                    cause = error
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    logger.info("%s: exporting without decoder-layer regions (%s: %s)", model_type,
                                type(cause).__name__, (str(cause).strip().splitlines() or [""])[0])
            if program is None:
                program = export()
    except Exception as error:
        raise _export_error(error, model_type) from error
    produced = program.model.opset_imports.get("")
    if opset is not None and produced != opset:
        raise ObserverExportError(
            model_type,
            Stage.ONNX_CONVERSION,
            f"the exported graph has opset {produced}, not the requested {opset} (the version "
            "conversion failed)",
            f"pass opset={produced} or none.",
        )
    return program


def _export_error(error: Exception, model_type: str) -> ObserverExportError:
    """The stage `torch.onnx.export(dynamo=True)` failed at, by its error class: `TorchExportError`
    is step 1 (torch.export could not capture the graph), anything else steps 2 and 3
    (`ConversionError`: decompositions or the translation of an operator to ONNX)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, TorchExportError):
        return ObserverExportError(
            model_type,
            Stage.TORCH_EXPORT,
            f"torch.export rejected the model: {type(error).__name__}: {first_line}",
            "this usually means a data-dependent branch or code torch.export cannot trace; rerun with "
            "logging at DEBUG for the full error, and check optimum_observer.patches for a fix of the "
            "same kind.",
        )
    return ObserverExportError(
        model_type,
        Stage.ONNX_CONVERSION,
        f"torch.onnx.export(dynamo=True) could not translate the exported program to ONNX: "
        f"{type(error).__name__}: {first_line}",
        "this usually means an operator without an ONNX implementation or with arguments torchlib "
        "does not take (DispatchError); rerun with logging at DEBUG for the full error, and check "
        "optimum_observer.patches for a fix of the same kind.",
    )


def check_axes(program: torch.onnx.ONNXProgram, example: ExportExample, model_type: str, file_name: str) -> None:
    """Refuses a graph in which torch.export bounded an axis the contract declares dynamic below a
    size the run fed (see :func:`restricted_axes`): the file would load and compute for sizes torch
    never traced, and ONNX Runtime does not check torch's guards."""
    restricted = restricted_axes(program.exported_program, example)
    if restricted:
        raise ObserverExportError(
            model_type,
            Stage.TORCH_EXPORT,
            f"torch.export bounded dynamic axes of {file_name} below sizes the run fed: "
            f"{'; '.join(restricted)}, so the graph would be wrong for inputs past the bound",
            "the model's code bounds that axis (a check, a slice of a fixed-size buffer, a padding "
            "branch); it needs a scoped patch that removes the bound (see optimum_observer.patches, "
            "e.g. the sliding-window ones); rerun with --verbose to see the traced guards.",
        )


def restricted_axes(program: torch.export.ExportedProgram, example: ExportExample) -> list[str]:
    """The axes the example declares dynamic whose range in the exported program excludes an
    observed size.

    The model's code can bound an axis (LED's padded attention mask came out as 1..5 while the
    run fed 13 tokens, before `patches/sliding_window.py` padded it by its own length); the ONNX
    input keeps its symbolic name and ONNX Runtime does not check torch's guards, so nothing
    downstream notices and the graph computes for sizes torch never traced.
    """
    values = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    problems = []
    for leaf, name in zip(example.leaves, program.graph_signature.user_inputs):
        value = values.get(name)
        if not isinstance(value, torch.Tensor):
            continue
        for axis, dim_name in sorted(leaf.dims.items()):
            size, observed = value.shape[axis], (leaf.largest or leaf.shape)[axis]
            if not isinstance(size, torch.SymInt):
                continue  # a static axis: torch.export already refuses to specialise a declared one
            bounds = program.range_constraints.get(size.node.expr)
            if bounds is not None and bool(bounds.upper < observed):
                problems.append(f"{leaf.onnx_name} axis {axis} ({dim_name}) <= {bounds.upper}, observed {observed}")
    return problems
