"""Scoped pytree registration of transformers cache classes, one codec per cache kind.

Takes: nothing. Gives: a context manager, :func:`registered_caches`, inside which
`DynamicCache` flattens to `[layer0.keys, layer0.values, layer1.keys, ...]` (initialised layers
only, keys and values interleaved per layer, the order of Optimum's `past_key_values.{i}.key` /
`.value` names), and `EncoderDecoderCache` to `[layer0.self.keys, layer0.self.values,
layer0.cross.keys, layer0.cross.values, layer1...]` (Optimum's `past_key_values.{i}.decoder.key`,
`.decoder.value`, `.encoder.key`, `.encoder.value`), and the state-space caches (`MambaCache`,
`FalconMambaCache`, `Mamba2Cache`) to `[layer0.conv_state, layer0.ssm_state, layer1...]`
(`past_key_values.{i}.conv_state`, `.ssm_state`: fixed-size states, only the batch varies), so
`torch.onnx.InputObserver` can record them and `torch.export` can take them; and the Optimum
names of those leaves (:func:`cache_leaf_names`, :func:`relative_leaf_names`).

Each kind of cache is one :class:`CacheCodec` (flatten, unflatten, the names of one layer's
leaves); :data:`CACHE_CODECS` maps each cache class, named as a `"module:Class"` target, to its
codec. A target is resolved when :func:`registered_caches` is entered, and only if its module is
already imported: a cache object exists only once its class's module has been imported (by the
model that builds it), so the others cannot reach the block, and resolving them would import a
dozen state-space model packages into every export. Importing this module imports no
`transformers.models` package either, and a class this transformers version lacks is skipped with
a debug log, never an import error.

Why: transformers 4.56+ no longer registers `DynamicCache` at import, and torch 2.13's observer
then fails at the first `generate` call with `'DynamicCache' object has no attribute 'clone'`.
transformers' own `register_dynamic_cache_export_support()` registers globally, forever, with
all keys before all values; this module registers for one block and restores whatever
registration (or absence of one) was there before, even when the block raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

logger = logging.getLogger(__name__)

_KEY_VALUE = ("key", "value")
STATE_LEAF_SUFFIXES = ("conv_state", "ssm_state")


@dataclasses.dataclass(frozen=True)
class CacheCodec:
    """How one kind of cache becomes pytree leaves, in Optimum's order, and back."""

    #: cache -> (leaves, context): the context is the structure without the tensors.
    flatten: Callable[[Any], tuple[list[torch.Tensor], Any]]
    #: (leaves, context) -> the cache.
    unflatten: Callable[[Iterable[torch.Tensor], Any], Any]
    #: The Optimum name suffix of each leaf of one layer, in flattened order; None where layers
    #: hold different tensors and the context's second item lists each layer's suffixes.
    leaf_suffixes: tuple[str, ...] | None
    #: Where `leaf_suffixes` is None: each layer's suffixes, read from the context.
    layers_of: Callable[[Any], tuple[tuple[str, ...], ...] | None] = lambda context: context[1]

    def flatten_with_keys(self, cache: Any) -> tuple[list[tuple[pytree.KeyEntry, torch.Tensor]], Any]:
        leaves, context = self.flatten(cache)
        return [(pytree.SequenceKey(i), leaf) for i, leaf in enumerate(leaves)], context

    def flatten_spec(self, cache: Any, spec: pytree.TreeSpec) -> list[torch.Tensor]:
        return self.flatten(cache)[0]

    def relative_leaf_names(self, context: Any, count: int) -> list[str]:
        """`{layer}.{suffix}` of each of the `count` leaves flattened with `context`."""
        if self.leaf_suffixes is None:
            layers = self.layers_of(context) or ()
            return [f"{layer}.{suffix}" for layer, suffixes in enumerate(layers) for suffix in suffixes]
        return [leaf_name("", index, self.leaf_suffixes)[1:] for index in range(count)]


def _linear_state_leaves(layer: Any) -> list[tuple[str, torch.Tensor]]:
    """(suffix, tensor) of each state a transformers-5 linear-attention layer holds once it has
    run a step: its convolution windows, then its recurrent (SSM) states, by state index."""
    leaves = []
    for kind, suffix in (("conv", "conv_state"), ("recurrent", "ssm_state")):
        for index, tensor in getattr(layer, f"{kind}_states").items():
            if getattr(layer, f"is_{kind}_states_initialized")[index] and layer.has_previous_state[index]:
                leaves.append((suffix if index == 0 else f"{suffix}_{index}", tensor))
    return leaves


