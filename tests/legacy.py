"""What the legacy exporter (optimum-onnx) supports, for the coverage tests."""

from __future__ import annotations

import optimum.exporters.onnx.model_configs  # noqa: F401  (fills TasksManager's onnx registry)
from optimum.exporters.tasks import TasksManager


def legacy_tasks(model_type: str) -> set[str]:
    """The tasks optimum-onnx has an OnnxConfig for, for `model_type` (empty when none)."""
    try:
        return set(
            TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx", library_name="transformers")
        )
    except KeyError:
        return set()
