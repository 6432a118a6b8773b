"""The runtime classes: `optimum.onnxruntime` classes that load an export and generate with it.

Loading and generating only; exporting (`from_pretrained(..., export=True)` through the router) is
added on top by :mod:`legacy_shim.modeling`, whose classes users import. Validation of an observer
export (:mod:`legacy_shim.routes`) and the tooling load with these, so the export path never
imports the module that imports it back.

Each class subclasses its `optimum.onnxruntime` namesake and overrides the minimum:

- `from_pretrained`: a directory whose config AutoConfig cannot read (a text model registered
  only as a sub-config, as exports of emu3 and mllama wrote it before their config.json held the
  composite config) loads with that config class.
- `_dynamic_axis_inference`: parsed, never `eval`-ed (see :mod:`legacy_shim.runtime_fixes`).
- decoders read their cache layout from the session (:mod:`legacy_shim.runtime_cache`, which
  the unchanged-code hook also applies to optimum's own classes); those whose cache upstream
  cannot size or feed (states of state-space models, keys and values of different head sizes
  outside deepseek_v3, configs without the attributes upstream reads) generate through
  :mod:`legacy_shim.state_runtime`, which feeds every cache input by name.
- transformers 5 (:class:`GenerationSeams`, :mod:`legacy_shim.optimum_compat`): optimum-onnx's
  modules import with the transformers names they lack lent for the import; what transformers 5's
  `generate` asks of a model and upstream's classes lack is supplied. Inert on transformers 4.57.
- whisper loads as this module's :class:`ORTModelForWhisper`, not upstream's, which has none of
  the above.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from optimum_observer.loading import unregistered_config

from . import optimum_compat, runtime_cache

optimum_compat.import_optimum_modules()

from optimum import onnxruntime as ort  # noqa: E402  (imported above, with the names it needs)
from optimum.onnxruntime import modeling_seq2seq  # noqa: E402
from .runtime_fixes import evaluate_axis_expression


class SafeAxisInference:
    """Mixin for `ORTSessionMixin` subclasses: symbolic output dims are parsed, not `eval`-ed."""

    def _dynamic_axis_inference(self, axis_name: str, known_axes_values: dict[str, int]) -> int:
        return evaluate_axis_expression(axis_name, known_axes_values)


class UnregisteredConfigLoading:
    """Mixin for `ORTModel` subclasses: a directory whose config AutoConfig cannot read (a text
    model registered only as a sub-config, as exports of emu3 and mllama wrote it before their
    config.json held the composite config) loads with that config class."""

    @classmethod
    @functools.wraps(ort.ORTModel.from_pretrained.__func__)  # upstream's signature and docs
    def from_pretrained(cls, model_id, *args: Any, **kwargs: Any):
        resolve = not args and kwargs.get("config") is None and not kwargs.get("export")
        if resolve and os.path.isdir(str(model_id)):
            config = unregistered_config(str(model_id), kwargs.get("subfolder") or "")
            if config is not None:
                kwargs["config"] = config
        with optimum_compat.lent_generation_parameters():
            return super().from_pretrained(model_id, *args, **kwargs)


class GenerationSeams:
    """Mixin for the `GenerationMixin` subclasses: what transformers 5's `generate` asks of a model
    that optimum-onnx 0.1.0's classes (written for 4.x) do not provide. Inert on 4.x."""

    def is_remote_code(self) -> bool:
        # transformers 5's prepare_inputs_for_generation calls it ("'ORTModelForCausalLM' object
        # has no attribute 'is_remote_code'"); an ONNX Runtime session runs no code from the hub.
        return False

    def get_experts_implementation(self) -> dict[str, str]:
        # transformers 5's generate switches MoE kernels per (sub)config around decoding ("object
        # has no attribute 'get_experts_implementation'"); the graph fixed its experts at export.
        return {}

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if "cache" in inputs:
            # transformers 5 names the cache `cache`; upstream's forward takes it into **kwargs and
            # runs every step with an empty past: wrong tokens, no error.
            inputs["past_key_values"] = inputs.pop("cache")
        if inputs.get("attention_mask") is None and "attention_mask" in getattr(self, "input_names", ()):
            # transformers 5's generate drops an all-ones mask; the graph needs it ("Input
            # attention_mask is required by model but not provided"). `input_ids` holds every
            # token so far (past and new), the mask's length.
            inputs["attention_mask"] = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        return inputs


