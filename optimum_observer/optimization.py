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

The settings were chosen by measurement on SmolLM2-135M-Instruct (perplexity on
`validation.QUALITY_TEXT` as a ratio to the fp32 file's, after --optimize):

| int8 (`quantize_dynamic`, MatMul only) | ratio |
|---|---|
| defaults (per-tensor, Gather too) | 2.16x |
| per-channel | 1.94x |
| per-channel, reduce_range | 2.06x |
| per-channel, down_proj fp32 | 1.09x |
| per-channel, down_proj, gate/up_proj fp32 | 1.05x |
| **per-channel, down_proj, o_proj fp32** | **1.01x** |

| int4 (`MatMulNBits`, accuracy_level 4 unless said) | ratio |
|---|---|
| symmetric, block 32 | 1.32x |
| symmetric, block 32, accuracy_level 0 | 1.30x |
| symmetric, block 32, down_proj fp32 | 1.27x |
| **asymmetric, block 32** | **1.13x** (1.11x at accuracy_level 0) |
| asymmetric, block 16 | 1.21x |
| asymmetric, block 128 | 1.29x |
| asymmetric, block 32, down_proj (and o_proj) fp32 | 1.10x (1.12x) |

(The vocabulary projection of SmolLM2 is its tied embedding, read through a transpose: no
quantizer touches it.)
"""

from __future__ import annotations

import ast
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
#: Largest perplexity of a quantized file, as a multiple of the fp32 file's, validation accepts
#: by default, per mode: int8 keeps SmolLM2-135M within 1.014x; int4 (round-to-nearest) measured
#: 1.11x to 1.29x over the settings tried (block 16 to 128, symmetric or not, fp32 projections kept).
MAX_PERPLEXITY_RATIO = {"int8": 1.05, "int4": 1.15}

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
    #: MatMuls of the modules whose names end so stay fp32 (see :func:`nodes_of_modules`): the
    #: projections whose inputs carry the activation outliers that per-tensor activation scales
    #: lose (attention output, the MLP's gated product), and the vocabulary projection.
    keep_modules: tuple[str, ...] = ("lm_head", "mlp.down_proj", "self_attn.o_proj")


@dataclasses.dataclass(frozen=True)
class Int4Settings:
    """`MatMulNBitsQuantizer` arguments (see :data:`INT4_SETTINGS`)."""

    block_size: int = 32
    is_symmetric: bool = False
    accuracy_level: int = 4
    keep_modules: tuple[str, ...] = ()


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


#: Where torch.onnx records the module path of each node (`model.model.layers.0.mlp.down_proj`).
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def nodes_of_modules(model: ir.Model, suffixes: tuple[str, ...], op_types: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """The `op_types` nodes that torch's exporter recorded inside a module whose name ends with
    one of `suffixes` (`"lm_head"`, `"mlp.down_proj"`): data the exporter writes on every node,
    so no per-architecture table of node names is needed."""
    found = []
    for node in model.graph.all_nodes():
        try:
            modules = ast.literal_eval(node.metadata_props.get(NAME_SCOPES, "[]"))
        except (ValueError, SyntaxError):
            continue
        if node.op_type in op_types and any(m.endswith(suffixes) for m in modules[-2:] if suffixes):
            found.append(node.name)
    return found


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

    kept = tuple(nodes_of_modules(ir.load(path), settings.keep_modules))
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

    kept = tuple(nodes_of_modules(model, settings.keep_modules))
    quantizer = MatMulNBitsQuantizer(
        ir.to_proto(model),
        block_size=settings.block_size,
        is_symmetric=settings.is_symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=list(kept),
    )
    quantizer.process()
    return ir.from_proto(quantizer.model.model), kept


def optimize_file(source: Path, target: Path) -> dict[str, int]:
    """Writes `source` with the fusions of ``optimize=True`` to `target` (another file; its
    weights beside it in `<target name>_data` when `source` keeps them outside): what
    `legacy_shim`'s `ORTOptimizer` runs on observer exports. Returns the fusion counts."""
    source, target = Path(source), Path(target)
    model = ir.load(source)
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    model, fusions = _optimize(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    _save(model, target, external)
    logger.info("%s -> %s: onnxscript fusions %s", source.name, target.name, fusions)
    return fusions


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

