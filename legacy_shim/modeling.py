"""`optimum.onnxruntime` model classes whose `export=True` goes through the router.

Each class is its :mod:`legacy_shim.runtime` namesake (upstream's class with the runtime fixes:
loading, cache sizing, generation) plus the export:

- `_export`: upstream's own `_export` runs unchanged, except that its module-level
  `main_export` is swapped for the routed :func:`legacy_shim.main_export` during the call.
  Without the swap, `from_pretrained(path, export=True)` raises optimum-onnx's "custom or
  unsupported architecture" error for every type it has no OnnxConfig for. The extra
  `from_pretrained(..., exporter="auto"|"legacy"|"observer")` keyword picks the route.
- image-text-to-text (no upstream class): `from_pretrained(..., export=True)` exports through the
  router into a temporary directory kept with the model, as optimum's classes do.

The dependency runs one way: this module imports the export (:mod:`legacy_shim.export`), whose
observer route validates with :mod:`legacy_shim.runtime`'s classes, never with these.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Any

from . import runtime, vision_language
from .export import main_export
from .patching import swapped_attribute


class RoutedExport:
    """Mixin for `ORTModel` subclasses: `export=True` goes through the router."""

    @classmethod
    def _export(cls, model_id, config, exporter: str = "auto", **kwargs: Any):
        upstream = next(
            k for k in cls.__mro__ if "_export" in vars(k) and k.__module__.startswith("optimum.")
        )
        module = sys.modules[upstream.__module__]
        with swapped_attribute(module, "main_export", functools.partial(main_export, exporter=exporter)):
            return super()._export(model_id, config, **kwargs)


class ORTModelForCausalLM(RoutedExport, runtime.ORTModelForCausalLM):
    __doc__ = runtime.ORTModelForCausalLM.__doc__


class ORTModelForFeatureExtraction(RoutedExport, runtime.ORTModelForFeatureExtraction):
    __doc__ = runtime.ORTModelForFeatureExtraction.__doc__


class ORTModelForSequenceClassification(RoutedExport, runtime.ORTModelForSequenceClassification):
    __doc__ = runtime.ORTModelForSequenceClassification.__doc__


class ORTModelForSeq2SeqLM(RoutedExport, runtime.ORTModelForSeq2SeqLM):
    __doc__ = runtime.ORTModelForSeq2SeqLM.__doc__


class ORTModelForSpeechSeq2Seq(RoutedExport, runtime.ORTModelForSpeechSeq2Seq):
    __doc__ = runtime.ORTModelForSpeechSeq2Seq.__doc__

    @classmethod
    def _whisper_class(cls) -> type:
        return ORTModelForWhisper


class ORTModelForWhisper(ORTModelForSpeechSeq2Seq, runtime.ORTModelForWhisper):
    """`ORTModelForSpeechSeq2Seq` for whisper: upstream's whisper class (Whisper's generate) with
    the runtime fixes and the routed export."""


class ORTModelForImageTextToText(vision_language.ORTModelForImageTextToText):
    __doc__ = vision_language.ORTModelForImageTextToText.__doc__

    @classmethod
    def from_pretrained(
        cls, model_id: str | os.PathLike, export: bool = False, exporter: str = "auto", **kwargs: Any
    ) -> ORTModelForImageTextToText:
        """Loads an export from `model_id`; with `export=True`, `model_id` is a transformers model
        (id or directory) exported first through the router (`legacy_shim.main_export`, `exporter`
        as there; keyword arguments other than the loading ones go to it) into a temporary
        directory kept with the model, as optimum's classes do."""
        if not export:
            return super().from_pretrained(model_id, **kwargs)
        loading = {k: kwargs.pop(k) for k in vision_language.LOADING_ARGUMENTS if k in kwargs}
        temporary = tempfile.TemporaryDirectory()
        main_export(str(model_id), temporary.name, task=vision_language.TASK, exporter=exporter, **kwargs)
        model = super().from_pretrained(temporary.name, **loading)
        model._temporary_directory = temporary
        return model
