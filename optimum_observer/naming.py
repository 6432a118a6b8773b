"""Naming: give the exported graph Optimum's input, output and dimension names.

Takes: the `torch.onnx.ONNXProgram`, the graph's capture and the export example.
Gives: the program renamed in place (through `onnx_ir`, no protobuf surgery) and the dynamic
axes of every graph input and output.

Inputs: the example's leaf names (`input_ids`, `attention_mask`, `position_ids`,
`encoder_hidden_states`, `past_key_values.{i}.key|value` or
`past_key_values.{i}.decoder|encoder.key|value`, and a state cache's `past_key_values.{i}.conv_state`
/ `.ssm_state` / `.recurrent_state`, which :mod:`optimum_observer.portable_cache` then moves into
value slots, `past_key_values.{i}.value.conv_state`). Outputs: the contract's names (`logits`,
`last_hidden_state`, ...), and a cache as `present.{i}.{suffix}` with the suffixes of the cache
class torch returned (or the contract's own). Dimensions: the example's symbols (`batch_size`,
`sequence_length`, `past_sequence_length`, `encoder_sequence_length`), with a sum written as the
example names it (`past_sequence_length + sequence_length`) whichever order of terms torch
produced, and an expression torch left unsimplified (`((encoder_sequence_length*batch_size)//batch_size)`
for a cross-attention cache reshaped through batch) simplified over positive integer symbols; one
that simplifies to a number (whisper's 1500 encoder frames) becomes a static size.
"""

from __future__ import annotations

import functools
import re

import onnx_ir as ir
import sympy
import torch

from .cache_pytree import cache_leaf_names
from .capture import Capture
from .errors import ObserverExportError, Stage
from .synthesis import ExportExample


def input_names(example: ExportExample) -> list[str]:
    return [leaf.onnx_name for leaf in example.leaves]


def output_names(capture: Capture, num_outputs: int) -> list[str]:
    """Tensor outputs by their contract name; the one cache output (whose type the first
    observed call shows) takes the remaining outputs, named per layer."""
    returned = capture.calls[0].outputs
    values = [(output, output.read(returned)) for output in capture.graph.outputs]
    tensors = [output.name for output, value in values if isinstance(value, torch.Tensor)]
    names = list(tensors)
    caches = [(output, value) for output, value in values if not isinstance(value, torch.Tensor)]
    if caches:
        (output, value), = caches
        position = [o for o, _ in values].index(output)
        names[position:position] = cache_leaf_names(output.name, value, output.leaf_suffixes)
    return names


def _terms(dim_name: str) -> frozenset[str]:
    return frozenset(term.strip() for term in dim_name.split("+"))


@functools.lru_cache(maxsize=None)
def _simplified(dim_name: str) -> str:
    """`((a*b)//b)` -> `a`: sizes are positive integers, so sympy may cancel through a floor
    division. A name with no operator, or one sympy cannot read, is kept as it is."""
    if not re.search(r"[*/()]", dim_name):
        return dim_name
    symbols = {name: sympy.Symbol(name, integer=True, positive=True)
               for name in set(re.findall(r"[A-Za-z_]\w*", dim_name))}
    try:
        expression = sympy.simplify(sympy.sympify(dim_name, locals=symbols))
    except (sympy.SympifyError, SyntaxError, TypeError):
        return dim_name
    return str(expression)


def _rename_dims(value: ir.Value, sums: dict[frozenset[str], str]) -> dict[int, str]:
    axes = {}
    if value.shape is None:
        return axes
    dims = list(value.shape)
    for axis, dim in enumerate(dims):
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            name = _simplified(dim.value)
            if name.isdigit():  # `((1500*batch_size)//batch_size)`: a static size after all
                dims[axis] = int(name)
                continue
            dims[axis] = sums.get(_terms(name), name)
            axes[axis] = dims[axis]
    value.shape = ir.Shape(dims)
    return axes


def apply_names(
    program: torch.onnx.ONNXProgram, capture: Capture, example: ExportExample, model_type: str
) -> dict[str, dict[int, str]]:
    graph = program.model.graph
    wanted_inputs = input_names(example)
    try:
        wanted_outputs = output_names(capture, len(graph.outputs))
    except KeyError as error:
        raise ObserverExportError(
            model_type,
            Stage.NAMING,
            f"the observed calls returned no {error.args[0]!r}, which {capture.graph.file_name} must output",
            "run the model the way the task needs it (for a task with past: calls with use_cache=True "
            "that return a cache), or export for the task without past (for example text-generation).",
        ) from error
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
