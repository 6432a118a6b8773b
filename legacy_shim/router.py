"""Which exporter handles a (model_type, task) pair, and why.

Takes a :class:`RouteRequest` (model type, resolved task, library, whether the caller passed
legacy-only arguments) plus the overrides, and gives a :class:`Decision`: the exporter, the source
of the decision and the reason in words. Precedence, first match wins:

1. an explicit argument (`main_export(..., exporter="observer")`),
2. the `optimum-cli export onnx --exporter` flag,
3. the `OPTIMUM_OBSERVER_EXPORTER` environment variable,
4. the migration registry (`migrated.json`),
5. the default: legacy when optimum-onnx has an OnnxConfig for the pair, else observer when it
   exports the task, else legacy (which then reports its own unsupported-architecture error).
   Where optimum-onnx's exporter cannot run (not installed, or a transformers outside its
   declared range, such as 5.x: :func:`legacy_shim.optimum_compat.legacy_exporter_status`), the
   default is the observer for every pair it can take, and the reason says why.

`auto` at any level means "no override here".
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Mapping

from .optimum_compat import Availability, legacy_exporter_status
from .registry import MigrationRegistry, load_registry

logger = logging.getLogger(__name__)

EXPORTER_ENV_VAR = "OPTIMUM_OBSERVER_EXPORTER"


class Exporter(str, enum.Enum):
    AUTO = "auto"
    LEGACY = "legacy"
    OBSERVER = "observer"

    @classmethod
    def parse(cls, value: str | Exporter, *, where: str) -> Exporter:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(e.value for e in cls)
            raise ValueError(f"Unknown exporter {value!r} from {where}; choose one of: {choices}.") from None


class DecisionSource(str, enum.Enum):
    ARGUMENT = "explicit argument"
    CLI = "command-line flag --exporter"
    ENVIRONMENT = f"environment variable {EXPORTER_ENV_VAR}"
    REGISTRY = "migration registry"
    DEFAULT = "default rule"


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about one export.

    Attributes:
        model_type: `config.model_type` (the path when the config cannot be read).
        task: the resolved Optimum task name (never "auto").
        library_name: the library optimum inferred for the checkpoint.
        legacy_only_arguments: names of arguments the caller set that only the legacy exporter
            understands (e.g. `custom_onnx_configs`); they keep `auto` on the legacy exporter.
        unresolved: why the model type or task could not be resolved, when they could not; `auto`
            then keeps the call on the legacy exporter so that optimum-onnx reports the problem as it
            always has.
    """

    model_type: str
    task: str
    library_name: str = "transformers"
    legacy_only_arguments: tuple[str, ...] = ()
    unresolved: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    request: RouteRequest
    exporter: Exporter
    source: DecisionSource
    reason: str

    def explain(self) -> str:
        return f"{self.request.model_type} / {self.request.task} -> {self.exporter.value}: {self.reason}"


def legacy_supports(model_type: str, task: str, library_name: str = "transformers") -> bool:
    """Whether optimum-onnx registers an OnnxConfig for (model_type, task) and its exporter can run here."""
    if not legacy_exporter_status().available:
        return False
    # Importing the package registers every OnnxConfig with the TasksManager.
    import optimum.exporters.onnx.model_configs  # noqa: F401
    from optimum.exporters.tasks import TasksManager

    if model_type not in TasksManager._SUPPORTED_MODEL_TYPE:
        return False
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name=library_name
        )
    except KeyError:
        return False
    return task in supported


def observer_supports(task: str, library_name: str = "transformers") -> bool:
    import optimum_observer

    return library_name == "transformers" and task in optimum_observer.supported_tasks()


