"""The legacy export path for sweeps and comparisons: optimum-onnx's `main_export`, validated.

Takes: a saved model directory and a task. Gives: a `legacy_shim.tooling.sweep.PathResult`
(the sweep's JSON result format): the legacy export through optimum-onnx's unchanged
`main_export`, then the unchanged `optimum.onnxruntime` class loading it, logits on the same
inputs as torch (numerical parity), and greedy generation token for token (generation parity).
The sweep runs it with the unchanged-code hook off, so both are optimum-onnx as it ships.

The check uses the runtime class the way optimum-onnx's users do: an input the class takes from
its caller without computing it (`position_ids` of ORTModelForFeatureExtraction) is fed, the same
values to torch and to the runtime. A failure names who failed: optimum-onnx's exporter
(`main_export`), optimum-onnx's runtime class (it raised, cannot feed an input its own export
takes, or differs from torch), or the sweep's check, when it raises outside the runtime class
(the torch model refuses its inputs, a second modality or boxes; or it cannot build inputs for
the model): that export is recorded as "exported, not validated", not as a failure.

It lives in `legacy_shim` because `optimum_observer` must not import optimum-onnx's exporter:
the sweep runs it as a command,

    python -m legacy_shim.tooling.legacy_runner supported --task text-generation-with-past
    python -m legacy_shim.tooling.legacy_runner run MODEL_DIR --task T --output DIR --result FILE.json
    python -m legacy_shim.tooling.legacy_runner observer MODEL_TYPE --task T --workdir DIR --result FILE.json

`observer` is the sweep's observer path validated through legacy_shim's runtime class instead of
the unchanged one: the sweep runs it when the unchanged runtime fails to load or generate with
an export (state caches, cache sizes it reads from the config, configs it cannot load back).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from optimum_observer.families import family_of
from optimum_observer.tasks import get_task
from optimum_observer.validation import ValidationInputs

from .sweep import (
    PathResult,
    Status,
    SweepStage,
    failed_check,
    first_line,
    onnx_bytes,
    run_observer_path,
    runtime_class,
    shim_runtime_class,
)
from .tiny_configs import SHAPES

logger = logging.getLogger(__name__)

ATOL = 1e-4


def supported_model_types(task: str) -> list[str]:
    """The model types optimum-onnx has an OnnxConfig for, for `task`."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the OnnxConfigs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(task, exporter="onnx"))


def load_torch_model(model_dir: Path, task: str) -> Any:
    import transformers

    auto_class = getattr(transformers, get_task(task).auto_model_class)
    return auto_class.from_pretrained(model_dir).eval()


def load_feature_extractor(model_dir: Path) -> Any | None:
    """The feature extractor saved with the model (the sweep saves a speech model's), or None."""
    import transformers

    if not (Path(model_dir) / "preprocessor_config.json").is_file():
        return None
    return transformers.AutoFeatureExtractor.from_pretrained(model_dir)


class OptimumRuntimeError(RuntimeError):
    """optimum-onnx's runtime class raised while loading or running an export."""


class _Blamed:
    """A runtime class, or a model it loaded, whose exceptions are re-raised as
    :class:`OptimumRuntimeError`: the checks call torch and the runtime in turn, and a failure
    must say which of the two raised."""

    def __init__(self, runtime: Any):
        self._runtime = runtime
        self.__name__ = getattr(runtime, "__name__", type(runtime).__name__)

    @staticmethod
    def _call(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise OptimumRuntimeError(first_line(error)) from error

    def from_pretrained(self, *args: Any, **kwargs: Any) -> _Blamed:
        return _Blamed(self._call(self._runtime.from_pretrained, args, kwargs))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self._runtime.generate, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self._runtime, args, kwargs)


def _runtime_failure(stage: SweepStage, runtime: Any, error: BaseException | str, task: str) -> PathResult:
    # An OptimumRuntimeError already holds the first line of what the runtime raised.
    detail = str(error) if isinstance(error, OptimumRuntimeError) else first_line(error)
    return PathResult.failure(stage, f"optimum-onnx's runtime ({runtime.__name__}): {detail}", task)


def _check_failure(error: BaseException, task: str) -> PathResult:
    """The check raised outside the runtime class: its inputs do not fit this model."""
    return PathResult(Status.UNVALIDATED, None, f"the sweep's check, not optimum-onnx: {first_line(error)}", task)


