"""Post-export stage: ONNX Runtime fusions and weight quantization of the packaged files.

Takes: the ONNX files the packaging stage wrote into the staging directory (Optimum's input and
output names).
Gives: the same files, rewritten in place under the same names (weights beside them as before),
and what was done (:class:`PostProcessing`).

* ``optimize=True`` applies onnxscript's ONNX Runtime fusions
  (``onnxscript.rewriter.ort_fusions.optimize_for_ort``: RMSNorm, SkipRMSNorm, rotary, cos/sin
  cache, SDPA -> MultiHeadAttention, FusedMatMul...) with one of them left out:
  :data:`GATED_FUSIONS`. onnxscript's GroupQueryAttention rewrite drops the attention mask and
  computes ``seqlens_k`` as ``max(position_ids) + 1`` per row. ONNX Runtime's
  ``com.microsoft.GroupQueryAttention`` reads ``seqlens_k`` as "the keys of this row are
  positions ``[0, seqlens_k]``": right padding or none. Optimum's runtime left-pads a batch
  (positions ``1, 1, 0, 1, 2...``), so a padded row attends to its padding and misses its last
  tokens: wrong tokens from the first step (issue 15). Without that rewrite the fused SDPA
  becomes a ``MultiHeadAttention`` that keeps the additive 4-d mask, correct under any padding.
* ``quantize="int8"``: ``onnxruntime.quantization.quantize_dynamic`` with :data:`INT8_SETTINGS`.
* ``quantize="int4"``: ``onnxruntime.quantization.matmul_nbits_quantizer`` (``MatMulNBits``)
  with :data:`INT4_SETTINGS`.

The settings were chosen by measurement on SmolLM2-135M-Instruct (benchmarks/bench_inference.py,
table in the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from .errors import ObserverExportError, Stage

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "int4")
#: Largest perplexity of a quantized file, as a multiple of the fp32 file's, validation accepts.
MAX_PERPLEXITY_RATIO = 1.05

#: onnxscript fusions (names of `fuse_xformers`' fusion counts) not applied, and why.
GATED_FUSIONS = {
    "gqa": "GroupQueryAttention takes sequence lengths from position_ids and assumes right padding; "
    "Optimum's runtime left-pads batches",
}


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    """`quantize_dynamic` arguments (see :data:`INT8_SETTINGS`)."""

    per_channel: bool = True
    reduce_range: bool = False
    #: None: every op type quantize_dynamic handles (its default, embeddings' Gather included).
    op_types: tuple[str, ...] | None = ("MatMul",)
    #: MatMuls whose weight feeds the vocabulary projection stay fp32.
    keep_lm_head: bool = True


@dataclasses.dataclass(frozen=True)
class Int4Settings:
    """`MatMulNBitsQuantizer` arguments (see :data:`INT4_SETTINGS`)."""

    block_size: int = 32
    is_symmetric: bool = True
    accuracy_level: int = 4
    keep_lm_head: bool = False


INT8_SETTINGS = Int8Settings()
INT4_SETTINGS = Int4Settings()


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """What the stage did to the files."""

    optimized: bool
    quantized: str | None
    #: fusion name -> how many times onnxscript applied it (when optimized).
    fusions: dict[str, int] = dataclasses.field(default_factory=dict)
    #: MatMul nodes left in fp32 (when quantized).
    kept_fp32: tuple[str, ...] = ()


def check_quantize(quantize: str | None, model_type: str) -> None:
    """Refuses an unknown quantization mode before any work."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ObserverExportError(
            model_type,
            Stage.OPTIMIZATION,
            f"unknown quantization mode {quantize!r}",
            f"pass quantize as one of {', '.join(QUANTIZE_MODES)} (or None for fp32 weights).",
        )