def _layer_leaves(layer: Any) -> list[tuple[str, torch.Tensor]]:
    """(suffix, tensor) of what one `DynamicCache` layer holds: an initialised attention layer's
    keys and values, a linear-attention layer's states (transformers 5), both for a hybrid layer."""
    leaves = []
    if getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True):
        leaves.extend(zip(_KEY_VALUE, (layer.keys, layer.values)))
    if _is_linear_attention_layer(layer):
        leaves.extend(_linear_state_leaves(layer))
    return leaves


def _is_linear_attention_layer(layer: Any) -> bool:
    # transformers 5's LinearAttentionCacheLayerMixin (absent from 4.57): per-index state dicts.
    return isinstance(getattr(layer, "conv_states", None), dict)


def _flatten_dynamic_cache(cache: DynamicCache) -> tuple[list[torch.Tensor], Any]:
    per_layer = [_layer_leaves(layer) for layer in cache.layers]
    leaves = [tensor for layer in per_layer for _, tensor in layer]
    if not any(_is_linear_attention_layer(layer) for layer in cache.layers):
        # Keys and values only: the context is the number of filled layers.
        return leaves, len(leaves) // 2
    # transformers 5 keeps state-space and hybrid caches in a DynamicCache: per layer its class
    # and what it holds.
    layers = tuple((type(layer), tuple(suffix for suffix, _ in held)) for layer, held in zip(cache.layers, per_layer))
    return leaves, (DynamicCache, tuple(suffixes for _, suffixes in layers), tuple(cls for cls, _ in layers))


def _filled_linear_layer(cls: type, held: dict[str, torch.Tensor]) -> Any:
    """A linear-attention layer of class `cls` holding the given states, as after a step."""
    layer = cls()
    for suffix, tensor in held.items():
        kind, _, index = suffix.partition("_state")
        index = int(index[1:]) if index else 0
        kind = "recurrent" if kind == "ssm" else kind
        getattr(layer, f"{kind}_states")[index] = tensor
        getattr(layer, f"is_{kind}_states_initialized")[index] = True
        layer.has_previous_state[index] = True
        if kind == "conv":
            layer.conv_kernel_size[index] = tensor.shape[-1]
        layer.dtype, layer.device = tensor.dtype, tensor.device
    return layer


def _unflatten_dynamic_cache(leaves: Iterable[torch.Tensor], context: Any) -> DynamicCache:
    leaves = list(leaves)
    cache = DynamicCache()
    if isinstance(context, int):
        for layer_idx in range(context):
            cache.update(leaves[2 * layer_idx], leaves[2 * layer_idx + 1], layer_idx)
        return cache
    _, layers, classes = context
    position = iter(leaves)
    for layer_idx, (suffixes, cls) in enumerate(zip(layers, classes)):
        held = {suffix: next(position) for suffix in suffixes}
        states = {k: v for k, v in held.items() if k not in _KEY_VALUE}
        cache.layers.append(_filled_linear_layer(cls, states) if states else cls())
        if "key" in held:
            cache.update(held["key"], held["value"], layer_idx)
    return cache


DYNAMIC_CACHE = CacheCodec(
    _flatten_dynamic_cache,
    _unflatten_dynamic_cache,
    None,
    layers_of=lambda context: ((_KEY_VALUE,) * context) if isinstance(context, int) else context[1],
)


def _flatten_encoder_decoder_cache(cache: EncoderDecoderCache) -> tuple[list[torch.Tensor], int]:
    self_leaves, num_layers = _flatten_dynamic_cache(cache.self_attention_cache)
    cross_leaves, num_cross_layers = _flatten_dynamic_cache(cache.cross_attention_cache)
    if num_cross_layers != num_layers:
        # The first generate step before the cross-attention cache is filled: nothing to export.
        return [], 0
    leaves: list[torch.Tensor] = []
    for layer in range(num_layers):
        leaves.extend(self_leaves[2 * layer : 2 * layer + 2] + cross_leaves[2 * layer : 2 * layer + 2])
    return leaves, num_layers


