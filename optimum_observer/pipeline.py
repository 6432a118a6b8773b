"""The observer export, stage by stage: load, capture, synthesize, export, name, package, validate.

A task may have several graphs (an encoder-decoder model: encoder, decoder, decoder with past):
every stage runs for each graph in turn, from one observed run of the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import capture as capture_stage
from . import conversion, loading, naming, optimization, packaging, portable_cache, signals, synthesis, validation
from .cache_pytree import registered_caches
from .errors import ObserverExportError, Stage, stage_errors
from .patches import applied
from .result import ExportResult, ValidationReport
from .families import TaskFamily, family_of
from .tasks import get_task

logger = logging.getLogger(__name__)

#: Serialises the exports of one process. The stages apply process-wide state (pytree
#: registrations of the cache classes, scoped patches of transformers' classes, onnxscript's
#: rewrite tolerances): two exports at once would apply and restore it over each other, and
#: leave it applied. Re-entrant, so a `run` callable may itself export.
EXPORT_LOCK = threading.RLock()


class _Progress:
    """Times each stage and shows it on a progress bar when asked to; an unexpected exception in
    a stage comes out as that stage's :class:`ObserverExportError` (:func:`errors.stage_errors`)."""

    def __init__(self, show: bool, model_type: str, stages: int = len(Stage)):
        self.timings: dict[str, float] = {}
        #: named in the errors of the stages (the path until the model is loaded).
        self.model_type = model_type
        self._bar = tqdm(total=stages, desc="observer export", unit="stage", disable=not show)

    @contextlib.contextmanager
    def stage(self, *stages: Stage) -> Iterator[None]:
        """One or more consecutive stages that run as one step (torch.export and the ONNX
        conversion run in one `torch.onnx.export` call): timed together, under their joined names."""
        name = " / ".join(stage.value for stage in stages)
        self._bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            with stage_errors(self.model_type, stages[0]):
                yield
        finally:
            self.timings[name] = time.perf_counter() - start
            self._bar.update(len(stages))

    def close(self) -> None:
        self._bar.close()


def _mismatch_remedy(report: ValidationReport) -> str:
    if "torch" in report.nonfinite:
        return (
            "the model itself computes NaN or inf (torch's outputs hold them, so no export of it can "
            "be checked): look for non-finite weights (torch.isfinite over model.state_dict()) or an "
            "overflow in reduced precision (export in fp32)."
        )
    if report.nonfinite:
        return (
            "ONNX Runtime computes NaN or inf where torch does not: report the model type with the "
            "table above; pass validate=False to keep the file anyway."
        )
    return (
        "raise atol for reduced precision, or report the model type; pass validate=False to "
        "keep the file anyway."
    )


def _runtime_failure_hint(error: BaseException, trust_remote_code: bool) -> str:
    if "trust_remote_code" in str(error) and not trust_remote_code:
        return "the export's config needs the checkpoint's own code: pass trust_remote_code=True."
    return (
        "if the error names a past_key_values input that the runtime did not feed, the runtime "
        "class does not feed that kind of cache: load the export with legacy_shim.ORTModelForCausalLM "
        "(or keep optimum-observer's hook enabled: unset OPTIMUM_OBSERVER_DISABLE), which feeds every "
        "cache input by name, and report the model type; pass validate=False to keep the file anyway."
    )


