"""Routing for code that imports from `optimum` directly (see :mod:`legacy_shim._hook`).

Takes the executed `optimum.exporters.onnx.__main__` module and replaces its `main_export` by a
wrapper with the same signature, docstring and return value (None) that routes every call.
With the default precedence (no `OPTIMUM_OBSERVER_EXPORTER`, an empty registry), only the pairs
optimum-onnx has no OnnxConfig for change exporter; all others reach optimum-onnx unchanged.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from .routes import WRAPPED_MARKER

logger = logging.getLogger(__name__)


def wrap_main_export(module: ModuleType) -> None:
    """Replaces `module.main_export` by the routed wrapper (idempotent)."""
    original = module.main_export
    if hasattr(original, WRAPPED_MARKER):
        return

    @functools.wraps(original)
    def main_export(*args, **kwargs) -> None:
        from .export import bind_arguments, run_export

        arguments, kwargs_shapes, exporter = bind_arguments(args, kwargs)
        run_export(arguments, kwargs_shapes, argument=exporter)

    setattr(main_export, WRAPPED_MARKER, original)
    module.main_export = main_export
    logger.debug("legacy_shim routes %s.main_export", module.__name__)
