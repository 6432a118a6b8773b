"""The exporter environment: scoped changes to torch and onnxscript state every export needs.

Takes: the module being exported. Gives: :func:`plain_tensor_buffers`,
:func:`exact_no_op_constants`, :func:`split_to_sequence_folding_guard`,
:func:`unbounded_sympy_cache`, :func:`fewer_garbage_collections`,
:func:`untraced_no_op_mode_switches` and :func:`uncached_fake_tensor_dispatch`, context managers that
restore what they changed on exit, also when the block raises (they are not
:class:`~optimum_observer.patches.registry.Patch` records: what they change is per model
instance, per rewrite rule, per cache or interpreter-wide, not one attribute), and
:data:`PATCHES`, the exporter's own functions replaced for every export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .registry import Patch


@contextlib.contextmanager
def plain_tensor_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Buffers registered as `nn.Parameter` objects are plain tensors for the block.

    Fixes: `KeyError: "attribute 'b_c_rms' already exists"` when torch.onnx.export unlifts the
    exported program (falcon_mamba registers `nn.Parameter(..., requires_grad=False)` objects
    with `register_buffer`, which torch re-registers as a parameter and then as a buffer).
    The module's own buffer objects are put back on exit, also when the block raises.
    """
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if isinstance(buffer, torch.nn.Parameter):
                    replaced.append((module, name, buffer))
                    module._buffers[name] = buffer.data
        yield
    finally:
        for module, name, buffer in replaced:
            module._buffers[name] = buffer


def _bounded_cache_cell(cached: Callable[..., Any]) -> Any:
    """The closure cell of one of sympy's `cacheit` functions that holds its `functools.lru_cache`
    (`cfunc` in `sympy.core.cache.__cacheit`), or None for a function without one."""
    for cell in getattr(cached, "__closure__", None) or ():
        if isinstance(cell.cell_contents, functools._lru_cache_wrapper):
            return cell
    return None


@contextlib.contextmanager
def unbounded_sympy_cache() -> Iterator[None]:
    """sympy's expression caches (`sympy.core.cache.CACHE`) keep every entry for the block
    instead of the last `SYMPY_CACHE_SIZE` (1,000 by default).

    Fixes: torch.export and the exporter's decompositions rebuilding the same symbolic
    expressions again and again on a model with dynamic axes. Every fake tensor they create
    computes its sizes, strides and contiguity as sympy expressions (`AssocOp.__new__`: a `Mul`
    or `Add` built, flattened and its assumptions deduced); each layer of a decoder has the same
    shapes, so the expressions repeat, but there are more distinct ones than 1,000 and the
    least-recently-used cache evicts each before it comes back: on an 8-layer SmolLM2-shaped
    llama, 17,000 of `AssocOp.__new__`'s 84,000 calls were misses with the cache full.
    The export's entries are dropped on exit (the caches sympy had are put back, with what they
    held); `SYMPY_CACHE_SIZE=None` in the environment does the same for a whole process.
    """
    from sympy.core import cache as sympy_cache

    swapped: list[tuple[Callable[..., Any], Any, Any]] = []
    try:
        for cached in sympy_cache.CACHE:
            cell = _bounded_cache_cell(cached)
            if cell is None or cell.cell_contents.cache_info().maxsize is None:
                continue
            bounded = cell.cell_contents
            unbounded = functools.lru_cache(maxsize=None, typed=True)(bounded.__wrapped__)
            swapped.append((cached, cell, bounded))
            cell.cell_contents = unbounded
            cached.cache_info = unbounded.cache_info  # type: ignore[attr-defined]
            cached.cache_clear = unbounded.cache_clear  # type: ignore[attr-defined]
        yield
    finally:
        for cached, cell, bounded in swapped:
            cell.cell_contents = bounded
            cached.cache_info = bounded.cache_info  # type: ignore[attr-defined]
            cached.cache_clear = bounded.cache_clear  # type: ignore[attr-defined]