def _unflatten_encoder_decoder_cache(leaves: Iterable[torch.Tensor], num_layers: int) -> EncoderDecoderCache:
    leaves = list(leaves)
    self_attention, cross_attention = DynamicCache(), DynamicCache()
    for layer in range(num_layers):
        self_attention.update(leaves[4 * layer], leaves[4 * layer + 1], layer)
        cross_attention.update(leaves[4 * layer + 2], leaves[4 * layer + 3], layer)
    # Built from filled caches, so the cross-attention layers count as computed (`is_updated`).
    return EncoderDecoderCache(self_attention, cross_attention)


ENCODER_DECODER_CACHE = CacheCodec(
    _flatten_encoder_decoder_cache,
    _unflatten_encoder_decoder_cache,
    ("decoder.key", "decoder.value", "encoder.key", "encoder.value"),
)

#: Not part of the context: the states, and the batch size, which differs between calls.
_STATE_FIELDS = ("conv_states", "ssm_states", "max_batch_size")


def _flatten_state_cache(cache: Any) -> tuple[list[torch.Tensor], tuple[Any, ...]]:
    # Per layer: its convolution window, then its SSM state. Mamba2Cache stacks the layers in
    # one tensor, the others keep a list; indexing reads both the same way.
    conv_states, ssm_states = cache.conv_states, cache.ssm_states
    leaves: list[torch.Tensor] = []
    for layer in range(len(conv_states)):
        leaves.extend((conv_states[layer], ssm_states[layer]))
    # Everything but the states themselves (sizes, dtype), so the cache is rebuilt as it was.
    attributes = tuple(sorted((k, v) for k, v in vars(cache).items() if k not in _STATE_FIELDS))
    return leaves, (type(cache), attributes)


def _unflatten_state_cache(leaves: Iterable[torch.Tensor], context: tuple[Any, ...]) -> Any:
    cls, attributes = context
    leaves = list(leaves)
    cache = cls.__new__(cls)
    vars(cache).update(dict(attributes))
    # Lists, whatever the original layout: the exported mixers assign each layer's new states.
    cache.conv_states, cache.ssm_states = leaves[0::2], leaves[1::2]
    cache.max_batch_size = leaves[0].shape[0]
    return cache


#: Caches of state-space models: per layer a convolution window and an SSM state of fixed size
#: (batch, ...).
STATE_CACHE = CacheCodec(_flatten_state_cache, _unflatten_state_cache, STATE_LEAF_SUFFIXES)


def _is_placeholder(tensor: torch.Tensor) -> bool:
    # Hybrid caches hold `torch.tensor([[]] * batch)` (batch, 0) or `torch.tensor([])` where a
    # layer has no such cache; real keys, values and states have 3 dimensions or more.
    return tensor.dim() < 3 and tensor.shape[-1] == 0


@dataclasses.dataclass(frozen=True)
class _HybridLayout:
    """Where a hybrid cache keeps each kind of per-layer tensor, and what each layer holds."""

    #: leaf suffix -> the cache attribute holding that tensor per layer (a list or a dict)
    fields: tuple[tuple[str, str], ...]
    #: the suffixes each layer holds, or None before the attention layers' first step
    layers: Callable[[Any], tuple[tuple[str, ...], ...] | None]
    #: what stands where a layer has no such tensor: an empty tensor, or None (qwen3_next)
    none_placeholder: bool = False

    def attribute(self, suffix: str) -> str:
        return dict(self.fields)[suffix]


def _mamba_hybrid_layers(cache: Any) -> tuple[tuple[str, ...], ...] | None:
    layers = []
    for index in range(len(cache.key_cache)):
        attention = index in cache.transformer_layers
        if attention and _is_placeholder(cache.key_cache[index]):
            return None
        states = not _is_placeholder(cache.conv_states[index])
        layers.append((_KEY_VALUE if attention else ()) + (STATE_LEAF_SUFFIXES if states else ()))
    return tuple(layers)


def _short_conv_hybrid_layers(cache: Any) -> tuple[tuple[str, ...], ...] | None:
    # LFM2: attention layers hold keys and values, the others one convolution window.
    attention = [kind == "full_attention" for kind in cache.layer_types]
    if len(cache.key_cache) <= max(i for i, a in enumerate(attention) if a) or any(
        a and _is_placeholder(cache.key_cache[i]) for i, a in enumerate(attention)
    ):
        return None
    return tuple(_KEY_VALUE if a else ("conv_state",) for a in attention)


