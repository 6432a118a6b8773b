"""The unchanged-code hook: installed at interpreter start by `optimum_observer_hook.pth`.

Takes nothing and imports nothing beyond `sys` and `os` (it runs in every Python
process of the environment, so it must cost next to nothing and never import torch or optimum).
It puts a finder at the front of `sys.meta_path` that waits for the modules of :data:`TARGETS`;
when one has executed, its patch function runs on it:

- `optimum.exporters.onnx.__main__`: :func:`legacy_shim.unchanged_code.wrap_main_export` swaps
  its `main_export` for the routed one. From then on `from optimum.exporters.onnx import
  main_export`, `optimum.onnxruntime.ORTModel*.from_pretrained(..., export=True)` and
  `optimum-cli export onnx` route pairs optimum-onnx has no OnnxConfig for to the observer, and
  leave the rest to optimum-onnx.
- `optimum.onnxruntime.modeling_decoder` / `modeling_seq2seq`: :mod:`legacy_shim.runtime_cache`
  makes `ORTModelForCausalLM` and the seq2seq decoders read their cache layout from the graph
  (grouped-query attention, explicit head_dim, MLA, state caches), not from the config.
- `optimum.onnxruntime.base`: :func:`legacy_shim.runtime_hooks.patch_axis_inference` stops every
  `ORTModel*` class from `eval`-ing dimension names of the model file under IO binding.
- `optimum.onnxruntime.optimization`: :func:`legacy_shim.post_processing.patch_optimizer` lets
  `ORTOptimizer` (and `optimum-cli onnxruntime optimize`) optimize observer exports of any model
  type with the observer's fusions; legacy exports keep optimum-onnx's path.

Set `OPTIMUM_OBSERVER_DISABLE=1` to turn it off.
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV_VAR = "OPTIMUM_OBSERVER_DISABLE"
#: Module -> "module:function" patching it once it has executed.
TARGETS = {
    "optimum.exporters.onnx.__main__": "legacy_shim.unchanged_code:wrap_main_export",
    "optimum.onnxruntime.modeling_decoder": "legacy_shim.runtime_cache:patch_modeling_decoder",
    "optimum.onnxruntime.modeling_seq2seq": "legacy_shim.runtime_cache:patch_modeling_seq2seq",
    "optimum.onnxruntime.base": "legacy_shim.runtime_hooks:patch_axis_inference",
    "optimum.onnxruntime.optimization": "legacy_shim.post_processing:patch_optimizer",
}


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
        _patch(module)


def _patch(module) -> None:
    import importlib

    where, function = TARGETS[module.__name__].split(":")
    getattr(importlib.import_module(where), function)(module)


class PostImportFinder:
    """Meta path finder that wraps the loaders of the :data:`TARGETS` modules and nothing else."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TARGETS:
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
    """Installs the finder once, unless disabled; patches at once the targets already loaded."""
    if not enabled() or any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        return
    for name in TARGETS:
        if name in sys.modules:
            _patch(sys.modules[name])
    sys.meta_path.insert(0, PostImportFinder())
