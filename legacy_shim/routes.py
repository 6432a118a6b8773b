"""The two ways to export a `main_export` call, each a small strategy behind one interface.

Shaped after torch's `_capture_strategies.py`: a route takes an :class:`ExportCall` and the
:class:`~legacy_shim.router.Decision` that chose it, and gives a :class:`RouteResult`
(success, the exception when it failed, timing, and the observer's own result when it ran).
Routes never fall back to each other: a failure is reported, not hidden.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ShimError
from .observer_arguments import observer_arguments
from .optimum_compat import legacy_exporter_status
from .router import Decision, Exporter, observer_supports

logger = logging.getLogger(__name__)

# Marks the wrapper that the unchanged-code hook puts in place of optimum-onnx's `main_export`.
WRAPPED_MARKER = "_legacy_shim_wraps"


@dataclasses.dataclass(frozen=True)
class ExportCall:
    """One `main_export` call.

    Attributes:
        arguments: every named parameter of optimum-onnx's `main_export`, as the caller set it.
        kwargs_shapes: its `**kwargs_shapes`.
        model_type: `config.model_type`, or None when the config could not be read.
        task: the resolved task (the caller's task when it could not be resolved).
    """

    arguments: Mapping[str, Any]
    kwargs_shapes: Mapping[str, Any]
    model_type: str | None
    task: str

    @property
    def model_name(self) -> str:
        return self.model_type or str(self.arguments["model_name_or_path"])


@dataclasses.dataclass(frozen=True)
class RouteResult:
    """What one route did: `observer_result` is the `optimum_observer.ExportResult` when it ran."""

    route: Exporter
    decision: Decision
    success: bool
    exception: BaseException | None = None
    elapsed: float = 0.0
    observer_result: Any = None


def upstream_main_export() -> Callable[..., None]:
    """optimum-onnx's own `main_export`, also when the unchanged-code hook has wrapped it."""
    module = importlib.import_module("optimum.exporters.onnx.__main__")
    function = module.main_export
    return getattr(function, WRAPPED_MARKER, function)


class ExportRoute(abc.ABC):
    exporter: Exporter

    def __call__(self, call: ExportCall, decision: Decision) -> RouteResult:
        start = time.perf_counter()
        try:
            observer_result = self._export(call)
        except Exception as e:  # reported in the result; main_export re-raises it unchanged
            return RouteResult(self.exporter, decision, False, e, time.perf_counter() - start)
        return RouteResult(self.exporter, decision, True, None, time.perf_counter() - start, observer_result)

    @abc.abstractmethod
    def _export(self, call: ExportCall) -> Any: ...


class LegacyRoute(ExportRoute):
    """optimum-onnx's `main_export`, called with exactly the caller's arguments."""

    exporter = Exporter.LEGACY

    def _export(self, call: ExportCall) -> None:
        status = legacy_exporter_status()
        if not status.available:
            import optimum_observer

            raise ShimError(
                call.model_name,
                "routing",
                f"the call went to optimum-onnx's exporter, which cannot run here ({status.reason}).",
                "export with the observer: exporter='observer' (CLI: `optimum-observer export`, or `optimum-cli "
                "export onnx --exporter observer`), without legacy-only arguments such as custom_onnx_configs; "
                f"it exports {', '.join(optimum_observer.supported_tasks())}. To use optimum-onnx, install "
                "transformers 4.57 (pip install -c constraints.txt, see README.md).",
            )
        upstream_main_export()(**call.arguments, **call.kwargs_shapes)


class ObserverRoute(ExportRoute):
    """`optimum_observer.export` with the legacy arguments mapped onto it."""

    exporter = Exporter.OBSERVER

    def _export(self, call: ExportCall) -> Any:
        import optimum_observer

        task = call.task
        if task == "auto":
            # The config could not be read to infer the task; the observer's load stage says why.
            task = optimum_observer.supported_tasks()[0]
        elif not observer_supports(task):
            raise ShimError(
                call.model_name,
                "routing",
                f"the observer exporter does not export the task {call.task!r} "
                f"(it exports: {', '.join(optimum_observer.supported_tasks())}).",
                "use the legacy exporter (exporter='legacy', CLI --exporter legacy) if optimum-onnx supports "
                "this model and task, or pick one of the tasks above.",
            )
        kwargs = observer_arguments(call.arguments, call.kwargs_shapes, task=task, model_name=call.model_name)
        return optimum_observer.export(**kwargs, runtime_class=_runtime_class(task))


def _runtime_class(task: str) -> type:
    """The shim's runtime class for the task, so that validation feeds the first-step cache the
    way users of this package load the export (sized from the graph, not from the config)."""
    from optimum_observer.tasks import get_task

    from . import runtime

    return getattr(runtime, get_task(task).runtime_class)


ROUTES: dict[Exporter, ExportRoute] = {route.exporter: route for route in (LegacyRoute(), ObserverRoute())}
