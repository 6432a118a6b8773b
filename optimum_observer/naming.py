"""Naming: give the exported graph Optimum's input, output and dimension names.

Takes: the `torch.onnx.ONNXProgram`, the task contract and the export example.
Gives: the program renamed in place (through `onnx_ir`, no protobuf surgery) and the dynamic
axes of every graph input and output.

Inputs: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`.
Outputs: `logits`, `present.{i}.key|value`. Dimensions: the example's symbols (`batch_size`,
`sequence_length`, `past_sequence_length`), with a sum written as the example names it
(`past_sequence_length + sequence_length`) whichever order of terms torch produced.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from .cache_pytree import leaf_name
from .errors import ObserverExportError, Stage
from .synthesis import ExportExample
from .tasks import TaskContract

OUTPUT_CACHE_PREFIX = {"past_key_values": "present"}


def input_names(example: ExportExample) -> list[str]:
    names = []
    for leaf in example.leaves:
        is_cache = sum(1 for other in example.leaves if other.input_name == leaf.input_name) > 1
        names.append(leaf_name(leaf.input_name, leaf.index) if is_cache else leaf.input_name)
    return names


def output_names(contract: TaskContract, num_outputs: int) -> list[str]:
    tensor_fields = [f for f in contract.outputs if f not in OUTPUT_CACHE_PREFIX]
    cache_fields = [f for f in contract.outputs if f in OUTPUT_CACHE_PREFIX]
    names = list(tensor_fields)
    if cache_fields:
        (field,) = cache_fields
        names += [leaf_name(OUTPUT_CACHE_PREFIX[field], i) for i in range(num_outputs - len(names))]
    return names


def _terms(dim_name: str) -> frozenset[str]:
    return frozenset(term.strip() for term in dim_name.split("+"))


def _rename_dims(value: ir.Value, sums: dict[frozenset[str], str]) -> dict[int, str]:
    axes = {}
    if value.shape is None:
        return axes
    dims = list(value.shape)
    for axis, dim in enumerate(dims):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            dims[axis] = sums.get(_terms(dim.value), dim.value)
            axes[axis] = dims[axis]
    value.shape = ir.Shape(dims)
    return axes


def apply_names(
    program: torch.onnx.ONNXProgram, contract: TaskContract, example: ExportExample, model_type: str
) -> dict[str, dict[int, str]]:
    graph = program.model.graph
    wanted_inputs = input_names(example)
    wanted_outputs = output_names(contract, len(graph.outputs))
    if len(graph.inputs) != len(wanted_inputs) or len(graph.outputs) != len(wanted_outputs):
        raise ObserverExportError(
            model_type,
            Stage.NAMING,
            f"the graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, expected "
            f"{len(wanted_inputs)} / {len(wanted_outputs)} ({wanted_inputs} -> {wanted_outputs})",
            "an input was folded into a constant or an output duplicated; report the model type.",
        )
    sums = {_terms(name): name for name in example.sizes if "+" in name}
    axes: dict[str, dict[int, str]] = {}
    for value, name in [*zip(graph.inputs, wanted_inputs), *zip(graph.outputs, wanted_outputs)]:
        value.name = name
        axes[name] = _rename_dims(value, sums)
    return axes