def _gated_delta_hybrid_layers(cache: Any) -> tuple[tuple[str, ...], ...] | None:
    # Qwen3-Next: attention layers hold keys and values, linear-attention (gated delta rule)
    # layers a convolution window and a recurrent state; all None before the first step.
    layers = []
    for index, kind in enumerate(cache.layer_types):
        attention = kind == "full_attention"
        held = cache.key_cache[index] if attention else cache.conv_states[index]
        if held is None:
            return None
        layers.append(_KEY_VALUE if attention else ("conv_state", "recurrent_state"))
    return tuple(layers)


#: Per call, not per structure: flags and counters hybrid caches update as generation goes.
_PER_CALL = ("has_previous_state", "seqlen_offset")


def _flatten_hybrid_cache(layout: _HybridLayout, cache: Any) -> tuple[list[torch.Tensor], tuple[Any, ...]]:
    # Per layer, what it holds (keys and values if it attends, its states if it has them).
    # Before the first step the attention layers hold placeholders: like an empty DynamicCache,
    # such a cache has nothing to export (the runtime feeds a 0-length past and zero states).
    layers = layout.layers(cache)
    leaves = [
        getattr(cache, layout.attribute(suffix))[index]
        for index, suffixes in enumerate(layers or ())
        for suffix in suffixes
    ]
    fields = {attribute for _, attribute in layout.fields}
    kept = {k: v for k, v in vars(cache).items() if k not in fields and k not in _PER_CALL}
    attributes = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kept.items()))
    containers = tuple((attribute, type(getattr(cache, attribute))) for attribute in sorted(fields))
    return leaves, (type(cache), layers, containers, attributes)


def _unflatten_hybrid_cache(
    layout: _HybridLayout, leaves: Iterable[torch.Tensor], context: tuple[Any, ...]
) -> Any:
    cls, layers, containers, attributes = context
    leaves = list(leaves)
    cache = cls.__new__(cls)
    vars(cache).update({k: list(v) if isinstance(v, tuple) else v for k, v in attributes})
    if not isinstance(getattr(cls, "has_previous_state", None), property):
        cache.has_previous_state = True
    # Placeholders made from a graph input, not `torch.tensor(...)` constants inside the graph.
    placeholder = leaves[0].new_zeros((0,)) if leaves and not layout.none_placeholder else None
    per_layer = {attribute: [placeholder] * len(layers or ()) for _, attribute in layout.fields}
    position = iter(leaves)
    for index, suffixes in enumerate(layers or ()):
        for suffix in suffixes:
            per_layer[layout.attribute(suffix)][index] = next(position)
    for attribute, container in containers:
        tensors = per_layer[attribute]
        setattr(cache, attribute, tensors if container is list else dict(enumerate(tensors)))
    return cache


def _hybrid_codec(layout: _HybridLayout) -> CacheCodec:
    """Hybrid caches: attention layers' keys and values next to SSM or convolution layers'
    states, each layer holding placeholders for what it does not have."""
    flatten = functools.partial(_flatten_hybrid_cache, layout)
    return CacheCodec(flatten, functools.partial(_unflatten_hybrid_cache, layout), None)


MAMBA_HYBRID_CACHE = _hybrid_codec(
    _HybridLayout(
        fields=(
            ("key", "key_cache"), ("value", "value_cache"),
            ("conv_state", "conv_states"), ("ssm_state", "ssm_states"),
        ),  # fmt: skip
        layers=_mamba_hybrid_layers,
    )
)
SHORT_CONV_HYBRID_CACHE = _hybrid_codec(
    _HybridLayout(
        fields=(("key", "key_cache"), ("value", "value_cache"), ("conv_state", "conv_cache")),
        layers=_short_conv_hybrid_layers,
    )
)
GATED_DELTA_HYBRID_CACHE = _hybrid_codec(
    _HybridLayout(
        fields=(
            ("key", "key_cache"), ("value", "value_cache"),
            ("conv_state", "conv_states"), ("recurrent_state", "recurrent_states"),
        ),  # fmt: skip
        layers=_gated_delta_hybrid_layers,
        none_placeholder=True,
    )
)


