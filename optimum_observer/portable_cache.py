"""Portable cache inputs: the graph accepts the empty first-step cache any Optimum runtime feeds.

Takes: a program named by :mod:`optimum_observer.naming`.
Gives (:func:`make_cache_inputs_portable`): the same program in which every key/value cache
input `past_key_values.*.key|value`, shaped `(batch, heads, past, head_size)` with static `heads` and `head_size`, declares those
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

Gives (:func:`carry_states_as_values`): the program with every state input and output in a
value slot, and their axes by their new names. Why: optimum-onnx's runtime feeds only the inputs
whose name holds `.key` or `.value` (zeros of shape `(batch, heads, 0, head_size)` at the first
step, then the previous step's outputs holding `.key` / `.value`, by position), so the
fixed-size states of state-space and hybrid models (`past_key_values.{i}.conv_state`,
`.ssm_state`, `.recurrent_state`, named by :mod:`optimum_observer.cache_pytree`) were never fed
("Input past_key_values.0.conv_state is required by model but not provided"). Each state is
carried in a value slot instead: input `past_key_values.{i}.value.{state}`, output
`present.{i}.value.{state}` (same order, so position-wise feeding pairs them; the last part
still says what the tensor is), declared 4-D with symbolic non-batch axes. Inside the graph

`Reshape(Pad(Reshape(past, [0, -1]), [0, 0, 0, size - n]), state shape)`

turns what it is fed into the state: the empty first-step tensor of any `(heads, head_size)`
(n = 0 elements per row) into zeros, which is how every state cache starts; the graph's own
4-D output of `size` elements per row into itself (a pad of 0). The output is the state in its
4-D layout (:func:`carried_shape`: a 4-D state as it is, `(batch, c, k)` as `(batch, c, 1, k)`),
4-D like every cache tensor optimum's runtime handles (its beam-search reordering requires it).
"""

from __future__ import annotations

import math
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


#: Graph inputs and outputs holding a state: a per-layer cache leaf that is not a key or a value
#: (an encoder-decoder cache's `past_key_values.0.decoder.key` has one more part).
_STATE = re.compile(r"^(?:past_key_values|present)\.\d+\.(?!(?:key|value)$)\w+$")
#: The slot a state is carried in: optimum's runtime feeds a name holding `.key` or `.value`.
STATE_SLOT = "value"
#: Names of the carried inputs' symbolic non-batch axes.
STATE_AXIS_NAMES = {1: "state_axis_1", 2: "state_axis_2", 3: "state_axis_3"}


def carried_name(name: str) -> str:
    """`past_key_values.3.conv_state` -> `past_key_values.3.value.conv_state` (and `present.*`
    alike); any other name unchanged."""
    if _STATE.match(name):
        prefix, _, state = name.rpartition(".")
        return f"{prefix}.{STATE_SLOT}.{state}"
    return name


_CARRIED_STATE = re.compile(rf"^(?:past_key_values|present)\.\d+\.{STATE_SLOT}\.\w+$")


def is_carried_state(name: str) -> bool:
    """Whether `name` is a state carried in a value slot (`present.3.value.conv_state`)."""
    return bool(_CARRIED_STATE.match(name))


def carried_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The 4-D layout a state of `shape` (batch first) is carried in: `(batch, 1, 1, s)`,
    `(batch, c, 1, k)`, itself, or `(batch, a, b*...*y, z)`."""
    batch, *rest = shape
    if len(rest) == 1:
        return (batch, 1, 1, rest[0])
    if len(rest) == 2:
        return (batch, rest[0], 1, rest[1])
    return (batch, rest[0], math.prod(rest[1:-1]), rest[-1])


def _constant(nodes: list[ir.Node], name: str, values: list[int]) -> ir.Value:
    value = ir.Value(name=name)
    nodes.append(
        ir.node("Constant", inputs=[], attributes={"value": ir.tensor(values, dtype=ir.DataType.INT64)}, outputs=[value])
    )
    return value


def _batch_axis(dim: object) -> dict[int, str]:
    name = getattr(dim, "value", None)
    return {0: name} if isinstance(name, str) else {}


def _dynamic_state(shape: ir.Shape | None) -> bool:
    """Not a state of fixed size (only the batch varies): left as it is."""
    return shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in list(shape)[1:])


def carry_states_as_values(model: ir.Model) -> dict[str, dict[int, str]]:
    """Rewrites `model`'s state inputs and outputs in place (see the module docstring);
    returns the symbolic axes of each renamed input and output, by its new name (empty when the
    graph has no state cache)."""
    graph = model.graph
    axes: dict[str, dict[int, str]] = {}
    for position, old in enumerate(list(graph.inputs)):
        name = old.name or ""
        shape = old.shape
        if not (name.startswith("past_key_values.") and _STATE.match(name)) or _dynamic_state(shape):
            continue
        batch, *state_dims = shape
        size = math.prod(state_dims)
        new = ir.Value(
            name=carried_name(name),
            type=old.type,
            shape=ir.Shape([batch, *STATE_AXIS_NAMES.values()]),
        )
        nodes: list[ir.Node] = []
        flat_layout = _constant(nodes, f"{name}_flat_layout", [0, -1])
        state_layout = _constant(nodes, f"{name}_layout", [0, *state_dims])
        full = _constant(nodes, f"{name}_size", [size])
        no_pad = _constant(nodes, f"{name}_no_pad", [0, 0, 0])
        flat = ir.Value(name=f"{name}_flat", type=old.type, shape=ir.Shape([batch, None]))
        fed = ir.Value(name=f"{name}_fed_size")
        missing = ir.Value(name=f"{name}_missing")
        pads = ir.Value(name=f"{name}_pads")
        padded = ir.Value(name=f"{name}_padded", type=old.type, shape=ir.Shape([batch, size]))
        state = ir.Value(name=f"{name}_state", type=old.type, shape=ir.Shape(list(shape)))
        nodes += [
            ir.node("Reshape", inputs=[new, flat_layout], outputs=[flat]),
            ir.node("Shape", inputs=[flat], attributes={"start": 1, "end": 2}, outputs=[fed]),
            ir.node("Sub", inputs=[full, fed], outputs=[missing]),
            ir.node("Concat", inputs=[no_pad, missing], attributes={"axis": 0}, outputs=[pads]),
            ir.node("Pad", inputs=[flat, pads], outputs=[padded]),
            ir.node("Reshape", inputs=[padded, state_layout], outputs=[state]),
        ]
        old.replace_all_uses_with(state)
        old.name = None
        graph.inputs[position] = new
        graph.insert_before(graph[0], nodes)
        axes[new.name] = {**_batch_axis(batch), **STATE_AXIS_NAMES}
    for position, old in enumerate(list(graph.outputs)):
        name = old.name or ""
        shape = old.shape
        if not (name.startswith("present.") and _STATE.match(name)) or _dynamic_state(shape):
            continue
        dims = list(shape)
        layout = carried_shape(dims)
        if tuple(dims) == layout:
            old.name = carried_name(name)
        else:
            nodes = []
            target = _constant(nodes, f"{name}_carried_layout", [0, *layout[1:]])
            new = ir.Value(name=carried_name(name), type=old.type, shape=ir.Shape(list(layout)))
            nodes.append(ir.node("Reshape", inputs=[old, target], outputs=[new]))
            old.name = f"{name}_state"
            graph.extend(nodes)
            graph.outputs[position] = new
        axes[carried_name(name)] = _batch_axis(dims[0])
    return axes
