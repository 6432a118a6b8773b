"""Portable cache inputs: the graph accepts the empty first-step cache any Optimum runtime feeds.

Takes: a program named by :mod:`optimum_observer.naming`.
Gives: the same program in which every key/value cache input `past_key_values.*.key|value`,
shaped `(batch, heads, past, head_size)` with static `heads` and `head_size`, declares those
two axes symbolic and is reshaped inside the graph to its own `(heads, head_size)` before any
node reads it; the names of the reshaped inputs.

Why: optimum-onnx's `ORTModelForCausalLM` (0.1.0) feeds the first generation step an empty
cache sized from the config: `num_attention_heads` as key/value heads except for a fixed list
of model types, `hidden_size // num_attention_heads` as head size except for four, one head
size for keys and values except deepseek_v3. For a model with grouped-query attention, an
explicit `head_dim` or MLA's different key and value sizes outside those lists, that tensor has
the wrong head count or head size, and ONNX Runtime refused it ("Got invalid dimensions for
input: past_key_values.1.key ... Got: 4 Expected: 2"). An environment without this package
cannot be fixed on the runtime side, so the graph takes any shape on those axes instead:

`Reshape(past, [0, heads, 0, head_size])` (a `0` copies the input's axis) turns an empty
`(batch, h, 0, d)` of any `h`, `d` into `(batch, heads, 0, head_size)`: with no elements there is
nothing to reinterpret, so the result is exact. Every later step feeds back the graph's own
`present.*` output, already of that shape, for which the reshape is the identity (ONNX Runtime's
CPU Reshape aliases its input; benchmarks/bench_portable_cache.py measures the decode step).
The outputs keep their static sizes, so a runtime that reads the cache layout from the graph
reads it from `present.*`.
"""

from __future__ import annotations

import re

import onnx_ir as ir

#: Graph inputs holding keys or values: `past_key_values.{i}.key` / `.value`, and the
#: encoder-decoder `past_key_values.{i}.decoder|encoder.key|value`.
_KEY_VALUE_INPUT = re.compile(r"^past_key_values\.\d+\.(?:(?:decoder|encoder)\.)?(key|value)$")

#: Names of the axes made symbolic, by the input's role.
HEADS_AXIS_NAME = "num_key_value_heads"
HEAD_SIZE_AXIS_NAMES = {"key": "key_head_size", "value": "value_head_size"}


def make_cache_inputs_portable(model: ir.Model) -> dict[str, dict[int, str]]:
    """Rewrites `model`'s key/value cache inputs in place (see the module docstring); returns
    the axes it made symbolic, by input name (empty when no input has static head axes)."""
    graph = model.graph
    rewritten: dict[str, dict[int, str]] = {}
    for position, old in enumerate(list(graph.inputs)):
        match = _KEY_VALUE_INPUT.match(old.name or "")
        shape = old.shape
        if match is None or shape is None or len(shape) != 4:
            continue
        heads, head_size = shape[1], shape[3]
        if not (isinstance(heads, int) and isinstance(head_size, int)):
            continue
        axes = {1: HEADS_AXIS_NAME, 3: HEAD_SIZE_AXIS_NAMES[match.group(1)]}
        new = ir.Value(name=old.name, type=old.type, shape=ir.Shape([shape[0], axes[1], shape[2], axes[3]]))
        target = ir.Value(name=f"{old.name}_reshaped", shape=ir.Shape(list(shape)), type=old.type)
        layout = ir.Value(name=f"{old.name}_layout")
        constant = ir.node(
            "Constant",
            inputs=[],
            attributes={"value": ir.tensor([0, heads, 0, head_size], dtype=ir.DataType.INT64)},
            outputs=[layout],
        )
        reshape = ir.node("Reshape", inputs=[new, layout], outputs=[target])
        old.replace_all_uses_with(target)
        old.name = None
        graph.inputs[position] = new
        graph.insert_before(graph[0], [constant, reshape])
        rewritten[new.name] = axes
    return rewritten