def _linear_attention_layers(cache: Any) -> tuple[tuple[str, ...], ...]:
    # MiniMax: a DynamicCache whose linear-attention layers keep one state in `linear_cache`.
    layers = []
    for index in range(len(cache)):
        linear = index < len(cache.linear_cache) and isinstance(cache.linear_cache[index], torch.Tensor)
        attention = not linear and cache.layers[index].is_initialized
        layers.append(("recurrent_state",) if linear else _KEY_VALUE if attention else ())
    return tuple(layers)


def _flatten_linear_attention_cache(cache: Any) -> tuple[list[torch.Tensor], tuple[Any, ...]]:
    layers = _linear_attention_layers(cache)
    leaves: list[torch.Tensor] = []
    for index, suffixes in enumerate(layers):
        if suffixes == _KEY_VALUE:
            leaves.extend((cache.layers[index].keys, cache.layers[index].values))
        elif suffixes:
            leaves.append(cache.linear_cache[index])
    return leaves, (type(cache), layers)


def _unflatten_linear_attention_cache(leaves: Iterable[torch.Tensor], context: tuple[Any, ...]) -> Any:
    cls, layers = context
    cache, position = cls(), iter(list(leaves))
    for index, suffixes in enumerate(layers):
        if suffixes == _KEY_VALUE:
            cache.update(next(position), next(position), index)
        elif suffixes:
            cache.set_linear_cache(index, next(position))
    return cache


LINEAR_ATTENTION_CACHE = CacheCodec(_flatten_linear_attention_cache, _unflatten_linear_attention_cache, None)

#: Every cache class registered, as a "module:Class" target resolved on entering
#: :func:`registered_caches`, with its codec; in registration order.
CACHE_CODECS: dict[str, CacheCodec] = {
    "transformers.cache_utils:DynamicCache": DYNAMIC_CACHE,
    "transformers.cache_utils:EncoderDecoderCache": ENCODER_DECODER_CACHE,
    "transformers.models.mamba.modeling_mamba:MambaCache": STATE_CACHE,
    "transformers.models.falcon_mamba.modeling_falcon_mamba:FalconMambaCache": STATE_CACHE,
    "transformers.models.mamba2.modeling_mamba2:Mamba2Cache": STATE_CACHE,
    "transformers.models.bamba.modeling_bamba:HybridMambaAttentionDynamicCache": MAMBA_HYBRID_CACHE,
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid:HybridMambaAttentionDynamicCache": (
        MAMBA_HYBRID_CACHE
    ),
    "transformers.models.jamba.modeling_jamba:HybridMambaAttentionDynamicCache": MAMBA_HYBRID_CACHE,
    "transformers.models.falcon_h1.modeling_falcon_h1:FalconHybridMambaAttentionDynamicCache": (
        MAMBA_HYBRID_CACHE
    ),
    "transformers.models.zamba.modeling_zamba:ZambaHybridDynamicCache": MAMBA_HYBRID_CACHE,
    "transformers.models.zamba2.modeling_zamba2:Zamba2HybridDynamicCache": MAMBA_HYBRID_CACHE,
    "transformers.models.lfm2.modeling_lfm2:Lfm2HybridConvCache": SHORT_CONV_HYBRID_CACHE,
    "transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextDynamicCache": GATED_DELTA_HYBRID_CACHE,
    "transformers.models.minimax.modeling_minimax:MiniMaxCache": LINEAR_ATTENTION_CACHE,
}


def _resolve(target: str, imported_only: bool = False) -> type | None:
    module, _, name = target.partition(":")
    if imported_only and module not in sys.modules:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:  # an older or newer transformers without it
        logger.debug("cache class %s not registered: %s", target, error)
        return None


def _codecs(imported_only: bool = True) -> dict[type, CacheCodec]:
    """The cache classes this transformers has, each with its codec; with `imported_only`, those
    whose module is imported (the only ones of which an object can exist)."""
    resolved = ((_resolve(target, imported_only), codec) for target, codec in CACHE_CODECS.items())
    return {cls: codec for cls, codec in resolved if cls is not None}


@dataclasses.dataclass(frozen=True)
class _Saved:
    node: Any
    serialized: Any
    fx_spec: Any
    fx_exact: Any


