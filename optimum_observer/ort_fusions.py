"""What `--optimize` changes in onnxscript's ONNX Runtime fusions (`ort_fusions.fuse_xformers`).

* :func:`fusions_replaced`: onnxscript's GroupQueryAttention rewrite drops the attention mask:
  it gives ``com.microsoft.GroupQueryAttention`` ``seqlens_k = max(position_ids)`` per row, which
  ONNX Runtime reads as "this row's keys are positions ``0..seqlens_k``": right padding or none.
  Optimum left-pads batches, so a padded row attended to its padding and missed its last tokens
  (wrong from the first token: tests/test_optimization.py). :class:`GroupQueryAttentionKeepingMask`
  is the same rewrite (onnxscript's pattern, checks and node) with the model's own mask and
  positions: every row's ``seqlens_k`` is the whole key length minus one (the cache laid out as
  the model lays it out), the mask the model computed (padding and causal terms) goes in as
  ``attention_bias`` (input 10, implemented on CPU), and query and key are rotated before the node
  by ``RotaryEmbedding`` nodes with the model's ``position_ids`` and no rotary inside it: ONNX
  Runtime 1.31's GroupQueryAttention rotates a first prompt from ``position_ids[0]`` on as one
  offset for every row ("position_ids base value 1 with sequence_length 13 exceeds cos/sin cache
  range" on a left-padded batch). SmolLM2-135M ``--optimize --quantize int4``, one decode step
  after 128 tokens, one thread: 0.323x legacy fp32 against 0.387x with the previous
  ``MultiHeadAttention`` form, which repeated the key/value heads in the graph at every step
  (one run, 2026-12-05, machine shared with an export job).
* :func:`symbolic_dims_canonical`: torch.onnx writes symbolic shapes as sympy expressions, and
  the same length can be written ``past_sequence_length + sequence_length`` on one value and
  ``sequence_length + past_sequence_length`` on another. onnxscript's fusions compare dimensions
  as strings, so the SDPA fusion missed the layers whose key and value lengths were written
  differently (6 of SmolLM2-135M's 30 layers). Every such expression is rewritten in sympy's
  canonical form before the fusions.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions import gqa


class _MaskKeepingBuilder:
    """The rewrite's op builder, except that ``GroupQueryAttention`` gets the model's mask, its
    key length and query / key rotated by the model's positions (see
    :class:`GroupQueryAttentionKeepingMask`)."""

    def __init__(self, op, bindings: dict):
        self._op, self._bindings = op, bindings

    def __getattr__(self, name):
        return getattr(self._op, name)

    def GroupQueryAttention(self, query, key, value, past_key, past_value, _seqlens_k, _total, cos, sin, **attributes):
        op, bound = self._op, self._bindings
        length = op.Shape(bound["query_BSD"], start=1, end=2)
        if past_key is not None:
            length = op.Add(op.Shape(past_key, start=2, end=3), length)
        total = op.Cast(length, to=ir.DataType.INT32)
        one = op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT32))
        seqlens_k = op.Expand(op.Sub(total, one), op.Shape(bound["query_BSD"], start=0, end=1))
        # The model's RotaryEmbedding nodes (their attributes), on (batch, sequence, hidden) inputs.
        rotated = []
        for value_in, rope, heads in (
            (query, "query_BHSDh_rope", attributes["num_heads"]), (key, "key_BHkvSDh_rope", attributes["kv_num_heads"])
        ):
            options = {name: attr.value for name, attr in bound[rope].producer().attributes.items()}
            options["num_heads"] = heads
            rotated.append(op.RotaryEmbedding(
                value_in, bound["position_ids"], cos, sin, _domain="com.microsoft", **options
            ))
        attributes = {name: v for name, v in attributes.items() if name not in ("do_rotary", "rotary_interleaved")}
        return op.GroupQueryAttention(
            *rotated, value, past_key, past_value, seqlens_k, op.Squeeze(total), None, None, None, bound["mask"],
            do_rotary=0, **attributes,
        )


class GroupQueryAttentionKeepingMask(gqa.GroupQueryAttention):
    """onnxscript's GroupQueryAttention rewrite (same pattern and checks) whose node keeps the
    model's attention mask (``attention_bias``) and rotary positions (module docstring)."""

    def rewrite(self, op, **bindings):
        return super().rewrite(_MaskKeepingBuilder(op, bindings), **bindings)


#: fusion name -> the function `fuse_xformers` calls instead of onnxscript's (made as onnxscript
#: makes its own).
REPLACEMENTS = {
    "gqa": _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([GroupQueryAttentionKeepingMask.rule()])),
}


@contextlib.contextmanager
def fusions_replaced() -> Iterator[None]:
    """Within the block, onnxscript's `fuse_xformers` runs :data:`REPLACEMENTS` instead of its own
    fusions of those names (same fusion-count names); restored on exit."""
    from onnxscript.rewriter.ort_fusions import _core

    saved = {name: getattr(_core, f"fuse_{name}") for name in REPLACEMENTS}
    try:
        for name, function in REPLACEMENTS.items():
            setattr(_core, f"fuse_{name}", function)
        yield
    finally:
        for name, function in saved.items():
            setattr(_core, f"fuse_{name}", function)


def symbolic_dims_canonical(model: ir.Model) -> int:
    """Rewrites every symbolic dimension of `model`'s intermediate values that is an expression
    (``a + b``, ``Min(...)``) in sympy's canonical form, so that equal lengths are equal strings;
    the graph's inputs and outputs keep the names the naming stage gave them. Returns how many
    dimensions changed."""
    import sympy

    canonical: dict[str, str] = {}
    changed = 0
    outputs = {id(value) for value in model.graph.outputs}
    values = [output for node in model.graph.all_nodes() for output in node.outputs if id(output) not in outputs]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        new = []
        for dim in dims:
            text = dim.value if isinstance(dim, ir.SymbolicDim) else None
            if not text or text.isidentifier():
                new.append(dim)
                continue
            if text not in canonical:
                # Every name a symbol (sympify alone reads `E`, `I`, `N`, `S` as sympy's own objects).
                names = {name: sympy.Symbol(name) for name in re.findall(r"[A-Za-z_]\w*", text)}
                names.update(Min=sympy.Min, Max=sympy.Max)
                try:
                    canonical[text] = str(sympy.parse_expr(text, local_dict=names))
                except (sympy.SympifyError, SyntaxError, TypeError, ValueError):
                    canonical[text] = text
            new.append(ir.SymbolicDim(canonical[text]) if canonical[text] != text else dim)
        moved = sum(a is not b for a, b in zip(new, dims))
        if moved:
            value.shape = ir.Shape(new)
            changed += moved
    return changed