def export(
    model: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    *,
    task: str = "text-generation-with-past",
    run: Callable[[Any], Any] | None = None,
    tokenizer: Any = None,
    opset: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    subfolder: str = "",
    show_progress: bool | None = None,
    runtime_class: Any = None,
    feature_extractor: Any = None,
    optimize: bool = False,
    quantize: str | None = None,
    max_perplexity_ratio: float | None = None,
    min_cosine: float | None = None,
) -> ExportResult:
    """Exports `model` to ONNX in `output_dir` by observing a typical run of it.

    Args:
        model: a model id or local directory, or an already loaded `PreTrainedModel`.
        output_dir: directory to write; written atomically (a failure leaves no finished-looking
            directory behind).
        task: one of :func:`optimum_observer.supported_tasks`.
        run: optional callable receiving the loaded model and running it the way a user would;
            by default `generate` is called over prompts of two lengths and two batch sizes.
        tokenizer: tokenizer to use and save; loaded from `model` when it is a path holding one.
        opset: ONNX opset; the exporter's default when None.
        dtype: "fp32" (default), "fp16", "bf16" or a torch dtype.
        device: device the model runs on during capture and export.
        trust_remote_code, model_kwargs, local_files_only, cache_dir, revision, token, subfolder:
            forwarded to `from_pretrained`.
        validate: replay the observed calls through ONNX Runtime and check greedy generation
            through the runtime class; a mismatch raises.
        atol: absolute tolerance of the replay.
        show_progress: progress bar over the stages; defaults to "stderr is a terminal".
        runtime_class: class whose `from_pretrained(dir)` loads the export for the runtime
            check; defaults to the unchanged `optimum.onnxruntime` class of the task.
        feature_extractor: for speech tasks, the feature extractor the default run feeds
            synthetic waveforms through (and saves); loaded from `model` when it holds one.
        optimize: after validation, apply onnxscript's ONNX Runtime fusions that are correct
            under left padding (:mod:`optimum_observer.optimization`); validated again like the
            fp32 files (replay within atol, exact greedy tokens).
        quantize: "int8" or "int4" weights (:mod:`optimum_observer.optimization`), after the
            fusions; the modes each task family offers are its `quantization`
            (:class:`optimization.Quantization`: decoders int8 and int4, encoders int8). For
            decoders validation reports the perplexity ratio to the fp32 file and the
            greedy-token agreement with torch, and fails when the ratio exceeds
            `max_perplexity_ratio`; for encoders it reports the cosine of each output to torch's
            and fails below `min_cosine`.
        max_perplexity_ratio: the largest perplexity of the quantized file, as a multiple of
            the fp32 file's, that validation accepts; by default
            :data:`optimization.MAX_PERPLEXITY_RATIO` of the mode (int8 1.05, int4 1.15).
        min_cosine: the smallest cosine of a quantized encoder's outputs to torch's (each input's
            output, padded positions left out) that validation accepts; by default
            :data:`optimization.MIN_COSINE` of the mode (int8 0.99).

    Exports in one process run one at a time (:data:`EXPORT_LOCK`): a second thread waits.
    A caller's loaded model is given back in the training mode it had. In the main thread,
    SIGTERM and SIGHUP raise :class:`~optimum_observer.signals.Terminated` (a `SystemExit`)
    while the export runs, so it cleans up as on Ctrl-C.

    Raises:
        ObserverExportError: naming the model type, the stage and what to try next.
    """
    contract = get_task(task)
    family = family_of(contract)
    # Checks that need no model run before any work; a dtype or device torch does not know is a
    # ValueError / RuntimeError of the caller's arguments, not a failure of a stage.
    loading.resolve_dtype(dtype)
    torch.device(device)
    named = model.config.model_type if hasattr(model, "config") else os.fspath(model)
    conversion.check_opset(opset, named)
    quantization = optimization.check_quantize(quantize, named, family.family.value, family.quantization)
    packaging.check_destination(output_dir, named, [graph.file_name for graph in contract.graphs])
    with EXPORT_LOCK, signals.termination_raises(), loading.caller_model_restored(model):
        hub_kwargs = dict(
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            revision=revision,
            token=token,
            subfolder=subfolder,
        )
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v not in (None, "")}
        post_processing = optimize or quantize is not None
        progress = _Progress(
            sys.stderr.isatty() if show_progress is None else show_progress,
            named,
            len(Stage) if post_processing else len(Stage) - 1,
        )
        try:
            with progress.stage(Stage.LOAD):
                loaded = loading.load(
                    model,
                    contract,
                    tokenizer=tokenizer,
                    dtype=dtype,
                    device=device,
                    trust_remote_code=trust_remote_code,
                    model_kwargs=model_kwargs,
                    hub_kwargs=hub_kwargs,
                    feature_extractor=feature_extractor,
                )
            model_type = progress.model_type = loaded.model_type
            contract = contract.for_model(loaded.model)
            # Only the patches whose targets this model is built from (and the environment's);
            # those fixing the model's own run in torch hold from its capture to its checks.
            selected = conversion.patches_for(loaded.model, model_type)
            with applied([patch for patch in selected if patch.model_runs]):
                with registered_caches():
                    with progress.stage(Stage.CAPTURE):
                        captures = capture_stage.capture(
                            loaded.model, contract, model_type, run, loaded.tokenizer, loaded.feature_extractor
                        )
                    with progress.stage(Stage.SYNTHESIS):
                        graphs = [_GraphExport(c, synthesis.synthesize(c, model_type)) for c in captures]
                        capture_stage.check_observed_sizes(captures, contract, model_type)
                    # One torch.onnx.export call runs both: the exporter's capture strategies and its
                    # dynamic-shape handling are kept; a failure names the step that failed.
                    with progress.stage(Stage.TORCH_EXPORT, Stage.ONNX_CONVERSION):
                        for graph in graphs:
                            graph.program = conversion.convert(
                                loaded.model,
                                graph.capture.graph,
                                graph.example,
                                model_type,
                                opset,
                                patches=[patch for patch in selected if not patch.model_runs],
                                position_offset=graph.capture.position_offset,
                            )
                            conversion.check_axes(
                                graph.program, graph.example, model_type, graph.capture.graph.file_name
                            )
                dynamic_axes: dict[str, dict[int, str]] = {}
                with progress.stage(Stage.NAMING):
                    for graph in graphs:
                        axes = naming.apply_names(graph.program, graph.capture, graph.example, model_type)
                        portable = portable_cache.make_cache_inputs_portable(graph.program.model)
                        for name, portable_axes in portable.items():
                            axes[name] = dict(sorted({**axes[name], **portable_axes}.items()))
                        carried = portable_cache.carry_states_as_values(graph.program.model)
                        axes = {n: a for n, a in axes.items() if portable_cache.carried_name(n) not in carried}
                        axes.update(carried)
                        # Several files may share value names (each decoder has `input_ids`): qualify them.
                        prefix = f"{graph.capture.graph.file_name}:" if len(graphs) > 1 else ""
                        dynamic_axes.update({prefix + name: axis for name, axis in axes.items()})
                with packaging.staged_output(output_dir, model_type) as staging:
                    with progress.stage(Stage.PACKAGING), packaging.writing(model_type, output_dir):
                        onnx_files = [
                            name
                            for graph in graphs
                            for name in packaging.write_model(
                                graph.program, staging, graph.capture.graph.file_name
                            )
                        ]
                        packaging.write_configs(loaded.model, loaded.tokenizer, staging, loaded.feature_extractor)
                    with progress.stage(Stage.VALIDATION):
                        checking = _Checking(
                            validation.ValidationInputs(
                                staging,
                                loaded.model,
                                contract,
                                (runtime_class or validation.default_runtime_class(contract)) if validate else None,
                                loaded.tokenizer,
                                loaded.feature_extractor,
                                atol,
                                # The export's config is the checkpoint's: code it ships is needed to read it back.
                                {"trust_remote_code": True} if trust_remote_code else {},
                                # Named here: the checks need not open a session to read them.
                                {graph.capture.graph.file_name: graph.input_names() for graph in graphs},
                            ),
                            family,
                            graphs,
                            model_type,
                        )
                        report = _validate(checking) if validate else None
                    if post_processing:
                        with progress.stage(Stage.OPTIMIZATION):
                            limits = {"max_perplexity_ratio": max_perplexity_ratio, "min_cosine": min_cosine}
                            post, report = _post_process(checking, optimize, quantize, quantization, limits, report)
        finally:
            progress.close()
        return ExportResult(
            output_dir=Path(output_dir).resolve(),
            model_type=model_type,
            task=contract.name,
            onnx_files=onnx_files,
            dynamic_axes=dynamic_axes,
            validation=report,
            timings=progress.timings,
            patches=tuple(patch.name for patch in selected if patch.exists()),
            post_processing=post if post_processing else None,
        )