def validate_export(
    output: Path, torch_model: Any, task: str, atol: float = ATOL, feature_extractor: Any | None = None
) -> PathResult | None:
    """The failing check of an exported directory, or None when every check passed.

    The checks are the observer's own (the task family's), run on the legacy file through the
    unchanged runtime class: the runtime class's outputs on the family's reference inputs (logits
    for decoders, every output for encoders; encoder-decoders have none), then greedy tokens; a
    speech model's inputs are made by its `feature_extractor`, as the observer path's are.
    """
    contract = get_task(task)
    family = family_of(contract)
    runtime = runtime_class(task)
    try:
        onnx_model = runtime.from_pretrained(output)
    except Exception as error:
        return _runtime_failure(SweepStage.ORT_LOAD, runtime, error, task)
    blamed = _Blamed(runtime)
    inputs = ValidationInputs(output, torch_model, contract, blamed, feature_extractor=feature_extractor, atol=atol)
    stage = SweepStage.NUMERICAL_PARITY
    try:
        batches = family.reference_inputs(torch_model, feature_extractor=feature_extractor)
        if family.runtime_fed_by_caller:
            unfed = _unfed_inputs(onnx_model)
            if unfed:
                return _runtime_failure(
                    stage,
                    runtime,
                    f"takes no argument for the graph input(s) {', '.join(unfed)} of optimum-onnx's own export, "
                    "so it cannot run it",
                    task,
                )
            _add_caller_inputs(batches, onnx_model, torch_model)
        failure = _failed(stage, runtime, [], family.compare_outputs(inputs, batches), atol, task)
        if failure is not None:
            return failure
        stage = SweepStage.GENERATION_PARITY
        return _failed(stage, runtime, family.check_generation(inputs), [], atol, task)
    except OptimumRuntimeError as error:
        return _runtime_failure(stage, runtime, error, task)
    except Exception as error:
        logger.debug("the check failed on the torch side", exc_info=True)
        return _check_failure(error, task)


#: Inputs an encoder runtime class takes from its caller and never computes, and how a caller
#: computes them: optimum's own decoder runtime (ORTModelForCausalLM) derives position_ids from
#: the attention mask this way.
CALLER_INPUTS = {
    "position_ids": lambda batch: (batch["attention_mask"].long().cumsum(-1) - 1).masked_fill(
        batch["attention_mask"] == 0, 1
    ),
}


def _unfed_inputs(onnx_model: Any) -> list[str]:
    """The graph inputs the runtime class's forward takes no argument for."""
    accepted = inspect.signature(type(onnx_model).forward).parameters
    return [name for name in onnx_model.input_names if name not in accepted]


def _add_caller_inputs(batches: list[dict[str, torch.Tensor]], onnx_model: Any, torch_model: Any) -> None:
    torch_accepts = inspect.signature(torch_model.forward).parameters
    for batch in batches:
        for name, compute in CALLER_INPUTS.items():
            if name in onnx_model.input_names and name in torch_accepts and name not in batch:
                batch[name] = compute(batch)


def _failed(
    stage: SweepStage, runtime: Any, generation: list[Any], outputs: list[Any], atol: float, task: str
) -> PathResult | None:
    failure = failed_check(generation, outputs, atol)
    return _runtime_failure(stage, runtime, failure, task) if failure else None


def legacy_export(model_dir: Path, output: Path, task: str) -> float:
    """optimum-onnx's own `main_export` (also when the unchanged-code hook wrapped it); seconds."""
    from ..routes import upstream_main_export

    start = time.perf_counter()
    upstream_main_export()(str(model_dir), str(output), task=task, do_validation=False, no_post_process=False)
    return time.perf_counter() - start


def run_legacy_path(model_dir: Path, task: str, output: Path) -> PathResult:
    try:
        seconds = legacy_export(model_dir, output, task)
    except Exception as error:
        logger.debug("legacy export failed", exc_info=True)
        return PathResult.failure(SweepStage.ONNX_CONVERSION, f"optimum-onnx's main_export: {first_line(error)}", task)
    failure = validate_export(
        output, load_torch_model(model_dir, task), task, feature_extractor=load_feature_extractor(model_dir)
    )
    if failure is not None:
        return failure
    files = sorted(p.name for p in output.glob("*.onnx*"))
    return PathResult(Status.PASS, None, "", task, round(seconds, 2), onnx_bytes(output, files))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m legacy_shim.tooling.legacy_runner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    supported = commands.add_parser("supported", help="print the model types optimum-onnx supports for a task")
    supported.add_argument("--task", required=True)
    run = commands.add_parser("run", help="legacy export + validation of a saved model, as a sweep result")
    run.add_argument("model_dir", type=Path)
    run.add_argument("--task", required=True)
    run.add_argument("--output", type=Path, required=True)
    run.add_argument("--result", type=Path, required=True)
    observer = commands.add_parser(
        "observer", help="the observer path of the sweep, validated through legacy_shim's runtime class"
    )
    observer.add_argument("model_type")
    observer.add_argument("--task", required=True)
    observer.add_argument("--workdir", type=Path, required=True)
    observer.add_argument("--result", type=Path, required=True)
    observer.add_argument("--shapes", choices=SHAPES, default="real")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "supported":
        print(json.dumps(supported_model_types(args.task)))
        return 0
    if args.command == "observer":
        result = run_observer_path(
            args.model_type, args.task, args.workdir, runtime_class=shim_runtime_class(args.task), shapes=args.shapes
        )
        args.result.write_text(json.dumps(result.to_json()))
        return 0
    result = run_legacy_path(args.model_dir, args.task, args.output)
    args.result.write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
