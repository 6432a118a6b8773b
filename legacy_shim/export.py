"""`main_export` with optimum-onnx 0.1.0's exact signature, plus `exporter=`.

Takes the same arguments as `optimum.exporters.onnx.main_export`, resolves the model type and
task the way optimum-onnx does, asks the router which exporter handles the pair, runs that route
and gives its :class:`~legacy_shim.routes.RouteResult` (optimum-onnx's own `main_export` returns
None; callers that ignore the return value see no difference).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE

from .router import Decision, Exporter, RouteRequest, decide, legacy_supports, observer_supports
from .routes import ROUTES, ExportCall, RouteResult

if TYPE_CHECKING:
    from optimum.exporters.onnx.base import OnnxConfig

logger = logging.getLogger(__name__)

# Arguments that make sense only to optimum-onnx: when set, `auto` keeps the call on it.
_LEGACY_ONLY_WHEN_SET = ("custom_onnx_configs", "fn_get_submodels")


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The model type and task of a call, resolved as optimum-onnx resolves them.

    `error` holds why the config could not be read; the call then goes where the overrides say,
    legacy by default, so that optimum-onnx reports the problem exactly as it always has.
    """

    model_type: str | None
    task: str
    library_name: str
    error: BaseException | None = None


def resolve(arguments: Mapping[str, Any]) -> Resolution:
    """Reads the config and resolves `task="auto"` (adding `-with-past` as optimum-onnx does)."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    model = arguments["model_name_or_path"]
    hub = {k: arguments[k] for k in ("subfolder", "revision", "cache_dir", "token")}
    task = TasksManager.map_from_synonym(arguments["task"])
    library_name = arguments["library_name"]
    try:
        if library_name is None:
            library_name = TasksManager.infer_library_from_model(model, **hub)
        if library_name != "transformers":
            return Resolution(None, task, library_name)
        config = AutoConfig.from_pretrained(
            model,
            local_files_only=arguments["local_files_only"],
            force_download=arguments["force_download"],
            trust_remote_code=arguments["trust_remote_code"],
            **hub,
        )
        model_type = config.model_type
        if task == "auto":
            task = TasksManager.infer_task_from_model(model, library_name=library_name, **hub)
            task = _with_past_default(model_type, task, monolith=arguments["monolith"])
    except Exception as e:  # reported by whichever exporter the call is routed to
        logger.debug("Could not resolve model type and task of %s: %s", model, e)
        return Resolution(None, task, library_name or "transformers", e)
    return Resolution(model_type, task, library_name)


def _with_past_default(model_type: str, task: str, *, monolith: bool) -> str:
    # optimum-onnx turns an inferred task into its -with-past variant when it supports that;
    # for types it does not support at all, the observer's support decides the same way.
    with_past = f"{task}-with-past"
    if monolith:
        return task
    if legacy_supports(model_type, task):
        return with_past if legacy_supports(model_type, with_past) else task
    return with_past if observer_supports(with_past) else task


def run_export(
    arguments: Mapping[str, Any],
    kwargs_shapes: Mapping[str, Any],
    *,
    argument: str | Exporter | None = None,
    cli_flag: str | Exporter | None = None,
) -> RouteResult:
    """Routes one `main_export` call and runs it; re-raises the route's exception unchanged.

    Args:
        arguments: the named parameters of optimum-onnx's `main_export`.
        kwargs_shapes: its `**kwargs_shapes`.
        argument, cli_flag: the overrides of :func:`legacy_shim.router.decide`.
    """
    resolution = resolve(arguments)
    request = RouteRequest(
        model_type=resolution.model_type or str(arguments["model_name_or_path"]),
        task=resolution.task,
        library_name=resolution.library_name,
        legacy_only_arguments=tuple(name for name in _LEGACY_ONLY_WHEN_SET if arguments[name] is not None),
        unresolved=""
        if resolution.error is None
        else f"{type(resolution.error).__name__}: {resolution.error}",
    )
    decision: Decision = decide(request, argument=argument, cli_flag=cli_flag)
    logger.info("optimum-observer router: %s", decision.explain())
    call = ExportCall(arguments, kwargs_shapes, resolution.model_type, resolution.task)
    result = ROUTES[decision.exporter](call, decision)
    if not result.success:
        raise result.exception
    logger.info("%s export of %s finished in %.1f s", result.route.value, call.model_name, result.elapsed)
    return result


def main_export(
    model_name_or_path: str,
    output: str | Path,
    task: str = "auto",
    opset: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    optimize: str | None = None,
    monolith: bool = False,
    no_post_process: bool = False,
    framework: str | None = "pt",
    atol: float | None = None,
    pad_token_id: int | None = None,
    # hub options
    subfolder: str = "",
    revision: str = "main",
    force_download: bool = False,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str = HUGGINGFACE_HUB_CACHE,
    token: bool | str | None = None,
    ########################################
    do_validation: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    custom_onnx_configs: dict[str, OnnxConfig] | None = None,
    fn_get_submodels: Callable | None = None,
    use_subprocess: bool = False,
    _variant: str = "default",
    library_name: str | None = None,
    no_dynamic_axes: bool = False,
    do_constant_folding: bool = True,
    slim: bool = False,
    exporter: str = "auto",
    **kwargs_shapes,
) -> RouteResult:
    """optimum-onnx's `main_export` (same parameters, see its docstring), routed per model type.

    Args:
        exporter: "auto" (the router decides: optimum-onnx for the pairs it supports and that are
            not migrated, the observer otherwise), "legacy" (optimum-onnx, unchanged) or
            "observer" (`optimum_observer.export`; legacy-only arguments such as
            `custom_onnx_configs` are rejected with a clear error).

    Returns:
        What the chosen route did, including the decision and its reason.
    """
    # Every named parameter, as the caller set it: forwarded as is to optimum-onnx.
    arguments = {name: value for name, value in locals().items() if name not in ("exporter", "kwargs_shapes")}
    return run_export(arguments, kwargs_shapes, argument=exporter)


_SIGNATURE = inspect.signature(main_export)


def bind_arguments(args: tuple, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Splits a call written against `main_export`'s signature into (arguments, kwargs_shapes, exporter)."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    kwargs_shapes = values.pop("kwargs_shapes")
    exporter = values.pop("exporter")
    return values, kwargs_shapes, exporter
