"""Example synthesis: one export-safe argument set built from the observations.

Takes: a :class:`~optimum_observer.capture.Capture` of one graph (under the cache registration).
Gives: an :class:`ExportExample`: example keyword arguments in which every dimension the
observations showed to vary is at least 2 and independent dimensions have distinct sizes, the
matching dynamic shapes with one symbol name per independent dimension, and one
:class:`LeafSpec` per flattened graph input, carrying its Optimum name.

Why: torch.export specialises any dimension whose example size is 0 or 1, and the observed calls
have exactly those: the prefill call of generate() has an empty cache, and every decode step a
sequence length of 1 ("export 0/1 specialized due to hint of 0/1").

Dimensions are grouped into symbols by their observed sizes: two dynamic axes whose sizes agree
on every observed call are one symbol, and an axis whose sizes are the sum of two symbols' sizes
is that sum (the attention mask's `past_sequence_length + sequence_length`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from typing import Any

import torch
import torch.utils._pytree as pytree

from .cache_pytree import relative_leaf_names
from .capture import Capture
from .errors import ObserverExportError, Stage

#: Symbol names for axes whose meaning Optimum's naming fixes, as (graph input name pattern,
#: axis, name); the first match wins. Axes of the same name are one dimension.
AXIS_NAMES: tuple[tuple[str, int, str], ...] = (
    ("input_ids", 0, "batch_size"),
    ("input_features", 0, "batch_size"),
    ("pixel_values", 0, "batch_size"),
    ("image_grid_thw", 0, "num_images"),
    ("input_values", 0, "batch_size"),
    ("inputs_embeds", 0, "batch_size"),
    ("inputs_embeds", 1, "sequence_length"),
    ("input_values", 1, "sequence_length"),
    ("input_ids", 1, "sequence_length"),
    ("past_key_values.*.encoder.*", 2, "encoder_sequence_length"),
    ("past_key_values.*", 2, "past_sequence_length"),
    ("encoder_hidden_states", 1, "encoder_sequence_length"),
    ("encoder_attention_mask", 1, "encoder_sequence_length"),
)
_SIZES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One flattened tensor of one contract input: one ONNX graph input."""

    input_name: str
    index: int
    onnx_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dims: dict[int, str]
    #: the largest size of each axis over the observed calls (empty: unknown).
    largest: tuple[int, ...] = ()


@dataclasses.dataclass
class ExportExample:
    kwargs: dict[str, Any]
    dynamic_shapes: dict[str, Any]
    leaves: list[LeafSpec]
    sizes: dict[str, int]


@dataclasses.dataclass(eq=False)  # symbols are compared and hashed by identity
class _Symbol:
    name: str | None
    observed: list[int | None]
    parts: tuple[str, str] | None = None


def _compatible(a: list[int | None], b: list[int | None]) -> bool:
    shared = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return bool(shared) and all(x == y for x, y in shared)


def _merge(a: list[int | None], b: list[int | None]) -> list[int | None]:
    return [x if x is not None else y for x, y in zip(a, b)]


def _reconcile_error(model_type: str, reason: str) -> ObserverExportError:
    return ObserverExportError(
        model_type,
        Stage.SYNTHESIS,
        f"the observed calls cannot be reconciled into one graph signature: {reason}",
        "make every call of the `run` callable pass the same set of inputs with the same nesting "
        "(for example always a cache of every layer after the first step).",
    )


_Flat = dict[str, tuple[list[torch.Tensor], pytree.TreeSpec]]
_Axis = tuple[str, int, int]  # (contract input, leaf index, axis)


def known_axis_name(onnx_name: str, axis: int) -> str | None:
    return next((n for pattern, a, n in AXIS_NAMES if a == axis and fnmatch.fnmatchcase(onnx_name, pattern)), None)


def onnx_leaf_names(name: str, spec: pytree.TreeSpec, count: int) -> list[str]:
    """Optimum names of the flattened tensors of input `name`: the name itself for a tensor,
    `{name}.{layer}.{suffix}` for a registered cache."""
    if spec.is_leaf():
        return [name]
    return [f"{name}.{leaf}" for leaf in relative_leaf_names(spec.type, spec.context, count)]