@contextlib.contextmanager
def gated_fusions() -> Iterator[None]:
    """Within the block, onnxscript's `fuse_xformers` skips the fusions of :data:`GATED_FUSIONS`
    (each counts 0); restored on exit."""
    from onnxscript.rewriter.ort_fusions import _core

    saved = {name: getattr(_core, f"fuse_{name}") for name in GATED_FUSIONS}

    def skipped(model: ir.Model, **kwargs: object) -> int:
        return 0

    try:
        for name in GATED_FUSIONS:
            setattr(_core, f"fuse_{name}", skipped)
        yield
    finally:
        for name, function in saved.items():
            setattr(_core, f"fuse_{name}", function)


def _lm_head_matmuls(model: ir.Model) -> list[str]:
    """The MatMul nodes producing the `logits` output (through at most a few shape ops)."""
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    names, frontier = [], [logits] if logits is not None else []
    for _ in range(4):
        producers = [v.producer() for v in frontier if v is not None and v.producer() is not None]
        names += [n.name for n in producers if n.op_type in ("MatMul", "Gemm", "MatMulNBits")]
        frontier = [i for n in producers if n.op_type not in ("MatMul", "Gemm") for i in n.inputs[:1]]
    return names


def _save(model: ir.Model, path: Path, external: bool) -> None:
    """Writes `model` to `path`, weights beside it in `<name>_data` when `external` (the packaging
    stage's layout): into a scratch directory first, then moved over the old files, because the
    old weights file may still back the model's tensors while it is written."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".post-") as scratch:
        target = Path(scratch) / path.name
        data = f"{path.name}_data"
        if external:
            ir.save(model, target, external_data=data)
            os.replace(target.parent / data, path.parent / data)
        else:
            ir.save(model, target)
        os.replace(target, path)


def _optimize(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with gated_fusions():
        model, counts = optimize_for_ort(model)
    return model, {name: count for name, count in counts.items() if count}


def _quantize_int8(path: Path, external: bool, settings: Int8Settings) -> tuple[str, ...]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = tuple(_lm_head_matmuls(ir.load(path))) if settings.keep_lm_head else ()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".post-") as scratch:
        target = Path(scratch) / path.name
        quantize_dynamic(
            path,
            target,
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
            nodes_to_exclude=list(kept),
            use_external_data_format=external,
        )
        _save(ir.load(target), path, external)
    return kept


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """onnxruntime's `matmul_nbits_quantizer` calls `logging.basicConfig(level=INFO)` when first
    imported: the caller's process would then log every node it skips. The root logger's handlers
    and level are put back after the block."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _quantize_int4(model: ir.Model, settings: Int4Settings) -> tuple[ir.Model, tuple[str, ...]]:
    with _root_logging_kept():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    kept = tuple(_lm_head_matmuls(model)) if settings.keep_lm_head else ()
    quantizer = MatMulNBitsQuantizer(
        ir.to_proto(model),
        block_size=settings.block_size,
        is_symmetric=settings.is_symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=list(kept),
    )
    quantizer.process()
    return ir.from_proto(quantizer.model.model), kept


def post_process(
    directory: Path,
    onnx_file: str,
    *,
    optimize: bool = False,
    quantize: str | None = None,
    int8: Int8Settings = INT8_SETTINGS,
    int4: Int4Settings = INT4_SETTINGS,
) -> PostProcessing:
    """Optimizes and/or quantizes `directory / onnx_file` in place (fusions first)."""
    path = directory / onnx_file
    external = (directory / f"{onnx_file}_data").exists()
    fusions: dict[str, int] = {}
    kept: tuple[str, ...] = ()
    if optimize:
        model, fusions = _optimize(ir.load(path))
        _save(model, path, external)
        logger.info("%s: onnxscript fusions %s", onnx_file, fusions)
    if quantize == "int8":
        kept = _quantize_int8(path, external, int8)
    elif quantize == "int4":
        model, kept = _quantize_int4(ir.load(path), int4)
        _save(model, path, external)
    if quantize:
        logger.info("%s: %s weights (kept fp32: %s)", onnx_file, quantize, ", ".join(kept) or "none")
    return PostProcessing(optimized=optimize, quantized=quantize, fusions=fusions, kept_fp32=kept)

