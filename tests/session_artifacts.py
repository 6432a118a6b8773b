"""Tiny models and legacy exports built once per test session, for the tests that only read them.

The tiny causal LMs are `tiny_models.save_causal_lm`'s (real-checkpoint shapes: grouped-query
attention, explicit head_dim); each legacy export is optimum-onnx's `main_export` with its
defaults, the reference every "same as optimum-onnx" test compares with. Built on first use, so a
run that selects none of their tests pays for none of them.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tiny_models import save_causal_lm

WITH_PAST = "text-generation-with-past"


class SessionArtifacts:
    """Lazily built, shared, read-only: a test that needs to change a model or an export copies it."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cache
    def causal_lm(self, model_type: str) -> Path:
        """The tiny random causal LM of `model_type`, with a tokenizer."""
        return save_causal_lm(model_type, self.root / "models" / model_type)

    @functools.cache
    def observer_export(self, model_type: str):
        """`optimum_observer.export` of :meth:`causal_lm` for text-generation-with-past, validated
        (its :class:`~optimum_observer.result.ExportResult`; the files in its `output_dir`)."""
        import optimum_observer

        return optimum_observer.export(self.causal_lm(model_type), self.root / "observer" / model_type)

    @functools.cache
    def legacy_export(self, model_type: str) -> Path:
        """optimum-onnx's own export of :meth:`causal_lm` for text-generation-with-past."""
        from legacy_shim.routes import upstream_main_export

        output = self.root / "legacy" / model_type
        upstream_main_export()(str(self.causal_lm(model_type)), output, task=WITH_PAST)
        return output