def synthesize(capture: Capture, model_type: str) -> ExportExample:
    flat = [{name: pytree.tree_flatten(value) for name, value in call.inputs.items()} for call in capture.calls]
    names = [name for name in capture.graph.input_names if any(name in call for call in flat)]
    templates = _templates(flat, names, model_type)
    try:
        observed_dynamic = capture.observer.infer_dynamic_shapes(set_batch_dimension_for=True)
    except (RuntimeError, NotImplementedError, ValueError) as error:
        raise _reconcile_error(model_type, str(error)) from error
    _unmark_constant_leading_axes(observed_dynamic, flat, templates)
    for name, axis in capture.graph.dynamic_axes:
        if name in templates and templates[name][1].is_leaf():
            observed_dynamic[name] = {**(observed_dynamic.get(name) or {}), axis: "declared by the contract"}
    axis_symbol = _group_axes(flat, templates, observed_dynamic, model_type)
    symbols = list(dict.fromkeys(axis_symbol.values()))
    sizes = _size_symbols(symbols, axis_symbol, model_type)
    if capture.graph.observed_example and (index := _export_safe_call(flat, templates, symbols)) is not None:
        sizes = {s.name: s.observed[index] for s in symbols}
        return _build_example(flat, templates, axis_symbol, sizes, source=flat[index])
    return _build_example(flat, templates, axis_symbol, sizes)


def _export_safe_call(flat: list[_Flat], templates: _Flat, symbols: list[_Symbol]) -> int | None:
    """The first observed call that has every input and gives every independent symbol a
    distinct size >= 2 (what a synthesized example guarantees), or None."""
    for index, call in enumerate(flat):
        seen = [s.observed[index] for s in symbols if s.parts is None]
        if all(name in call for name in templates) and all(size is not None and size >= 2 for size in seen):
            if len(set(seen)) == len(seen):
                return index
    return None


def _unmark_constant_leading_axes(observed_dynamic: dict[str, Any], flat: list[_Flat], templates: _Flat) -> None:
    """`set_batch_dimension_for=True` marks axis 0 of every input dynamic, for runs whose batch
    never varied. Where the run did vary a leading axis, one that kept a single size of 2 or more
    on every call is not the batch (qwen2_vl's position_ids [4, batch, sequence]): left static."""
    constant = []
    varied = False
    for name, (template_leaves, _) in templates.items():
        for index, leaf in enumerate(template_leaves):
            if leaf.ndim == 0:
                continue
            sizes = {call[name][0][index].shape[0] for call in flat if name in call}
            varied |= len(sizes) > 1
            if len(sizes) == 1 and min(sizes) >= 2:
                constant.append((name, index))
    if not varied:
        return
    for name, index in constant:
        per_leaf = observed_dynamic.get(name)
        if isinstance(per_leaf, dict) and index == 0:
            per_leaf.pop(0, None)
        elif isinstance(per_leaf, (list, tuple)) and index < len(per_leaf) and isinstance(per_leaf[index], dict):
            per_leaf[index].pop(0, None)


def _templates(flat: list[_Flat], names: list[str], model_type: str) -> _Flat:
    """The leaves and structure of each input, from a call that had it (all must agree)."""
    templates: _Flat = {}
    for name in names:
        counts = {len(call[name][0]) for call in flat if name in call}
        if len(counts) != 1:
            raise _reconcile_error(model_type, f"{name!r} was seen with {sorted(counts)} tensors")
        templates[name] = next(call[name] for call in flat if name in call)
    return templates


def _group_axes(
    flat: list[_Flat], templates: _Flat, observed_dynamic: dict[str, Any], model_type: str
) -> dict[_Axis, _Symbol]:
    """One symbol per set of dynamic axes whose observed sizes agree on every call."""
    symbols: list[_Symbol] = []
    axis_symbol: dict[_Axis, _Symbol] = {}
    for name, (template_leaves, spec) in templates.items():
        per_leaf = observed_dynamic.get(name) or {}
        per_leaf = per_leaf if isinstance(per_leaf, (list, tuple)) else [per_leaf]
        onnx_names = onnx_leaf_names(name, spec, len(template_leaves))
        for index, leaf in enumerate(template_leaves):
            shapes = [call[name][0][index].shape if name in call else None for call in flat]
            if any(shape is not None and len(shape) != leaf.ndim for shape in shapes):
                raise _reconcile_error(model_type, f"{name!r} was seen with different ranks")
            axes = per_leaf[index] if index < len(per_leaf) and per_leaf[index] else {}
            for axis in sorted(axes):
                observed = [None if shape is None else shape[axis] for shape in shapes]
                known = known_axis_name(onnx_names[index], axis)
                symbol = next(
                    (
                        s
                        for s in symbols
                        if (known is not None and s.name == known)
                        or (known is None or s.name is None) and _compatible(s.observed, observed)
                    ),
                    None,
                )
                if symbol is None:
                    symbol = _Symbol(name=known, observed=observed)
                    symbols.append(symbol)
                else:
                    symbol.observed = _merge(symbol.observed, observed)
                    symbol.name = symbol.name or known
                axis_symbol[(name, index, axis)] = symbol
    return axis_symbol


