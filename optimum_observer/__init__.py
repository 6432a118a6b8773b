"""optimum-observer: observer-driven ONNX export for Hugging Face models.

Run the model the way a user would, record what reaches `forward` with
`torch.onnx.InputObserver`, and export what was seen with `torch.onnx.export(dynamo=True)`.

`import optimum_observer` stays light: the export pipeline (torch, transformers, onnxscript) is
imported when :func:`export` is first looked up (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ErrorKind, ObserverExportError, Stage
from .result import CallCheck, ExportResult, GenerationCheck, ValidationReport
from .tasks import supported_tasks

if TYPE_CHECKING:
    from .pipeline import export

__all__ = [
    "CallCheck",
    "ErrorKind",
    "ExportResult",
    "GenerationCheck",
    "ObserverExportError",
    "Stage",
    "ValidationReport",
    "export",
    "supported_tasks",
]
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name == "export":
        from .pipeline import export

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
