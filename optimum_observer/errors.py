"""Errors raised by the observer stack.

Every failure names the model type, the stage that failed and what to try next, in the spirit
of torch's exporter ("This is step 2/3 of exporting the model to ONNX. Next steps: ...").
"""

from __future__ import annotations

import enum
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
    EXPORT = "torch.export / ONNX conversion"
    NAMING = "naming"
    PACKAGING = "packaging"
    VALIDATION = "validation"
    #: optional: fusions and quantization of the validated files, and their checks.
    OPTIMIZATION = "optimization / quantization"

    @property
    def number(self) -> int:
        return list(Stage).index(self) + 1


class ObserverExportError(RuntimeError):
    """An export failed at one stage.

    Attributes:
        model_type: the `config.model_type` of the model (or the path when unknown).
        stage: the stage that failed.
        reason: what went wrong, in one or two sentences.
        remedy: what the user can try next.
        report: for a validation failure, the report of the checks that ran (the
            observed-call replay; the runtime class's checks when they ran), else None.
    """

    def __init__(self, model_type: str, stage: Stage, reason: str, remedy: str, report: ValidationReport | None = None):
        self.model_type = model_type
        self.stage = stage
        self.reason = reason
        self.remedy = remedy
        self.report = report
        super().__init__(
            f"[{model_type}] observer export failed at stage {stage.number}/{len(Stage)} "
            f"({stage.value}): {reason}\nNext steps: {remedy}"
        )
