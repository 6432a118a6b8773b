"""The observer export, stage by stage: load, capture, synthesize, export, name, package, validate."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import capture as capture_stage
from . import conversion, loading, naming, packaging, synthesis, validation
from .cache_pytree import registered_caches
from .errors import ObserverExportError, Stage
from .result import ExportResult, ValidationReport
from .tasks import TaskContract, get_task

logger = logging.getLogger(__name__)


class _Progress:
    """Times each stage and shows it on a progress bar when asked to."""

    def __init__(self, show: bool):
        self.timings: dict[str, float] = {}
        self._bar = tqdm(total=len(Stage), desc="observer export", unit="stage", disable=not show)

    @contextlib.contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        self._bar.set_postfix_str(stage.value)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage.value] = time.perf_counter() - start
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


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
        runtime_class: class whose `from_pretrained(dir)` loads the export for the generation
            check; defaults to the unchanged `optimum.onnxruntime` class of the task.

    Raises:
        ObserverExportError: naming the model type, the stage and what to try next.
    """
    contract = get_task(task)
    hub_kwargs = dict(
        local_files_only=local_files_only, cache_dir=cache_dir, revision=revision, token=token, subfolder=subfolder
    )
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v not in (None, "")}
    progress = _Progress(sys.stderr.isatty() if show_progress is None else show_progress)
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
            )
        model_type = loaded.model_type
        with registered_caches():
            with progress.stage(Stage.CAPTURE):
                captured = capture_stage.capture(loaded.model, contract, model_type, run, loaded.tokenizer)
            with progress.stage(Stage.SYNTHESIS):
                example = synthesis.synthesize(captured, contract, model_type)
            with progress.stage(Stage.EXPORT):
                program = conversion.convert(loaded.model, contract, example, model_type, opset)
        with progress.stage(Stage.NAMING):
            dynamic_axes = naming.apply_names(program, contract, example, model_type)
        with packaging.staged_output(output_dir) as staging:
            with progress.stage(Stage.PACKAGING):
                onnx_files = packaging.write_model(program, staging)
                packaging.write_configs(loaded.model, loaded.tokenizer, staging)
            with progress.stage(Stage.VALIDATION):
                report = (
                    _validate(staging, loaded, captured, example, contract, atol, runtime_class)
                    if validate
                    else None
                )
    finally:
        progress.close()
    return ExportResult(
        output_dir=Path(output_dir).resolve(),
        model_type=model_type,
        task=task,
        onnx_files=onnx_files,
        dynamic_axes=dynamic_axes,
        validation=report,
        timings=progress.timings,
    )


def _validate(
    staging: Path,
    loaded: loading.LoadedModel,
    captured: capture_stage.Capture,
    example: synthesis.ExportExample,
    contract: TaskContract,
    atol: float,
    runtime_class: Any,
) -> ValidationReport:
    calls = validation.replay_calls(
        staging / packaging.ONNX_FILE, captured, example, contract, naming.input_names(example), atol
    )
    runtime_class = runtime_class or validation.default_runtime_class(contract)
    generation = []
    if runtime_class is not None:
        try:
            generation = validation.check_generation(
                staging,
                loaded.model,
                loaded.tokenizer,
                runtime_class,
                capture_stage.pad_token_id(loaded.model, loaded.tokenizer),
            )
        except Exception as error:
            raise ObserverExportError(
                loaded.model_type,
                Stage.VALIDATION,
                f"{runtime_class.__name__} could not generate with the exported model: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                "if the error is about past_key_values dimensions, the runtime sized its first-step "
                "cache from the config: load the export with legacy_shim.ORTModelForCausalLM, which "
                "reads it from the graph; pass validate=False to keep the file anyway.",
            ) from error
    report = ValidationReport(atol=atol, calls=calls, generation=generation)
    logger.info("validation:\n%s", report.table())
    if not report.ok:
        raise ObserverExportError(
            loaded.model_type,
            Stage.VALIDATION,
            f"the ONNX model does not match torch:\n{report.table()}",
            "raise atol for reduced precision, or report the model type; pass validate=False to "
            "keep the file anyway.",
        )
    return report
