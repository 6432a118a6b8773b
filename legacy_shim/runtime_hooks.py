"""Runtime fixes the unchanged-code hook applies to `optimum.onnxruntime` (see :mod:`legacy_shim._hook`).

- :func:`patch_axis_inference`: `optimum.onnxruntime.base.ORTSessionMixin._dynamic_axis_inference`
  (inherited by every `ORTModel*` class) `eval`s a symbolic output dimension name of the model
  file to size IO-binding buffers (`use_io_binding=True`): a dimension named
  `__import__('os').system(...)` runs that code when the unchanged upstream class loads an
  untrusted file. Replaced by :func:`legacy_shim.runtime_fixes.evaluate_axis_expression`, the
  parser `legacy_shim`'s own classes use: integer arithmetic over known axis names, nothing run.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .runtime_fixes import evaluate_axis_expression

#: Set on a patched function, holding the original.
_PATCHED = "__optimum_observer_original__"


def patch_axis_inference(module: ModuleType) -> None:
    """Replaces `module.ORTSessionMixin._dynamic_axis_inference` (optimum.onnxruntime.base), once."""
    cls = module.ORTSessionMixin
    original = vars(cls)["_dynamic_axis_inference"]
    if hasattr(original, _PATCHED):
        return

    def patched(self: Any, axis_name: str, known_axes_values: dict[str, int]) -> int:
        return evaluate_axis_expression(axis_name, known_axes_values)

    patched.__doc__ = original.__doc__
    setattr(patched, _PATCHED, original)
    cls._dynamic_axis_inference = patched