class ORTModelForCausalLM(UnregisteredConfigLoading, SafeAxisInference, GenerationSeams, ort.ORTModelForCausalLM):
    __doc__ = ort.ORTModelForCausalLM.__doc__

    def __init__(self, *args: Any, **kwargs: Any):
        try:
            super().__init__(*args, **kwargs)
        except AttributeError as error:
            runtime_cache.adapt_causal_lm(self, error)
        else:
            runtime_cache.adapt_causal_lm(self)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        return runtime_cache.causal_lm_forward(
            self, ort.ORTModelForCausalLM.forward, input_ids, attention_mask, past_key_values, position_ids,
            use_cache, **kwargs
        )


class ORTModelForFeatureExtraction(UnregisteredConfigLoading, SafeAxisInference, ort.ORTModelForFeatureExtraction):
    __doc__ = ort.ORTModelForFeatureExtraction.__doc__


class ORTModelForSequenceClassification(
    UnregisteredConfigLoading, SafeAxisInference, ort.ORTModelForSequenceClassification
):
    __doc__ = ort.ORTModelForSequenceClassification.__doc__


class ORTDecoderForSeq2Seq(SafeAxisInference, modeling_seq2seq.ORTDecoderForSeq2Seq):
    def __init__(self, *args: Any, **kwargs: Any):
        try:
            super().__init__(*args, **kwargs)
        except AttributeError as error:
            runtime_cache.adapt_seq2seq_decoder(self, error)
        else:
            runtime_cache.adapt_seq2seq_decoder(self)


class ORTEncoder(SafeAxisInference, modeling_seq2seq.ORTEncoder):
    pass


class ORTEncoderForSpeech(SafeAxisInference, modeling_seq2seq.ORTEncoderForSpeech):
    pass


class ORTModelForSeq2SeqLM(UnregisteredConfigLoading, SafeAxisInference, GenerationSeams, ort.ORTModelForSeq2SeqLM):
    __doc__ = ort.ORTModelForSeq2SeqLM.__doc__
    _ort_encoder_class = ORTEncoder
    _ort_decoder_class = ORTDecoderForSeq2Seq


class ORTModelForSpeechSeq2Seq(UnregisteredConfigLoading, SafeAxisInference, GenerationSeams, ort.ORTModelForSpeechSeq2Seq):
    __doc__ = ort.ORTModelForSpeechSeq2Seq.__doc__
    _ort_encoder_class = ORTEncoderForSpeech
    _ort_decoder_class = ORTDecoderForSeq2Seq

    @classmethod
    def _whisper_class(cls) -> type:
        return ORTModelForWhisper

    @classmethod
    def _from_pretrained(cls, model_id, config, **kwargs: Any):
        # Upstream hands whisper to its own ORTModelForWhisper, which has none of this class's
        # fixes (on transformers 5: "'ORTModelForWhisper' object has no attribute 'is_remote_code'").
        if config.model_type == "whisper" and not issubclass(cls, modeling_seq2seq.ORTModelForWhisper):
            return cls._whisper_class()._from_pretrained(model_id, config, **kwargs)
        return super()._from_pretrained(model_id, config, **kwargs)


class ORTModelForWhisper(ORTModelForSpeechSeq2Seq, modeling_seq2seq.ORTModelForWhisper):
    """`ORTModelForSpeechSeq2Seq` for whisper: upstream's whisper class (Whisper's generate) with
    this module's fixes."""


# optimum-onnx 0.1.0 has no class for image-text-to-text; the shim's own class stands alone (its
# module docstring), and is found here by task like the others (routes._runtime_class).
from .vision_language import ORTModelForImageTextToText  # noqa: E402,F401