@dataclasses.dataclass(frozen=True)
class _Checking:
    """What the validation and optimization stages check the staged files with."""

    inputs: validation.ValidationInputs
    family: TaskFamily
    graphs: list[_GraphExport]
    model_type: str

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.inputs.load_kwargs.get("trust_remote_code"))


def _post_process(
    checking: _Checking,
    optimize: bool,
    quantize: str | None,
    quantization: optimization.Quantization | None,
    limits: dict[str, float | None],
    report: ValidationReport | None,
) -> tuple[optimization.PostProcessing, ValidationReport | None]:
    """Fusions, then quantization, of every graph file; with a `report` (validation on), the
    fused files are validated like the fp32 ones and the quantized ones for quality (the family's
    measure, bounded by its entry of `limits`, the `export()` arguments, or the mode's default).
    `quantization`: the family's settings, as `export()` checked them before any work."""
    inputs, model_type = checking.inputs, checking.model_type
    family = checking.family
    staging = inputs.directory
    files = [graph.capture.graph.file_name for graph in checking.graphs]
    fusions: dict[str, int] = {}
    if optimize:
        for name in files:
            for fusion, count in optimization.post_process(staging, name, optimize=True).fusions.items():
                fusions[fusion] = fusions.get(fusion, 0) + count
        if report is not None:
            try:
                report = _validate(checking)
            except ObserverExportError as error:
                raise ObserverExportError(
                    model_type,
                    Stage.OPTIMIZATION,
                    f"after the ONNX Runtime fusions ({', '.join(f'{k} {v}' for k, v in fusions.items())}): "
                    f"{error.reason}",
                    "export without optimize (the fp32 export validated) and report the model type.",
                    report=error.report,
                ) from error
    kept: tuple[str, ...] = ()
    if quantize and quantization is not None:
        measure = report is not None and inputs.runtime_class is not None
        reference = family.quality_reference(inputs) if measure else None
        for name in files:
            try:
                kept += optimization.post_process(
                    staging, name, quantize=quantize, int8=quantization.int8, int4=quantization.int4
                ).kept_fp32
            except Exception as error:
                raise ObserverExportError(
                    model_type,
                    Stage.OPTIMIZATION,
                    f"onnxruntime.quantization could not quantize {name} to {quantize}: "
                    f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                    "try the other quantize mode, or export without quantize (the fp32 file validated).",
                ) from error
        if measure:
            quality = family.check_quality(inputs, reference)
            report = dataclasses.replace(report, quality=quality)
            limit = limits.get(quality.limit_name)
            if limit is None:
                limit = optimization.QUALITY_LIMITS[quality.limit_name][quantize]
            if not quality.within(limit):
                option = "--" + quality.limit_name.replace("_", "-")
                raise ObserverExportError(
                    model_type,
                    Stage.OPTIMIZATION,
                    f"{quantize} weights {quality.shortfall(limit)}:\n{report.table()}",
                    f"try the other quantize mode, change {quality.limit_name} ({option}) if that loss is "
                    "acceptable, or export without quantize.",
                    report=report,
                )
    return optimization.PostProcessing(optimize, quantize, fusions, kept), report