def _size_symbols(symbols: list[_Symbol], axis_symbol: dict[_Axis, _Symbol], model_type: str) -> dict[str, int]:
    """Names every symbol and gives independent ones distinct sizes >= 2, sums their sum."""
    _find_sums(symbols)
    for symbol in symbols:
        if symbol.name is None and symbol.parts is None:
            name, _, axis = next(k for k, v in axis_symbol.items() if v is symbol)
            symbol.name = f"{name}_dim_{axis}"
    independent = [s for s in symbols if s.parts is None]
    sizes: dict[str, int] = {}
    small = iter(_SIZES)
    for symbol in independent:
        seen = [size for size in symbol.observed if size is not None]
        if seen and min(seen) > _SIZES[-1]:
            # Only ever seen large (a waveform's samples): the model derives sizes from it that a
            # small example would break (wav2vec2's convolutions need 400 samples: torch.export
            # fails with "3 not in VR[10, int_oo]"). Its smallest observation is a valid size.
            size = min(seen)
            while size in sizes.values():
                size += 1
            sizes[symbol.name] = size
        elif (size := next(small, None)) is not None:
            sizes[symbol.name] = size
        else:
            raise _reconcile_error(model_type, f"{len(independent)} independent dynamic dimensions")
    for symbol in symbols:
        if symbol.parts is not None:
            symbol.name = " + ".join(symbol.parts)
            sizes[symbol.name] = sum(sizes[p] for p in symbol.parts)
    return sizes


def _build_example(
    flat: list[_Flat],
    templates: _Flat,
    axis_symbol: dict[_Axis, _Symbol],
    sizes: dict[str, int],
    source: _Flat | None = None,
) -> ExportExample:
    """The example: tensors of the symbols' sizes, or the tensors of the observed call `source`."""
    kwargs: dict[str, Any] = {}
    dynamic_shapes: dict[str, Any] = {}
    leaves: list[LeafSpec] = []
    generator = torch.Generator().manual_seed(0)
    for name, (template_leaves, spec) in templates.items():
        new_leaves, leaf_shapes = [], []
        onnx_names = onnx_leaf_names(name, spec, len(template_leaves))
        for index, leaf in enumerate(template_leaves):
            dims = {axis: s.name for (n, i, axis), s in axis_symbol.items() if n == name and i == index}
            shape = tuple(sizes[dims[a]] if a in dims else leaf.shape[a] for a in range(leaf.ndim))
            observed_values = [call[name][0][index] for call in flat if name in call]
            if source is not None:
                new_leaves.append(source[name][0][index])
            else:
                new_leaves.append(_example_tensor(name, shape, observed_values, sizes, generator))
            leaf_shapes.append(dims)
            largest = tuple(max(t.shape[a] for t in observed_values) for a in range(leaf.ndim))
            leaves.append(LeafSpec(name, index, onnx_names[index], leaf.dtype, tuple(leaf.shape), dims, largest))
        if spec.is_leaf():
            kwargs[name] = new_leaves[0]
            dynamic_shapes[name] = leaf_shapes[0]
        else:
            kwargs[name] = pytree.tree_unflatten(new_leaves, spec)
            dynamic_shapes[name] = leaf_shapes
    return ExportExample(kwargs=kwargs, dynamic_shapes=dynamic_shapes, leaves=leaves, sizes=sizes)


def _find_sums(symbols: list[_Symbol]) -> None:
    for symbol in symbols:
        if symbol.name is not None:
            continue
        for a, b in itertools.combinations([s for s in symbols if s is not symbol and s.parts is None], 2):
            triples = [
                (x, y, z)
                for x, y, z in zip(symbol.observed, a.observed, b.observed)
                if x is not None and y is not None and z is not None
            ]
            if len(triples) >= 2 and all(x == y + z for x, y, z in triples):
                # Order the parts as the symbols were first seen: past before new tokens when the
                # cache axis was named first, as Optimum writes it.
                first, second = sorted((a, b), key=lambda s: _NAME_ORDER.get(s.name, 99))
                symbol.parts = (first.name, second.name)
                break


_NAME_ORDER = {"past_sequence_length": 0, "sequence_length": 1}


def _example_tensor(
    name: str,
    shape: tuple[int, ...],
    observed: list[torch.Tensor],
    sizes: dict[str, int],
    generator: torch.Generator,
) -> torch.Tensor:
    dtype = observed[0].dtype
    if name == "attention_mask" or dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    if name == "position_ids":
        offset = sizes.get("past_sequence_length", 0)
        positions = torch.arange(offset, offset + shape[-1], dtype=dtype)
        return positions.expand(shape).contiguous()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    low = min(int(t.min()) for t in observed if t.numel())
    high = max(int(t.max()) for t in observed if t.numel())
    return torch.randint(low, high + 1, shape, generator=generator, dtype=dtype)
