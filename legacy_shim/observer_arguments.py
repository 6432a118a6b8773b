"""Maps the arguments of optimum-onnx's `main_export` onto `optimum_observer.export`.

Takes the arguments of one `main_export` call and gives the keyword arguments of
`optimum_observer.export`, or a :class:`~legacy_shim.errors.ShimError` listing every argument
that has no meaning for an observer export (rather than silently dropping it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ShimError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LegacyOnlyArgument:
    """An argument the observer cannot honour; any value but the accepted ones is rejected."""

    name: str
    accepted: tuple[Any, ...]
    why: str


LEGACY_ONLY_ARGUMENTS = (
    LegacyOnlyArgument(
        "optimize",
        (None,),
        "ONNX Runtime optimizations are a separate step for observer exports: run "
        "`optimum-cli onnxruntime optimize` (or ORTOptimizer) on the output",
    ),
    LegacyOnlyArgument("monolith", (False,), "the observer always writes one model.onnx; drop the argument"),
    LegacyOnlyArgument(
        "pad_token_id", (None,), "it is only used by optimum-onnx's text-classification export"
    ),
    LegacyOnlyArgument(
        "force_download", (False,), "the observer loads from the cache as is; delete the cached files instead"
    ),
    LegacyOnlyArgument(
        "custom_onnx_configs",
        (None,),
        "the observer derives inputs and outputs from an observed run, not from an OnnxConfig",
    ),
    LegacyOnlyArgument(
        "fn_get_submodels",
        (None,),
        "the observer exports the model the task names, without submodel splitting",
    ),
    LegacyOnlyArgument("_variant", ("default",), "OnnxConfig variants do not exist for observer exports"),
    LegacyOnlyArgument(
        "no_dynamic_axes",
        (False,),
        "observer exports keep dynamic every dimension the observed run showed to vary",
    ),
    LegacyOnlyArgument(
        "do_constant_folding", (True,), "the dynamo exporter always folds constants; it cannot be turned off"
    ),
    LegacyOnlyArgument(
        "slim", (False,), "onnxslim is not run on observer exports; run it on the output instead"
    ),
    LegacyOnlyArgument("framework", ("pt", None), "the observer exports PyTorch models only"),
    LegacyOnlyArgument(
        "library_name", (None, "transformers"), "the observer exports transformers models only"
    ),
)

# Arguments that change nothing for an observer export: the request is already satisfied.
IGNORED_ARGUMENTS = {
    "no_post_process": "the observer never merges or post-processes decoders",
    "use_subprocess": "the observer validates in-process",
}


def _default_dummy_shapes() -> Mapping[str, int]:
    from optimum.utils import DEFAULT_DUMMY_SHAPES

    return DEFAULT_DUMMY_SHAPES


def observer_arguments(
    arguments: Mapping[str, Any],
    kwargs_shapes: Mapping[str, Any],
    *,
    task: str,
    model_name: str,
    default_shapes: Callable[[], Mapping[str, int]] = _default_dummy_shapes,
) -> dict[str, Any]:
    """Keyword arguments for `optimum_observer.export` from a `main_export` call.

    Args:
        arguments: `main_export`'s named arguments (without `exporter` and `**kwargs_shapes`).
        kwargs_shapes: the dummy-input shapes; `optimum-cli` always passes the defaults, which
            are accepted, while any other value is rejected (the observer uses observed shapes).
        task: the resolved task (never "auto").
        model_name: the model type or path, for error messages.

    Raises:
        ShimError: listing every argument the observer cannot honour.
    """
    problems = [
        f"{arg.name}={arguments[arg.name]!r}: {arg.why}"
        for arg in LEGACY_ONLY_ARGUMENTS
        if not any(arguments[arg.name] is ok or arguments[arg.name] == ok for ok in arg.accepted)
    ]
    shapes = default_shapes()
    problems += [
        f"{name}={value!r}: dummy input shapes do not apply, the observer exports from an observed run"
        for name, value in kwargs_shapes.items()
        if shapes.get(name, object()) != value
    ]
    if problems:
        raise ShimError(
            model_name,
            "argument mapping",
            "the observer exporter cannot honour: " + "; ".join(problems) + ".",
            "drop these arguments, or pass exporter='legacy' (CLI: --exporter legacy) if optimum-onnx "
            "supports this model.",
        )
    for name, why in IGNORED_ARGUMENTS.items():
        if arguments[name]:
            logger.debug("Ignoring %s=%r for the observer exporter: %s.", name, arguments[name], why)

    mapped: dict[str, Any] = {
        "model": arguments["model_name_or_path"],
        "output_dir": arguments["output"],
        "task": task,
        "opset": arguments["opset"],
        "dtype": arguments["dtype"],
        "device": arguments["device"],
        "trust_remote_code": arguments["trust_remote_code"],
        "model_kwargs": arguments["model_kwargs"],
        "validate": arguments["do_validation"],
        "local_files_only": arguments["local_files_only"],
        "cache_dir": arguments["cache_dir"],
        "revision": arguments["revision"],
        "token": arguments["token"],
        "subfolder": arguments["subfolder"],
    }
    if arguments["atol"] is not None:
        mapped["atol"] = arguments["atol"]
    return mapped
