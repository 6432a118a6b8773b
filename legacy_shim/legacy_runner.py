"""The legacy export path for sweeps and comparisons: optimum-onnx's `main_export`, validated.

Takes: a saved model directory and a task. Gives: an `optimum_observer.sweep.PathResult`
(the sweep's JSON result format): the legacy export through optimum-onnx's unchanged
`main_export`, then the unchanged `optimum.onnxruntime` class loading it, logits on the same
inputs as torch (numerical parity), and greedy generation token for token (generation parity).

It lives in `legacy_shim` because `optimum_observer` must not import optimum-onnx's exporter:
the sweep runs it as a command,

    python -m legacy_shim.legacy_runner supported --task text-generation-with-past
    python -m legacy_shim.legacy_runner run MODEL_DIR --task T --output DIR --result FILE.json
    python -m legacy_shim.legacy_runner observer MODEL_TYPE --task T --workdir DIR --result FILE.json

`observer` is the sweep's observer path validated through legacy_shim's runtime class instead of
the unchanged one: the sweep runs it when the unchanged runtime fails to load or generate with
an export (state caches, cache sizes it reads from the config, configs it cannot load back).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from optimum_observer.sweep import SHIM_RUNTIME, PathResult, Status, SweepStage, onnx_bytes, run_observer_path
from optimum_observer.tasks import get_task

logger = logging.getLogger(__name__)

ATOL = 1e-4


def supported_model_types(task: str) -> list[str]:
    """The model types optimum-onnx has an OnnxConfig for, for `task`."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the OnnxConfigs)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(task, exporter="onnx"))


def shim_runtime_class(task: str) -> type:
    """legacy_shim's runtime class of the task (optimum's, plus the runtime fixes)."""
    from . import modeling

    return getattr(modeling, get_task(task).runtime_class, None) or runtime_class(task)


def runtime_class(task: str) -> type:
    """The unchanged `optimum.onnxruntime` class of the task."""
    import optimum.onnxruntime as optimum_runtime

    return getattr(optimum_runtime, get_task(task).runtime_class)


def load_torch_model(model_dir: Path, task: str) -> Any:
    import transformers

    auto_class = getattr(transformers, get_task(task).auto_model_class)
    return auto_class.from_pretrained(model_dir).eval()


def max_logits_diff(onnx_model: Any, torch_model: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Max |logits difference| between the ONNX and torch models on `inputs`, over the
    positions the attention mask lets through (padded rows are implementation-defined)."""
    with torch.no_grad():
        expected = torch_model(**inputs).logits
    got = onnx_model(**inputs).logits
    diff = (got.float() - expected.float()).abs() * inputs["attention_mask"][..., None]
    return diff.max().item()


def validate_export(output: Path, torch_model: Any, task: str, atol: float = ATOL) -> PathResult | None:
    """The failing check of an exported directory, or None when every check passed.

    The checks are the observer's own, run on the legacy file through the unchanged runtime
    class: decoders compare logits on the same inputs then greedy tokens; encoder-decoders
    greedy tokens; encoders every output of the runtime class.
    """
    from optimum_observer.tasks import Family

    contract = get_task(task)
    runtime = runtime_class(task)
    try:
        onnx_model = runtime.from_pretrained(output)
    except Exception as error:
        return PathResult.failure(SweepStage.ORT_LOAD, error, task)
    if contract.family is Family.DECODER:
        return _validate_decoder(output, onnx_model, torch_model, runtime, task, atol)
    if contract.family is Family.ENCODER:
        return _validate_encoder(output, torch_model, runtime, task, atol)
    return _validate_seq2seq(output, torch_model, runtime, task)


def _validate_decoder(
    output: Path, onnx_model: Any, torch_model: Any, runtime: type, task: str, atol: float
) -> PathResult | None:
    from optimum_observer.capture import pad_token_id
    from optimum_observer.validation import check_generation, generation_inputs

    for inputs in generation_inputs(torch_model, None):
        try:
            diff = max_logits_diff(onnx_model, torch_model, inputs)
        except Exception as error:
            return PathResult.failure(SweepStage.NUMERICAL_PARITY, error, task)
        if not diff <= atol:
            return PathResult.failure(SweepStage.NUMERICAL_PARITY, f"max |logits diff| {diff:.3g} > atol {atol}", task)
    try:
        checks = check_generation(output, torch_model, None, runtime, pad_token_id(torch_model, None))
    except Exception as error:
        return PathResult.failure(SweepStage.GENERATION_PARITY, error, task)
    return _generation_failure(checks, task)


def _validate_seq2seq(output: Path, torch_model: Any, runtime: type, task: str) -> PathResult | None:
    from optimum_observer.validation import check_seq2seq_generation

    try:
        checks = check_seq2seq_generation(output, torch_model, get_task(task), None, None, runtime)
    except Exception as error:
        return PathResult.failure(SweepStage.GENERATION_PARITY, error, task)
    return _generation_failure(checks, task)


def _validate_encoder(output: Path, torch_model: Any, runtime: type, task: str, atol: float) -> PathResult | None:
    from optimum_observer.validation import check_runtime_outputs

    try:
        checks = check_runtime_outputs(output, torch_model, get_task(task), None, runtime, atol)
    except Exception as error:
        return PathResult.failure(SweepStage.NUMERICAL_PARITY, error, task)
    for check in checks:
        if not check.ok:
            return PathResult.failure(
                SweepStage.NUMERICAL_PARITY, f"{check.output}: max |diff| {check.max_abs_diff:.3g} > atol {atol}", task
            )
    return None


def _generation_failure(checks: list[Any], task: str) -> PathResult | None:
    for check in checks:
        if not check.ok:
            return PathResult.failure(
                SweepStage.GENERATION_PARITY, f"torch {check.torch_tokens} != onnx {check.onnx_tokens}", task
            )
    return None


def legacy_export(model_dir: Path, output: Path, task: str) -> float:
    """optimum-onnx's own `main_export` (also when the unchanged-code hook wrapped it); seconds."""
    from .routes import upstream_main_export

    start = time.perf_counter()
    upstream_main_export()(str(model_dir), str(output), task=task, do_validation=False, no_post_process=False)
    return time.perf_counter() - start


def run_legacy_path(model_dir: Path, task: str, output: Path) -> PathResult:
    try:
        seconds = legacy_export(model_dir, output, task)
    except Exception as error:
        logger.debug("legacy export failed", exc_info=True)
        return PathResult.failure(SweepStage.ONNX_CONVERSION, error, task)
    failure = validate_export(output, load_torch_model(model_dir, task), task)
    if failure is not None:
        return failure
    files = sorted(p.name for p in output.glob("*.onnx*"))
    return PathResult(Status.PASS, None, "", task, round(seconds, 2), onnx_bytes(output, files))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m legacy_shim.legacy_runner", description=__doc__)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "supported":
        print(json.dumps(supported_model_types(args.task)))
        return 0
    if args.command == "observer":
        result = run_observer_path(
            args.model_type, args.task, args.workdir, runtime_class=shim_runtime_class(args.task), runtime=SHIM_RUNTIME
        )
        args.result.write_text(json.dumps(result.to_json()))
        return 0
    result = run_legacy_path(args.model_dir, args.task, args.output)
    args.result.write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