#: The collector's thresholds during an export (Python's defaults: 700, 10, 10).
EXPORT_GC_THRESHOLDS = (50_000, 50, 100)


@contextlib.contextmanager
def fewer_garbage_collections(thresholds: tuple[int, int, int] = EXPORT_GC_THRESHOLDS) -> Iterator[None]:
    """Python's cyclic garbage collector runs less often for the block (`gc.set_threshold`).

    Fixes: the collector's share of torch.export and the exporter's passes. They allocate
    millions of objects that stay alive to the end (graph nodes, fake tensors, symbolic
    expressions); at the default thresholds every 700 allocations start a young collection,
    every tenth of them a second-generation one, and each traverses the survivors again: on
    SmolLM2-135M (30 layers), about 3,000 young, 280 second-generation and 10 full collections
    during `torch.onnx.export`. With these thresholds there were 42 young ones and no other;
    refcounting frees the graphs' garbage as before and the peak RSS did not change (2.86 and
    2.88 GB). The caller's thresholds are put back on exit.
    """
    saved = gc.get_threshold()
    try:
        gc.set_threshold(*thresholds)
        yield
    finally:
        gc.set_threshold(*saved)


def _grad_mode_switch_traced_on_change(torch_function: Callable[..., Any]) -> Callable[..., Any]:
    set_grad_enabled = torch._C._set_grad_enabled

    @functools.wraps(torch_function)
    def handle(self: Any, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is set_grad_enabled and not kwargs and len(args) == 1 and args[0] == torch.is_grad_enabled():
            return None  # the mode it sets is the mode it is in: nothing to run, nothing to record
        return torch_function(self, func, types, args, kwargs)

    return handle


def _autocast_switch_traced_on_change(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def switch(self: Any, *args: Any) -> Any:
        # `prev` is the state on entry: read before __enter__ sets it, kept by it for __exit__.
        exiting = method.__name__ == "__exit__"
        previous = getattr(self, "prev", None) if exiting else torch.is_autocast_enabled(self.device)
        if self._enabled or previous:
            return method(self, *args)
        # Disabled inside disabled: the state changes nothing; torch function modes off, so
        # torch.export's pre-dispatch mode is not told of it and records no autocast node.
        with torch._C.DisableTorchFunction():
            return method(self, *args)

    return switch


@contextlib.contextmanager
def untraced_no_op_mode_switches() -> Iterator[None]:
    """`torch.no_grad()` / `torch.set_grad_enabled(mode)` when grad is already in that mode, and
    `torch.autocast(..., enabled=False)` when autocast is already off for the device, leave no
    node in torch.export's graph for the block.

    Fixes: time, not a failure. torch.export's pre-dispatch trace records every grad-mode and
    autocast switch of forward (`torch._C._set_grad_enabled`, `_enter_autocast` / `_exit_autocast`
    nodes), then splits the whole graph at each one and inlines the pieces again
    (`replace_set_grad_with_hop_pass`, `replace_autocast_with_hop_pass`), whether or not the switch
    changed anything. The export runs under `torch.no_grad()` without autocast, so a rotary
    embedding's `@torch.no_grad()` and `torch.autocast(device_type, enabled=False)` (llama and
    most decoders) change nothing, and those passes only split the whole graph at them and inline
    it back: on SmolLM2-135M (about 3,300 nodes), 1.6 s, 0.2 s with this. A switch that changes
    the mode (an `enable_grad` in forward, autocast turned on) is recorded as before. torch.export's
    `PreDispatchTorchFunctionMode.__torch_function__` and `torch.autocast`'s `__enter__` /
    `__exit__` are put back on exit.
    """
    from torch.fx.experimental.proxy_tensor import PreDispatchTorchFunctionMode

    autocast = torch.amp.autocast_mode.autocast
    mode = PreDispatchTorchFunctionMode
    saved = [(mode, "__torch_function__", vars(mode)["__torch_function__"])]
    saved += [(autocast, name, vars(autocast)[name]) for name in ("__enter__", "__exit__")]
    try:
        mode.__torch_function__ = _grad_mode_switch_traced_on_change(saved[0][2])
        for _, name, method in saved[1:]:
            setattr(autocast, name, _autocast_switch_traced_on_change(method))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def uncached_fake_tensor_dispatch() -> Iterator[None]:
    """Fake tensors created in the block dispatch without torch's fake-tensor dispatch cache
    (`torch._dynamo.config.fake_tensor_cache_enabled` off: torch.export's trace, the
    decompositions' retrace and torch.onnx's type promotion all use the fake mode torch.export
    creates).

    Fixes: time, not a failure. The cache stores each operator's output metadata and, on a hit,
    builds the output fake tensor again from it (`empty_strided` with symbolic sizes and strides,
    then `set_` for views); a miss dispatches, then builds the entry and checks it the same way.
    With dynamic axes that rebuild computes the same symbolic sizes, strides and contiguity the
    operator's meta kernel does, so a trace pays for both. On SmolLM2-135M (two runs each, one
    thread): torch.export 12.3-13.1 s with the cache, 8.9 s without (8,600 hits, 5,000
    misses); the decompositions' retrace 18.4-19.6 s with, 18.9-19.4 s without; type promotion
    0.6 s with, 1.6 s without (it hits the retrace's entries). The cache on for the retrace only
    was slower (22.9 s: its entries cold). About 2 s in all. The ONNX graph is the same
    (operators, attributes, connections, weights; on a 4-layer SmolLM2-shaped llama): only some
    intermediate values are named otherwise, as torch numbers its symbolic-size nodes in the
    order it creates them. The setting is put back on exit.
    """
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        yield


def no_op_rule_constants() -> list[Any]:
    """The constant patterns (the 0 of `x + 0`, the 1 of `x * 1`...) of onnxscript's no-op
    rewrite rules, the ones :func:`exact_no_op_constants` makes exact. onnxscript is imported
    here, at export time, not when this module is."""
    from onnxscript.rewriter._pattern_ir import Constant
    from onnxscript.rewriter.rules.common import _no_op

    return [
        pattern
        for rule in _no_op.rules.rules
        for node in rule._target_pattern._nodes
        for pattern in node.inputs
        if isinstance(pattern, Constant)
    ]


@contextlib.contextmanager
def exact_no_op_constants() -> Iterator[None]:
    """onnxscript's no-op rewrites (`x + 0`, `x - 0`, `x * 1`, `x / 1` -> `x`) match only an
    exact 0 or 1 for the block.

    Fixes: NaN logits from Helium (`rms_norm_eps=1e-8`) after `torch.onnx.export(optimize=True)`:
    the rules compare their constant with `math.isclose(..., abs_tol=1e-8)`, so the RMSNorm's
    `variance + 1e-8` is rewritten to `variance`, and a zero hidden vector (the pad token's
    embedding, present in every padded batch) gives `0 * rsqrt(0) = NaN`. The rules' own
    tolerances are put back on exit.
    """
    saved = [(pattern, pattern._rel_tol, pattern._abs_tol) for pattern in no_op_rule_constants()]
    try:
        for pattern, _, _ in saved:
            pattern._rel_tol = pattern._abs_tol = 0.0
        yield
    finally:
        for pattern, rel_tol, abs_tol in saved:
            pattern._rel_tol, pattern._abs_tol = rel_tol, abs_tol


def _split_to_sequence_with_known_split(split_to_sequence: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(split_to_sequence)
    def evaluate(node: Any, op: Any, state: Any) -> Any:
        from onnxscript.optimizer._constant_folding import _get_numpy_value

        split = node.inputs[1] if len(node.inputs) > 1 else None
        scalar = split is not None and split.shape is not None and split.shape.rank() == 0
        if scalar and _get_numpy_value(split) is None:
            return None  # a scalar split of unknown value: leave the node as it is
        return split_to_sequence(node, op, state)

    return evaluate


@contextlib.contextmanager
def split_to_sequence_folding_guard() -> Iterator[None]:
    """onnxscript's constant folding leaves a `SplitToSequence` alone when its split is a scalar of
    unknown value, for the block.

    Fixes: `AttributeError: 'NoneType' object has no attribute 'ndim'` ("Error during constant
    folding for node ... (::SplitToSequence)") in `torch.onnx.export(optimize=True)` of
    `x.chunk(k, dim)` on a dynamic axis (prophetnet's n-gram streams): onnxscript 0.7.2's
    `_constant_folding.split_to_sequence` reads `split_value.ndim` when the split's shape is a
    known scalar and its value is not. The registered evaluator is put back on exit.
    """
    from onnxscript.optimizer import _constant_folding

    evaluators = _constant_folding.registry.op_evaluators.get(("", "SplitToSequence"), [])
    saved = list(evaluators)
    try:
        evaluators[:] = [
            dataclasses.replace(e, function=_split_to_sequence_with_known_split(e.function))
            if e.function is _constant_folding.split_to_sequence
            else e
            for e in evaluators
        ]
        yield
    finally:
        evaluators[:] = saved


def _number_operands_as_tensors(find_compatible_op_overload: Callable[..., Any]) -> Callable[..., Any]:
    """torch.onnx's type-promotion pass looks up the overload of a node it re-runs with promoted
    arguments by checking the schema; a Python number where the schema wants a Tensor (what
    `1.0 - int_tensor` decomposes to: `aten.sub.Tensor(1.0, x)`, which the dispatcher runs as a
    wrapped number) matches no overload. This retries the lookup with numbers given as tensors:
    the node keeps its arguments and gets the overload it already had."""

    @functools.wraps(find_compatible_op_overload)
    def lookup(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return find_compatible_op_overload(op, args, kwargs)
        except RuntimeError:
            numbers = [isinstance(a, (int, float)) and not isinstance(a, bool) for a in args]
            if not any(numbers):
                raise
            as_tensors = tuple(torch.tensor(a) if number else a for a, number in zip(args, numbers))
            return find_compatible_op_overload(op, as_tensors, kwargs)

    return lookup


def _first_output_node_checked_first(match: Callable[..., Any]) -> Callable[..., Any]:
    """onnxscript's matcher of a pattern with several output nodes (`SlicesSplit`: two `Slice`s
    of one input become a `Split`) groups every node of the graph by operator before it tries the
    combinations that start with `node`, and it does so for every node of the graph: quadratic in
    the graph's size, whatever the node. Every combination starts by matching the pattern's first
    output node against `node` itself (operator, domain, attributes), so when that local check
    fails no combination can match: this fails at once, before the grouping. Nodes that pass it
    go to onnxscript's own search unchanged."""

    @functools.wraps(match)
    def checked(self: Any, model: Any, graph_or_function: Any, node: Any, **kwargs: Any) -> Any:
        from onnxscript.rewriter._basics import MatchResult

        pattern = self.pattern
        if not pattern.has_single_output_node:
            local = pattern.output_nodes[0].matches(node, MatchResult())
            if not local:
                return local
        return match(self, model, graph_or_function, node, **kwargs)

    return checked


def _root_operator_checked_first(try_rewrite: Callable[..., Any]) -> Callable[..., Any]:
    """onnxscript's rewriter tries every rule on every node (`RewriteRuleSet` loops over the
    graph's nodes, and for each over its rules), and each try goes through the rule's `match`,
    the matcher's `match`, a fresh match state and the output node's local check before it
    compares the node's operator with the pattern's, which fails for almost every pair. With
    onnxscript's own matcher (`SimplePatternMatcher`) that comparison decides first (the output
    node of a one-output pattern, the first output node of a multi-output one, is matched against
    `node` before anything else), so a node of another operator returns the same None at once.
    Tries with a tracer or verbose output, and rules with another matcher, run as before."""

    @functools.wraps(try_rewrite)
    def tried(
        self: Any, model: Any, graph_or_function: Any, node: Any, *, verbose: Any = None, tracer: Any = None
    ) -> Any:
        from onnxscript.rewriter._matcher import SimplePatternMatcher

        roots = self._target_pattern.output_nodes
        if (
            roots
            and tracer is None
            and not verbose
            and not self._verbose
            and type(self._matcher) is SimplePatternMatcher
            and not roots[0].op.matches(node.op_type)
        ):
            return None
        return try_rewrite(self, model, graph_or_function, node, verbose=verbose, tracer=tracer)

    return tried


def _nodes_without_a_rule_not_rerun(run_node: Callable[..., Any]) -> Callable[..., Any]:
    """torch.onnx's type-promotion pass (`InsertTypePromotion`, after the decompositions) runs
    every node of the decomposed graph again on fake tensors, to have its inputs' dtypes when it
    reaches a node a promotion rule applies to. A node no rule applies to is never changed by the
    pass, and what running it gives is the fake value the decompositions' trace recorded for it
    (`node.meta["val"]`, of the same fake mode, which the pass itself writes for every node it
    creates or changes): this returns that value instead of tracing the node once more. Nodes
    with a rule, and nodes without a recorded value, run as before."""

    @functools.wraps(run_node)
    def run(self: Any, node: Any) -> Any:
        from torch.onnx._internal.fx.passes.type_promotion import get_type_promotion_rule

        if (
            node.op == "call_function"
            and "val" in node.meta
            and get_type_promotion_rule(node, self.type_promotion_table) is None
        ):
            return node.meta["val"]
        return run_node(self, node)

    return run


PATCHES = (
    Patch(
        name="type_promotion_number_operands",
        target="torch.onnx._internal.fx.passes.type_promotion:find_compatible_op_overload",
        wrap=_number_operands_as_tensors,
        fixes="Cannot find a compatible OpOverload for aten.sub with the provided arguments (torch "
        "2.13's type promotion re-runs `1.0 - int_tensor`, decomposed to aten.sub.Tensor(1.0, x), "
        "and finds no overload for the number; pytorch/pytorch#194381: xlnet, prophetnet)",
        everywhere=True,
    ),
    Patch(
        name="multi_output_pattern_first_node",
        target="onnxscript.rewriter._matcher:SimplePatternMatcher.match",
        wrap=_first_output_node_checked_first,
        fixes="torch.onnx.export(optimize=True) spending minutes in onnxscript's rewriter on a "
        "large graph (SmolLM2-135M: about 5,400 nodes, 2 x 5,400 full scans of the graph for the "
        "two-output SlicesSplit rule, one per node, in onnxscript 0.7.2's "
        "SimplePatternMatcher.match): a node that cannot be the pattern's first output fails "
        "before the scan; the rewrites made are the same",
        everywhere=True,
    ),
    Patch(
        name="rewrite_rule_root_operator_first",
        target="onnxscript.rewriter._rewrite_rule:RewriteRule.try_rewrite",
        wrap=_root_operator_checked_first,
        fixes="time, not a failure: torch.onnx.export(optimize=True) trying each of onnxscript's "
        "rewrite rules on every node through the whole matcher (SmolLM2-135M: 490,000 tries in "
        "onnxscript 0.7.2's two rewrite passes, nearly all failing on the operator; 4.1 s, 2.2 s with the "
        "patch): a node whose operator is not the pattern's root operator fails at once; the "
        "rewrites made and the file are the same",
        everywhere=True,
    ),
    Patch(
        name="type_promotion_recorded_values",
        target="torch.onnx._internal.fx.passes.type_promotion:_TypePromotionInterpreter.run_node",
        wrap=_nodes_without_a_rule_not_rerun,
        fixes="torch.onnx.export re-tracing the whole decomposed graph on fake tensors in its "
        "type-promotion pass (torch 2.13's InsertTypePromotion runs every node again: on SmolLM2-135M "
        "4.4 s, 0.7 to 0.8 s with the patch): a node no promotion rule applies to gets the "
        "value the decompositions recorded for it; the promotions made and the file are the same",
        everywhere=True,
    ),
)