def _save(cls: type) -> _Saved:
    return _Saved(
        node=pytree.SUPPORTED_NODES.get(cls),
        serialized=pytree.SUPPORTED_SERIALIZED_TYPES.get(cls),
        fx_spec=fx_pytree.SUPPORTED_NODES.get(cls),
        fx_exact=fx_pytree.SUPPORTED_NODES_EXACT_MATCH.get(cls, None),
    )


def _remove(cls: type) -> None:
    if cls in pytree.SUPPORTED_NODES:
        pytree._deregister_pytree_node(cls)
    if cls in fx_pytree.SUPPORTED_NODES:
        fx_pytree._deregister_pytree_flatten_spec(cls)


def _restore(cls: type, saved: _Saved) -> None:
    _remove(cls)
    if saved.node is not None:
        pytree.SUPPORTED_NODES[cls] = saved.node
    if saved.serialized is not None:
        pytree.SUPPORTED_SERIALIZED_TYPES[cls] = saved.serialized
        pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[saved.serialized.serialized_type_name] = cls
    if saved.fx_spec is not None:
        fx_pytree.SUPPORTED_NODES[cls] = saved.fx_spec
        fx_pytree.SUPPORTED_NODES_EXACT_MATCH[cls] = saved.fx_exact


def leaf_name(prefix: str, index: int, suffixes: tuple[str, ...] = _KEY_VALUE) -> str:
    """The Optimum name of flattened cache leaf `index`: `{prefix}.{layer}.{suffix}`, with
    `suffixes` the names of one layer's leaves (`key`, `value` for a `DynamicCache`)."""
    return f"{prefix}.{index // len(suffixes)}.{suffixes[index % len(suffixes)]}"


def relative_leaf_names(cls: type, context: Any, count: int) -> list[str]:
    """`{layer}.{suffix}` of each flattened leaf of a cache of type `cls` (with its pytree
    context): fixed suffixes per layer, or for a hybrid cache what each layer holds."""
    return _codecs().get(cls, DYNAMIC_CACHE).relative_leaf_names(context, count)


def is_legacy_key_value_cache(cache: Any) -> bool:
    """One (key, value) tuple of tensors per layer: the cache format the deprecated models of
    transformers 4.57 (open-llama, xlm-prophetnet) still return; its leaves are a `DynamicCache`'s,
    in the same order."""
    return (
        isinstance(cache, tuple)
        and len(cache) > 0
        and all(
            isinstance(layer, tuple) and len(layer) == 2 and all(isinstance(t, torch.Tensor) for t in layer)
            for layer in cache
        )
    )


def cache_leaf_names(prefix: str, cache: Any, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """The graph names of a cache object's flattened leaves (`suffixes` overrides the class's); a
    legacy cache of (key, value) tuples is named as the `DynamicCache` it stands for."""
    if is_legacy_key_value_cache(cache):
        return [leaf_name(prefix, index, suffixes or _KEY_VALUE) for index in range(2 * len(cache))]
    codec = _codecs()[type(cache)]
    leaves, context = codec.flatten(cache)
    if suffixes is not None:
        return [leaf_name(prefix, index, suffixes) for index in range(len(leaves))]
    return [f"{prefix}.{name}" for name in codec.relative_leaf_names(context, len(leaves))]


def is_registered(cls: type) -> bool:
    return cls in pytree.SUPPORTED_NODES


def registered_cache_classes(imported_only: bool = False) -> tuple[type, ...]:
    """The cache classes :func:`registered_caches` registers (every target resolved, importing its
    module; with `imported_only`, what the block registers in this process now)."""
    return tuple(_codecs(imported_only))


@contextlib.contextmanager
def registered_caches() -> Iterator[None]:
    """Registers the cache classes as pytree nodes for the duration of the block."""
    codecs = _codecs()
    saved = {cls: _save(cls) for cls in codecs}
    try:
        for cls, codec in codecs.items():
            _remove(cls)
            pytree._private_register_pytree_node(
                cls,
                codec.flatten,
                codec.unflatten,
                serialized_type_name=f"optimum_observer.{cls.__module__}.{cls.__qualname__}",
                flatten_with_keys_fn=codec.flatten_with_keys,
            )
            fx_pytree.register_pytree_flatten_spec(cls, codec.flatten_spec)
        yield
    finally:
        for cls, previous in saved.items():
            _restore(cls, previous)
