"""Whether optimum-onnx can run on the installed transformers, and its runtime classes where it cannot.

Takes the installed distributions (read from their metadata, nothing imported) and gives:

- :func:`legacy_exporter_status`: an :class:`Availability` saying whether optimum-onnx's exporter
  can run here, and why not (optimum-onnx 0.1.0 declares `transformers<4.58`; on transformers 5
  its exporter fails at import, `convert.py` importing `get_parameter_dtype`, and its model
  patchers target 4.x internals). The router sends every pair to the observer when it cannot.
- :func:`import_optimum_modules`: imports optimum-onnx's modules (by default
  `optimum.onnxruntime`'s model modules, which the shim's classes subclass). On a
  transformers its release does not support, five names those modules import at module level
  are gone (:data:`MISSING_NAMES`); they are lent to transformers for the duration of the
  import only, then removed, so transformers itself is left as it was. Two have a transformers 5
  equivalent (`is_offline_mode`, `AutoModelForVision2Seq`); the other three belong to
  optimum-onnx's exporter, which cannot run here, and raise a clear error when called.

The runtime seams transformers 5 changed (the cache reaches `forward` as `cache=`; generate
drops an all-ones attention mask) are handled where the shim's classes are defined
(:mod:`legacy_shim.modeling`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version

LEGACY_DISTRIBUTION = "optimum-onnx"
#: The `optimum.onnxruntime` modules the shim's runtime classes subclass from.
RUNTIME_MODULES = (
    "optimum.onnxruntime.base",
    "optimum.onnxruntime.modeling",
    "optimum.onnxruntime.modeling_decoder",
    "optimum.onnxruntime.modeling_seq2seq",
)


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether optimum-onnx's exporter can run; `reason` says why not, in words."""

    available: bool
    reason: str = ""


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def transformers_requirement_unmet(distribution: str = LEGACY_DISTRIBUTION) -> str:
    """Why the installed transformers is outside `distribution`'s declared range ('' when inside)."""
    declared = [
        Requirement(line)
        for line in importlib.metadata.requires(distribution) or ()
        if Requirement(line).name == "transformers" and Requirement(line).marker is None
    ]
    installed = _installed_version("transformers")
    for requirement in declared:
        if installed is not None and not requirement.specifier.contains(Version(installed), prereleases=True):
            return (
                f"{distribution} {_installed_version(distribution)} requires {requirement}, "
                f"and transformers {installed} is installed"
            )
    return ""


@functools.cache
def legacy_exporter_status() -> Availability:
    """Whether optimum-onnx's exporter can run with the installed packages (computed once)."""
    if _installed_version(LEGACY_DISTRIBUTION) is None:
        return Availability(False, f"{LEGACY_DISTRIBUTION} is not installed")
    unmet = transformers_requirement_unmet()
    if unmet:
        return Availability(False, unmet)
    return Availability(True)


class LegacyExporterUnavailable(RuntimeError):
    """optimum-onnx's exporter was called where it cannot run."""