def _default(request: RouteRequest, status: Availability) -> Decision:
    pair = f"{request.model_type} / {request.task}"
    if not status.available and not request.legacy_only_arguments:
        if request.unresolved or observer_supports(request.task, request.library_name):
            return Decision(
                request,
                Exporter.OBSERVER,
                DecisionSource.DEFAULT,
                f"optimum-onnx's exporter cannot run here ({status.reason}); the observer exports {pair}"
                + (f" and reports why the model type and task could not be resolved ({request.unresolved})"
                   if request.unresolved else ""),
            )
    if request.unresolved:
        return Decision(
            request,
            Exporter.LEGACY,
            DecisionSource.DEFAULT,
            f"the model type and task could not be resolved ({request.unresolved}); "
            "optimum-onnx reports the error",
        )
    if request.legacy_only_arguments:
        args = ", ".join(request.legacy_only_arguments)
        return Decision(
            request,
            Exporter.LEGACY,
            DecisionSource.DEFAULT,
            f"the caller passed {args}, which only optimum-onnx uses"
            + ("" if status.available else f", and its exporter cannot run here ({status.reason})"),
        )
    if legacy_supports(request.model_type, request.task, request.library_name):
        return Decision(
            request,
            Exporter.LEGACY,
            DecisionSource.DEFAULT,
            f"optimum-onnx has an OnnxConfig for {pair} and {request.model_type} is not migrated",
        )
    if observer_supports(request.task, request.library_name):
        return Decision(
            request,
            Exporter.OBSERVER,
            DecisionSource.DEFAULT,
            f"optimum-onnx has no OnnxConfig for {pair} and the observer exports {request.task}",
        )
    return Decision(
        request,
        Exporter.LEGACY,
        DecisionSource.DEFAULT,
        f"neither optimum-onnx nor the observer supports {pair} ({request.library_name}); "
        + ("optimum-onnx reports the error" if status.available else f"optimum-onnx cannot run here ({status.reason})"),
    )


def decide(
    request: RouteRequest,
    *,
    argument: str | Exporter | None = None,
    cli_flag: str | Exporter | None = None,
    environ: Mapping[str, str] | None = None,
    registry: MigrationRegistry | None = None,
    legacy: Availability | None = None,
) -> Decision:
    """Picks the exporter for `request`; see the module docstring for the precedence.

    Args:
        argument: the `exporter=` argument of the Python API.
        cli_flag: the value of `--exporter` when called from `optimum-cli`.
        environ: the environment to read `OPTIMUM_OBSERVER_EXPORTER` from (`os.environ` by default).
        registry: the migration registry (the packaged one by default).
        legacy: whether optimum-onnx's exporter can run (by default read from the installed packages,
            :func:`legacy_shim.optimum_compat.legacy_exporter_status`).

    Raises:
        ValueError: an override names an unknown exporter.
    """
    environ = os.environ if environ is None else environ
    overrides = (
        (argument, DecisionSource.ARGUMENT, "exporter argument"),
        (cli_flag, DecisionSource.CLI, "--exporter"),
        (environ.get(EXPORTER_ENV_VAR) or None, DecisionSource.ENVIRONMENT, EXPORTER_ENV_VAR),
    )
    for value, source, where in overrides:
        if value is None:
            continue
        exporter = Exporter.parse(value, where=where)
        if exporter is not Exporter.AUTO:
            return Decision(request, exporter, source, f"{where}={exporter.value} was set")

    registry = load_registry() if registry is None else registry
    entry = registry.find(request.model_type, request.task)
    if entry is not None:
        return Decision(
            request,
            Exporter.OBSERVER,
            DecisionSource.REGISTRY,
            f"{request.model_type} was migrated to the observer in {entry.since} ({entry.evidence})",
        )
    return _default(request, legacy_exporter_status() if legacy is None else legacy)


def explain(model_type: str, task: str, **overrides) -> str:
    """The decision for (model_type, task) in words, e.g. for `--help`-style diagnostics.

    `overrides` are those of :func:`decide` (argument, cli_flag, environ, registry, legacy).
    """
    return decide(RouteRequest(model_type, task), **overrides).explain()
