"""Cache layout from the graph for `optimum.onnxruntime`'s decoders, as functions and as a patch.

optimum-onnx 0.1.0 sizes a decoder's cache from the config (see
:mod:`optimum_observer.portable_cache` for the lists it uses). The functions here read it from
the session instead: :func:`adapt_causal_lm` after `ORTModelForCausalLM.__init__`,
:func:`causal_lm_forward` as its forward, :func:`adapt_seq2seq_decoder` after
`ORTDecoderForSeq2Seq.__init__`. `legacy_shim`'s classes call them; the unchanged-code hook
(:mod:`legacy_shim._hook`) applies them to optimum's own classes when their modules are
imported (:func:`patch_modeling_decoder`, :func:`patch_modeling_seq2seq`), so that code which
imports `optimum.onnxruntime` directly gets the same behaviour.

Where upstream's config-derived values are right, the graph's static sizes are the same
numbers: legacy exports of the types optimum-onnx supports generate exactly as before.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from . import state_runtime
from .runtime_fixes import cache_dims_from_session

#: Set on an adapted instance (idempotence: legacy_shim's classes adapt after upstream's
#: patched `__init__` may already have).
_ADAPTED = "_optimum_observer_cache_adapted"
#: Set on a patched function, holding the original.
_PATCHED = "__optimum_observer_original__"


def adapt_causal_lm(model: Any, init_error: AttributeError | None = None) -> None:
    """Sizes `model`'s (an `ORTModelForCausalLM`) cache from its session.

    Args:
        init_error: the AttributeError upstream's `__init__` raised at its last step, where it
            sizes the empty cache from config attributes some configs lack
            (`num_attention_heads`: mamba; `hidden_size`: got_ocr2). Re-raised unless the
            graph declares cache inputs to feed by name instead.
    """
    if getattr(model, _ADAPTED, False):
        return
    if init_error is not None and not (
        hasattr(model, "old_gpt_bigcode_modeling") and state_runtime.cache_input_names(model.input_names)
    ):
        raise init_error
    dims = cache_dims_from_session(model.output_shapes, model.key_value_output_names)
    # Keys and values of different head sizes: upstream feeds them only for deepseek_v3.
    split_heads = dims is not None and dims.key_head_size != dims.value_head_size
    model.cache_fed_by_name = (
        init_error is not None
        or state_runtime.has_state_inputs(model.input_names)
        or (split_heads and model.config.model_type != "deepseek_v3")
    )
    setattr(model, _ADAPTED, True)
    if model.cache_fed_by_name:
        model.key_value_input_names = state_runtime.cache_input_names(model.input_names)
        model.key_value_output_names = [state_runtime.present_name(n) for n in model.key_value_input_names]
        model.can_use_cache = True
        return
    if dims is None or model.old_bloom_modeling or model.old_gpt_bigcode_modeling:
        return
    model.num_key_value_heads = dims.num_heads
    if model.config.model_type == "deepseek_v3":
        # upstream keeps separate key and value head sizes for this type only
        model.qk_head_dim, model.v_head_dim = dims.key_head_size, dims.value_head_size
    else:
        model.embed_size_per_head = dims.key_head_size


def causal_lm_forward(model: Any, upstream_forward: Any, input_ids, attention_mask=None, past_key_values=None,
                      position_ids=None, use_cache=None, **kwargs: Any) -> Any:
    """`ORTModelForCausalLM.forward`: upstream's, or by name for caches upstream cannot feed."""
    if not getattr(model, "cache_fed_by_name", False):
        return upstream_forward(model, input_ids, attention_mask, past_key_values, position_ids, use_cache, **kwargs)
    return state_runtime.forward_by_name(model, input_ids, attention_mask, past_key_values, position_ids)


def adapt_seq2seq_decoder(decoder: Any, init_error: AttributeError | None = None) -> None:
    """Sizes an `ORTDecoderForSeq2Seq`'s cache (first step of a merged decoder, IO binding) from
    its session.

    Args:
        init_error: the AttributeError upstream's `__init__` raised at its last step, where it
            reads sizes from config attributes some configs lack (FSMT's decoder config has no
            `num_attention_heads`). Re-raised unless the graph says the sizes instead.
    """
    dims = cache_dims_from_session(decoder.output_shapes, decoder.key_value_output_names)
    if init_error is not None:
        vocab = decoder.output_shapes.get("logits", [None])[-1]
        if dims is None or not hasattr(decoder, "is_merged") or not isinstance(vocab, int):
            raise init_error
        decoder.vocab_size = getattr(decoder, "vocab_size", vocab)
    if dims is not None and dims.key_head_size == dims.value_head_size:
        decoder.num_attention_heads = dims.num_heads
        decoder.embed_size_per_head = dims.key_head_size


def patch_modeling_decoder(module: ModuleType) -> None:
    """Applies :func:`adapt_causal_lm` and :func:`causal_lm_forward` to
    `module.ORTModelForCausalLM` (optimum.onnxruntime.modeling_decoder), once."""
    cls = module.ORTModelForCausalLM
    if hasattr(cls.__init__, _PATCHED):
        return
    init, forward = cls.__init__, cls.forward

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except AttributeError as error:
            adapt_causal_lm(self, error)
        else:
            adapt_causal_lm(self)

    @functools.wraps(forward)
    def patched_forward(self, *args: Any, **kwargs: Any) -> Any:
        return causal_lm_forward(self, forward, *args, **kwargs)

    setattr(__init__, _PATCHED, init)
    setattr(patched_forward, _PATCHED, forward)
    cls.__init__, cls.forward = __init__, patched_forward


def patch_modeling_seq2seq(module: ModuleType) -> None:
    """Applies :func:`adapt_seq2seq_decoder` after `module.ORTDecoderForSeq2Seq.__init__`
    (optimum.onnxruntime.modeling_seq2seq), once."""
    cls = module.ORTDecoderForSeq2Seq
    if hasattr(cls.__init__, _PATCHED):
        return
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except AttributeError as error:
            adapt_seq2seq_decoder(self, error)
        else:
            adapt_seq2seq_decoder(self)

    setattr(__init__, _PATCHED, init)
    cls.__init__ = __init__


def unpatch(cls: type) -> None:
    """Restores what the patch functions replaced on `cls` (tests; the hook never unpatches)."""
    for name in ("__init__", "forward"):
        function = vars(cls).get(name)
        if function is not None and hasattr(function, _PATCHED):
            setattr(cls, name, getattr(function, _PATCHED))