def _exporter_only(name: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise LegacyExporterUnavailable(
            f"optimum-onnx's exporter needs transformers.{name}, which this transformers does not have "
            f"({legacy_exporter_status().reason}). Export with the observer instead: "
            "legacy_shim.main_export(..., exporter='observer') or `optimum-observer export`."
        )

    unavailable.__name__ = name
    return unavailable


class _ExporterOnlyClass:
    """Stands for a transformers class only optimum-onnx's exporter uses; cannot be instantiated."""

    def __init__(self, *args: Any, **kwargs: Any):
        _exporter_only(type(self).__name__)()


def _missing_names() -> dict[tuple[str, str], Callable[[], Any]]:
    """(module, name) -> what to lend there while optimum.onnxruntime imports."""

    def is_offline_mode() -> Any:
        from huggingface_hub import constants

        return constants.is_offline_mode

    def vision2seq() -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    return {
        ("transformers.utils", "is_offline_mode"): is_offline_mode,
        ("transformers", "AutoModelForVision2Seq"): vision2seq,
        ("transformers.modeling_utils", "get_parameter_dtype"): lambda: _exporter_only("get_parameter_dtype"),
        ("transformers.utils.generic", "_CAN_RECORD_REGISTRY"): dict,
        ("transformers.utils.generic", "OutputRecorder"): lambda: type(
            "OutputRecorder", (_ExporterOnlyClass,), {}
        ),
    }


#: The names optimum-onnx 0.1.0's runtime modules import that transformers 5 removed.
MISSING_NAMES = tuple(_missing_names())


@contextlib.contextmanager
def _lent(owner: Any, name: str, value: Any) -> Iterator[bool]:
    """Sets `owner.name = value` for the block when `owner` has no `name`, then deletes it (also
    when the block raises); yields whether it lent. An existing attribute is never touched."""
    if hasattr(owner, name):
        yield False
        return
    setattr(owner, name, value)
    try:
        yield True
    finally:
        delattr(owner, name)


@contextlib.contextmanager
def lent_names() -> Iterator[list[tuple[str, str]]]:
    """Lends transformers the :data:`MISSING_NAMES` it lacks for the block; removes them after,
    also when the block raises. Yields the (module, name) pairs that were lent."""
    with contextlib.ExitStack() as stack:
        pairs = []
        for (module_name, name), make in _missing_names().items():
            module = importlib.import_module(module_name)
            if not hasattr(module, name):
                stack.enter_context(_lent(module, name, make()))
                pairs.append((module_name, name))
        yield pairs


@contextlib.contextmanager
def lent_generation_parameters() -> Iterator[bool]:
    """`PreTrainedConfig._get_non_default_generation_parameters` for the block, where transformers
    lacks it.

    Fixes: `ORTModelForCausalLM` / `ORTModelForConditionalGeneration._from_pretrained` (optimum-onnx
    0.1.0) call it on every load, and transformers 5 renamed it `_get_generation_parameters` (the
    generation parameters set in a model config): loading fails with "AttributeError: 'LlamaConfig'
    object has no attribute '_get_non_default_generation_parameters'". Lent as the renamed method.
    """
    from transformers import PretrainedConfig

    renamed = getattr(PretrainedConfig, "_get_generation_parameters", None)
    if renamed is None:
        yield False
        return
    with _lent(PretrainedConfig, "_get_non_default_generation_parameters", renamed) as lent:
        yield lent


def _import_with_lent_names(modules: tuple[str, ...]) -> None:
    for attempt in range(2):
        lent_to = sys.modules.get("transformers")
        try:
            with lent_names():
                for module in modules:
                    importlib.import_module(module)
            return
        except ImportError:
            # transformers 5 can put a new module object in sys.modules["transformers"] while
            # optimum-onnx's modules import (its __init__ installs a fresh _LazyModule when it runs
            # again): the names lent to the old object are then missing ("cannot import name
            # 'AutoModelForVision2Seq' from 'transformers'"). Lend them again to the current one and
            # import what is left, once.
            if attempt or sys.modules.get("transformers") is lent_to:
                raise


def import_optimum_modules(modules: tuple[str, ...] = RUNTIME_MODULES) -> None:
    """Imports `modules` of optimum-onnx, lending transformers the names they need when it lacks them.

    Raises:
        ImportError: optimum-onnx is not installed, or fails to import for another reason; the
            message says which install works.
    """
    try:
        _import_with_lent_names(modules)
    except ImportError as error:
        status = legacy_exporter_status()
        why = f" ({status.reason})" if not status.available else ""
        raise ImportError(
            f"legacy_shim builds on optimum-onnx ({', '.join(modules)}), which could not be imported{why}: "
            f"{error}. Install the project as README.md says for your transformers version "
            "(constraints.txt for 4.57, requirements-transformers5.txt for 5.x)."
        ) from error