@dataclasses.dataclass
class _GraphExport:
    """One graph of the task as it goes through the stages."""

    capture: capture_stage.Capture
    example: synthesis.ExportExample
    program: torch.onnx.ONNXProgram | None = None

    def input_names(self) -> tuple[str, ...]:
        """The inputs of the file as written (after naming and the portable-cache rewrites)."""
        assert self.program is not None
        return tuple(value.name for value in self.program.model.graph.inputs)


def _validate(checking: _Checking) -> ValidationReport:
    """Every observed call replayed through its graph, then the family's runtime-class checks."""
    inputs = checking.inputs
    calls = [
        check
        for graph in checking.graphs
        for check in validation.replay_calls(
            inputs.directory / graph.capture.graph.file_name,
            graph.capture,
            graph.example,
            naming.input_names(graph.example),
            inputs.atol,
        )
    ]
    generation, runtime = [], []
    if inputs.runtime_class is not None:
        try:
            generation, runtime = checking.family.check_runtime(inputs)
        except Exception as error:
            raise ObserverExportError(
                checking.model_type,
                Stage.VALIDATION,
                f"{inputs.runtime_class.__name__} could not run the exported model: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                _runtime_failure_hint(error, checking.trust_remote_code),
                report=ValidationReport(atol=inputs.atol, calls=calls, generation=[]),
            ) from error
    report = ValidationReport(atol=inputs.atol, calls=calls, generation=generation, runtime=runtime)
    logger.debug("validation:\n%s", report.table())
    if not report.ok:
        raise ObserverExportError(
            checking.model_type,
            Stage.VALIDATION,
            f"the ONNX model does not match torch:\n{report.table()}",
            _mismatch_remedy(report),
            report=report,
        )
    return report
