"""optimum-observer: observer-driven ONNX export for Hugging Face models.

Run the model the way a user would, record what reaches `forward` with
`torch.onnx.InputObserver`, and export what was seen with `torch.onnx.export(dynamo=True)`.
"""

from .errors import ObserverExportError, Stage
from .pipeline import export
from .result import CallCheck, ExportResult, GenerationCheck, ValidationReport
from .tasks import supported_tasks

__all__ = [
    "CallCheck",
    "ExportResult",
    "GenerationCheck",
    "ObserverExportError",
    "Stage",
    "ValidationReport",
    "export",
    "supported_tasks",
]
__version__ = "0.1.0.dev0"
