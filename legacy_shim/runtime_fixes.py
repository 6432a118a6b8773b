"""Two runtime fixes for `optimum.onnxruntime`, as plain functions the shim's classes call.

- :func:`evaluate_axis_expression` replaces upstream's `eval()` of symbolic dimension names
  (`ORTSessionMixin._dynamic_axis_inference`), which runs whatever Python a model file puts in
  a `dim_param`. It accepts integer arithmetic over known axis names and nothing else.
- :func:`cache_dims_from_session` reads the key/value head count and head sizes from the
  session's `present.*` output shapes (static in every export; an observer export's
  `past_key_values.*` inputs leave those axes symbolic, see optimum_observer.portable_cache). Upstream computes them from the config
  (`hidden_size // num_attention_heads`, and `num_attention_heads` as kv heads for most types),
  which is wrong whenever `head_dim` is explicit or the model uses grouped-query attention
  (measured: llama with head_dim=32, hidden_size=64, 4 heads fails at the first generate step
  with "index: 3 Got: 16 Expected: 32"). For files where upstream's values are right, the
  session's static dims are the same numbers, so legacy results do not change.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
from collections.abc import Mapping, Sequence

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_axis_expression(axis_name: str, known_axes_values: Mapping[str, int]) -> int:
    """The value of a symbolic dimension such as `"past_sequence_length + sequence_length"`.

    Raises:
        ValueError: the name is not integer arithmetic over known axis names; nothing of it is
            executed.
    """
    if axis_name in known_axes_values:
        return int(known_axes_values[axis_name])
    try:
        tree = ast.parse(axis_name, mode="eval")
    except SyntaxError:
        tree = None

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id in known_axes_values:
            return known_axes_values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(ast.dump(node))

    try:
        if tree is None:
            raise ValueError("not an expression")
        return int(value(tree))
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"Cannot infer the size of the ONNX dimension {axis_name!r}: only integer arithmetic over "
            f"the known dimensions {sorted(known_axes_values)} is evaluated. Re-export the model, or run "
            "it without IO binding (use_io_binding=False)."
        ) from None


@dataclasses.dataclass(frozen=True)
class CacheDims:
    """Static sizes of a past key/value input `(batch, num_heads, past_length, head_size)`."""

    num_heads: int
    key_head_size: int
    value_head_size: int


def cache_dims_from_session(
    shapes: Mapping[str, Sequence[int | str | None]], key_value_names: Sequence[str]
) -> CacheDims | None:
    """The cache dims of the first layer's key and value (`shapes` of the session's inputs or
    outputs, `key_value_names` the cache's names among them), when both are 4-d with static
    head count and head size; None otherwise (the caller keeps upstream's config-derived values)."""
    keys = [n for n in key_value_names if n.endswith(".key")]
    values = [n for n in key_value_names if n.endswith(".value")]
    if not keys or not values:
        return None
    key, value = shapes[keys[0]], shapes[values[0]]
    static = all(len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int) for s in (key, value))
    if not static or key[1] != value[1]:
        return None
    return CacheDims(num_heads=key[1], key_head_size=key[3], value_head_size=value[3])
