"""The unchanged-code hook: installed at interpreter start by `optimum_observer_hook.pth`.

Takes nothing and imports nothing beyond `sys` and `os` (it runs in every Python process of the
environment, so it must cost next to nothing and never import torch or optimum). It puts a
finder at the front of `sys.meta_path` that waits for `optimum.exporters.onnx.__main__`; when
that module has executed, :func:`legacy_shim.unchanged_code.wrap_main_export` swaps its
`main_export` for the routed one. From then on `from optimum.exporters.onnx import main_export`,
`optimum.onnxruntime.ORTModel*.from_pretrained(..., export=True)` and `optimum-cli export onnx`
route pairs optimum-onnx has no OnnxConfig for to the observer, and leave the rest to optimum-onnx.

Set `OPTIMUM_OBSERVER_DISABLE=1` to turn it off.
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV_VAR = "OPTIMUM_OBSERVER_DISABLE"
TARGET_MODULE = "optimum.exporters.onnx.__main__"


def enabled(environ: os._Environ | dict = os.environ) -> bool:
    return environ.get(DISABLE_ENV_VAR, "").strip().lower() in ("", "0", "false", "no", "off")


class _PatchAfterExec:
    """Loader wrapper: runs the wrapped loader, then patches the module it produced."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        if name == "_loader":  # not set yet (copy/pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from .unchanged_code import wrap_main_export

        wrap_main_export(module)


class PostImportFinder:
    """Meta path finder that wraps the loader of :data:`TARGET_MODULE` and nothing else."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader)
        return spec


def install() -> None:
    """Installs the finder once, unless disabled; patches at once if the target is already loaded."""
    if not enabled() or any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        return
    if TARGET_MODULE in sys.modules:
        from .unchanged_code import wrap_main_export

        wrap_main_export(sys.modules[TARGET_MODULE])
        return
    sys.meta_path.insert(0, PostImportFinder())
