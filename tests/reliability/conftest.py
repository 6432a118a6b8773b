"""Shared fixtures of the reliability suite: one tiny llama checkpoint and one observer export.

The llama has grouped-query attention (2 key/value heads of 4) with head_dim == hidden // heads
(optimum-onnx's unchanged runtime sizes llama's cache from hidden // heads) and one layer, to
keep every export of the suite to a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_helpers import SHARED_EXPORT_OPSET, TINY_LLAMA
from tiny_models import save_causal_lm


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_causal_lm("llama", tmp_path_factory.mktemp("checkpoints") / "llama", **TINY_LLAMA)


@pytest.fixture(scope="session")
def llama_export(tiny_llama, tmp_path_factory) -> Path:
    """An observer export of the tiny llama (validated elsewhere; this one is only inspected)."""
    import optimum_observer

    output = tmp_path_factory.mktemp("exports") / "llama-onnx"
    optimum_observer.export(tiny_llama, output, validate=False, opset=SHARED_EXPORT_OPSET)
    return output
