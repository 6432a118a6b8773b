"""Errors raised by the shim itself (routing and argument mapping).

Failures inside an exporter keep their own type: optimum-onnx's errors pass through unchanged
and the observer raises `optimum_observer.ObserverExportError`.
"""

from __future__ import annotations


class ShimError(ValueError):
    """A call could not be routed or mapped onto the chosen exporter.

    Attributes:
        model: the model id, path or type the call was about.
        stage: "routing" or "argument mapping".
        reason: what is wrong.
        remedy: what to do instead.
    """

    def __init__(self, model: str, stage: str, reason: str, remedy: str):
        self.model = model
        self.stage = stage
        self.reason = reason
        self.remedy = remedy
        super().__init__(f"[{model}] {stage}: {reason}\nNext steps: {remedy}")
