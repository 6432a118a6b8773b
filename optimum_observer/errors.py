"""Errors raised by the observer stack.

Every failure names the model type, the stage that failed and what to try next, in the spirit
of torch's exporter ("This is step 2/3 of exporting the model to ONNX. Next steps: ...").
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import ValidationReport

#: How a capture failure starts when the model's own run fails, observer or not.
RUN_FAILS_WITHOUT_OBSERVER = "the run raises without the observer too"


class Stage(str, enum.Enum):
    """The stages of an observer export, in the order they run."""

    LOAD = "load"
    CAPTURE = "capture"
    SYNTHESIS = "example synthesis"
    #: step 1 of `torch.onnx.export(dynamo=True)`: torch.export captures the graph (its guards
    #: included: an axis it bounded below an observed size fails here).
    TORCH_EXPORT = "torch.export"
    #: steps 2 and 3: decompositions and translation of the exported program to ONNX, at the opset.
    ONNX_CONVERSION = "ONNX conversion"
    NAMING = "naming"
    PACKAGING = "packaging"
    VALIDATION = "validation"
    #: optional: fusions and quantization of the validated files, and their checks.
    OPTIMIZATION = "optimization / quantization"

    @property
    def number(self) -> int:
        return list(Stage).index(self) + 1


class ErrorKind(str, enum.Enum):
    """What kind of failure, beside where (the stage): for code that acts on failures."""

    #: the stage could not do its work for this model or these arguments (the reason says why).
    FAILED = "failed"
    #: the model's own run raises in plain PyTorch too, so the observer is not the cause.
    MODEL_RUN = RUN_FAILS_WITHOUT_OBSERVER
    #: an exception no stage expected (a bug here or in a library underneath), chained as the cause.
    INTERNAL = "internal error"


class ObserverExportError(RuntimeError):
    """An export failed at one stage.

    Attributes:
        model_type: the `config.model_type` of the model (or the path when unknown).
        stage: the stage that failed.
        reason: what went wrong, in one or two sentences.
        remedy: what the user can try next.
        report: for a validation failure, the report of the checks that ran (the
            observed-call replay; the runtime class's checks when they ran), else None.
        kind: what kind of failure (:class:`ErrorKind`).
    """

    def __init__(
        self,
        model_type: str,
        stage: Stage,
        reason: str,
        remedy: str,
        report: ValidationReport | None = None,
        kind: ErrorKind = ErrorKind.FAILED,
    ):
        self.model_type = model_type
        self.stage = stage
        self.reason = reason
        self.remedy = remedy
        self.report = report
        self.kind = kind
        super().__init__(
            f"[{model_type}] observer export failed at stage {stage.number}/{len(Stage)} "
            f"({stage.value}): {reason}\nNext steps: {remedy}"
        )


def internal_error(model_type: str, stage: Stage, error: Exception) -> ObserverExportError:
    """The error of an exception `stage` did not expect (the caller chains it as the cause)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    detail = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return ObserverExportError(
        model_type,
        stage,
        f"internal error: {detail}",
        "this is a bug in optimum-observer or in a library it calls: rerun with --verbose (or logging "
        "at DEBUG) for the traceback, and report it with the model type and the versions of torch "
        "and transformers.",
        kind=ErrorKind.INTERNAL,
    )


@contextlib.contextmanager
def stage_errors(model_type: str, stage: Stage) -> Iterator[None]:
    """Inside the block, an exception other than an :class:`ObserverExportError` comes out as one
    of `stage` (:func:`internal_error`). Only `Exception`: Ctrl-C and the termination signals'
    `SystemExit` (:mod:`optimum_observer.signals`) pass through unchanged."""
    try:
        yield
    except ObserverExportError:
        raise
    except Exception as error:
        raise internal_error(model_type, stage, error) from error
