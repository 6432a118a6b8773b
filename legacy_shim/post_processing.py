"""`ORTOptimizer` on observer exports: the unchanged-code hook routes optimization by exporter.

Failure fixed: optimum-onnx 0.1.0's `ORTOptimizer` (and `optimum-cli onnxruntime optimize`, which
uses it) refuses every model type outside ONNX Runtime's transformer-optimizer list, so an
observer export of a type optimum-onnx cannot export (olmo2, qwen3, gemma, every observer-only
type) cannot be optimized at all: `NotImplementedError: ONNX Runtime doesn't support the graph
optimization of olmo2 yet` from `optimize`, or `Tried to use ORTOptimizer for the model type ...`
from the constructor for types without a normalized config.

Routing, like export: the files an observer export wrote carry its metadata entry
(:data:`optimum_observer.packaging.EXPORTER_METADATA_KEY`). When every file the optimizer was
given is an observer export, `optimize` runs the observer's own fusions
(:func:`optimum_observer.optimization.optimize_file`: onnxscript's ONNX Runtime fusions with the
padding-unsafe GroupQueryAttention rewrite left out, the same as `optimum-observer export
--optimize`) and writes what optimum writes: `<file>_<suffix>.onnx` in `save_dir`, the config,
an `ort_config.json` recording the optimization config, preprocessors and the generation config.
Any other file (a legacy export) takes optimum-onnx's code unchanged, errors included.

`ORTQuantizer` needs no routing: it has no model-type list and quantizes observer files as they
are (tested).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

#: Set on a patched function, holding the original.
_PATCHED = "__optimum_observer_original__"


def _observer_files(paths: list[os.PathLike]) -> bool:
    from optimum_observer.packaging import exported_by_observer

    return bool(paths) and all(Path(p).is_file() and exported_by_observer(p) for p in paths)


def _refuse_unsupported(optimizer: Any, optimization_config: Any) -> None:
    """The observer's fusions target ONNX Runtime on CPU in the export's precision."""
    asked = [name for name in ("fp16", "optimize_for_gpu") if getattr(optimization_config, name, False)]
    if asked:
        raise NotImplementedError(
            f"{optimizer.model_type}: ORTOptimizer on an optimum-observer export applies the observer's "
            f"ONNX Runtime CPU fusions only; {' and '.join(asked)} are not available for it. Optimize "
            "without them (OptimizationConfig(optimization_level=...)), or export in float16 with "
            "`optimum-observer export --dtype fp16` where the model supports it."
        )


def _optimize_observer_files(optimizer: Any, optimization_config: Any, save_dir: Any, file_suffix: str | None) -> Path:
    from optimum.onnxruntime.configuration import ORTConfig
    from optimum.utils.save_utils import maybe_save_preprocessors
    from transformers import GenerationConfig

    from optimum_observer.optimization import optimize_file

    _refuse_unsupported(optimizer, optimization_config)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{file_suffix}" if file_suffix else ""
    external = False
    for source in map(Path, optimizer.onnx_model_path):
        target = save_dir / f"{source.stem}{suffix}{source.suffix}"
        fusions = optimize_file(source, target)
        external = external or (save_dir / f"{target.name}_data").exists()
        logger.info("%s: observer export optimized into %s (%s)", optimizer.model_type, target, fusions)
    optimizer.config.save_pretrained(save_dir)
    ORTConfig(optimization=optimization_config, use_external_data_format=external).save_pretrained(save_dir)
    first = Path(optimizer.onnx_model_path[0]).parent
    maybe_save_preprocessors(first, save_dir)
    try:
        GenerationConfig.from_pretrained(first).save_pretrained(save_dir)
    except OSError:  # the export has no generation config (encoders)
        pass
    return save_dir


def patch_optimizer(module: ModuleType) -> None:
    """Routes `module.ORTOptimizer` (optimum.onnxruntime.optimization) by exporter, once."""
    cls = module.ORTOptimizer
    init, optimize = vars(cls)["__init__"], vars(cls)["optimize"]
    if hasattr(optimize, _PATCHED):
        return

    @functools.wraps(init)
    def routed_init(self: Any, onnx_model_path: list[os.PathLike], config: Any, from_ortmodel: bool = False) -> None:
        try:
            init(self, onnx_model_path, config, from_ortmodel)
        except NotImplementedError:
            # Raised for types without a normalized config, which only optimum's own path reads.
            if not _observer_files(onnx_model_path):
                raise
            self.config, self.from_ortmodel = config, from_ortmodel
            self.onnx_model_path, self.model_type = onnx_model_path, config.model_type
            self.normalized_config = None

    @functools.wraps(optimize)
    def routed_optimize(
        self: Any, optimization_config: Any, save_dir: Any, file_suffix: str | None = "optimized", one_external_file: bool = True
    ) -> Path:
        if _observer_files(self.onnx_model_path):
            return _optimize_observer_files(self, optimization_config, save_dir, file_suffix)
        return optimize(self, optimization_config, save_dir, file_suffix, one_external_file)

    setattr(routed_init, _PATCHED, init)
    setattr(routed_optimize, _PATCHED, optimize)
    cls.__init__ = routed_init
    cls.optimize = routed_optimize
