"""Coverage sweep: every model type of a task, exported through each path, in its own process.

Takes: a task (e.g. `text-generation-with-past`), optionally a subset of model types, a time
limit per type and an output directory.
Gives: `coverage-{task}.json` (one :class:`TypeResult` per model type, with the versions it was
measured on) and the Markdown table `coverage-{task}.md` beside it; optionally a combined
document over every task swept into the directory (`docs/coverage.md`).

Per model type, a worker process (`python -m legacy_shim.tooling.sweep worker ...`) builds the tiny
model of :mod:`legacy_shim.tooling.tiny_configs` (real checkpoint shapes by default, `shapes=`),
saves it, and runs the observer export with its validation (observed-call replay, then greedy
generation, or every output for the encoder tasks, through the unchanged `optimum.onnxruntime`
class in that process, where the environment's hook is on). A passing export is then checked
the same way in an interpreter where optimum-observer is not installed
(:mod:`legacy_shim.tooling.without_observer`); an export the unchanged class fails with is validated
again through `legacy_shim`'s runtime class. Each passing row records the best of the three
(:class:`Runtime`): the headline count is the first, what users of plain optimum-onnx get.

When the legacy exporter supports the pair, a second process runs the legacy path on the same
saved model, with the hook off: optimum-onnx's `main_export` and its runtime classes as they
ship. That path is a command, not an import, so that the hook is off there:
`legacy_shim.tooling.legacy_runner` speaks the same JSON result format
(:class:`PathResult`). A crash or a hang in one type is recorded (stage `crash` / `time limit`)
and the sweep goes on; results are written after every type, so an interrupted sweep resumes
where it stopped (`resume=True`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import enum
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from optimum_observer.errors import RUN_FAILS_WITHOUT_OBSERVER, ErrorKind, ObserverExportError, Stage
from optimum_observer.tasks import CACHE, get_task, supported_tasks

from .._hook import DISABLE_ENV_VAR
from .tiny_configs import SHAPES

logger = logging.getLogger(__name__)

LEGACY_RUNNER_MODULE = "legacy_shim.tooling.legacy_runner"

#: Tasks optimum-onnx 0.1.0 neither exports nor runs (no OnnxConfig for any type, no
#: `optimum.onnxruntime` class), with the reason the table gives: the legacy path is recorded as
#: unsupported without running it, and the observer export is validated through legacy_shim's own
#: runtime class, the one users load, so its passes are at level (c) by definition.
NO_OPTIMUM_ONNX: dict[str, str] = {
    "image-text-to-text": (
        "optimum-onnx 0.1.0 has no image-text-to-text export (no OnnxConfig for any type: its "
        "TasksManager lists none) and no `optimum.onnxruntime` class for the task"
    ),
}


def optimum_onnx_absent(task: str) -> str:
    """Why optimum-onnx can neither export nor run `task` here, or "" when it can: the task has
    no OnnxConfig at all (:data:`NO_OPTIMUM_ONNX`), or optimum-onnx cannot run with the installed
    transformers (transformers 5: its exporter fails at import, its runtime classes are adapted by
    legacy_shim). Then the legacy path is recorded as unsupported without running it, and the
    observer export is validated through legacy_shim's runtime class: its passes are at (c)."""
    from ..optimum_compat import legacy_exporter_status

    if task in NO_OPTIMUM_ONNX:
        return NO_OPTIMUM_ONNX[task]
    status = legacy_exporter_status()
    return "" if status.available else f"optimum-onnx cannot run here: {status.reason}"


DEFAULT_TIMEOUT_SECONDS = 300.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SweepStage(str, enum.Enum):
    """Where a path failed, from building the tiny model to generating with the export."""

    CONFIG_BUILD = "config build"
    LOAD = "load"
    CAPTURE = "capture"
    TORCH_EXPORT = "torch.export"
    ONNX_CONVERSION = "ONNX conversion"
    ORT_LOAD = "ONNX Runtime load"
    NUMERICAL_PARITY = "numerical parity"
    GENERATION_PARITY = "generation parity"
    TIME_LIMIT = "time limit"
    CRASH = "crash"


class Runtime(str, enum.Enum):
    """The runtime class a passing observer export generated (or ran) with, best first."""

    #: (a) the unchanged `optimum.onnxruntime` class, in an interpreter without optimum-observer.
    WITHOUT_OBSERVER = "optimum.onnxruntime without optimum-observer"
    #: (b) the unchanged class, with the hook optimum-observer installs.
    WITH_HOOK = "optimum.onnxruntime with the hook"
    #: (c) only `legacy_shim`'s runtime class.
    SHIM = "legacy_shim"

    @property
    def level(self) -> str:
        return "abc"[list(Runtime).index(self)]

    @classmethod
    def from_json(cls, value: str | None) -> Runtime | None:
        # Before the three levels, "optimum.onnxruntime" meant the unchanged class in the
        # sweep's own process, where the hook is on: (b).
        return None if value is None else cls(_OLD_RUNTIME_LABELS.get(value, value))


_OLD_RUNTIME_LABELS = {"optimum.onnxruntime": Runtime.WITH_HOOK.value}


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    #: the path does not handle this (model type, task) pair at all (legacy: no OnnxConfig).
    UNSUPPORTED = "unsupported"
    #: the path was not run (legacy runner not installed, or config build failed first).
    SKIPPED = "skipped"
    #: exported, but the sweep's check raised outside the runtime class (the torch model refused
    #: its inputs, or it could not build inputs for the model), so nothing says the export is wrong.
    UNVALIDATED = "exported, not validated"


@dataclasses.dataclass
class PathResult:
    """One export path on one model type."""

    status: Status
    stage: SweepStage | None = None
    error: str = ""
    #: the task actually exported (a model without a cache exports `text-generation`).
    task: str = ""
    export_seconds: float | None = None
    onnx_bytes: int | None = None
    #: for an observer pass: the best runtime class it generated (or ran) with
    runtime: Runtime | None = None
    #: for an observer pass below (a): why each better runtime failed with it
    note: str = ""
    #: for an observer failure: it failed in the runtime class's checks after the observed-call
    #: replay passed (so another runtime class may still run the file)
    failed_in_runtime_class: bool = False
    #: seconds the check through the unchanged class without optimum-observer took (its subprocess)
    without_observer_seconds: float | None = None
    #: for an observer pass: the patches the export applied (`ExportResult.patches`), in order
    patches: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "status": self.status.value,
            "stage": self.stage.value if self.stage else None,
            "runtime": self.runtime.value if self.runtime else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PathResult:
        status = Status(raw["status"])
        return cls(
            **{
                **raw,
                "status": status,
                "stage": SweepStage(raw["stage"]) if raw.get("stage") else None,
                # Files before the three levels wrote a runtime on every row, failures included.
                "runtime": Runtime.from_json(raw.get("runtime")) if status == Status.PASS else None,
                "patches": tuple(raw.get("patches", ())),
            }
        )

    @classmethod
    def failure(cls, stage: SweepStage, error: BaseException | str, task: str = "") -> PathResult:
        return cls(Status.FAIL, stage, first_line(error), task)


@dataclasses.dataclass
class TypeResult:
    model_type: str
    observer: PathResult
    legacy: PathResult
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"observer": self.observer.to_json(), "legacy": self.legacy.to_json(), "seconds": self.seconds}

    @classmethod
    def from_json(cls, model_type: str, raw: dict[str, Any]) -> TypeResult:
        return cls(model_type, PathResult.from_json(raw["observer"]), PathResult.from_json(raw["legacy"]), raw["seconds"])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of a message, after the exception's type name."""
    text = error if isinstance(error, str) else str(error)
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if not isinstance(error, str):
        line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line[:300]


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: torch's exporter wraps the real error twice."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def model_types_for(task: str) -> list[str]:
    """Every model type of the task's auto mapping in the installed transformers."""
    import transformers

    auto_class = getattr(transformers, get_task(task).auto_model_class)
    return sorted(auto_class._model_mapping._model_mapping)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "torch", "onnxruntime", "onnxscript", "optimum-onnx"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


# --- the observer worker (runs in its own process) --------------------------------------


#: The sweep stage of each export stage (validation's depends on which check failed).
_SWEEP_STAGES = {
    Stage.LOAD: SweepStage.LOAD,
    Stage.CAPTURE: SweepStage.CAPTURE,
    Stage.SYNTHESIS: SweepStage.CAPTURE,
    Stage.TORCH_EXPORT: SweepStage.TORCH_EXPORT,
    Stage.ONNX_CONVERSION: SweepStage.ONNX_CONVERSION,
    Stage.NAMING: SweepStage.ONNX_CONVERSION,
    Stage.PACKAGING: SweepStage.ONNX_CONVERSION,
}


def classify_observer_error(error: BaseException, task: str) -> SweepStage:
    """The sweep stage of an exception raised by :func:`optimum_observer.export` for `task`, from
    its attributes (stage, kind, report): an internal error, or an exception outside the stages,
    is a crash unless ONNX Runtime raised it (it could not load a file)."""
    if not isinstance(error, ObserverExportError) or error.kind is ErrorKind.INTERNAL:
        cause = error.__cause__ if isinstance(error, ObserverExportError) else error
        module = type(cause).__module__ or ""
        return SweepStage.ORT_LOAD if module.startswith("onnxruntime") else SweepStage.CRASH
    if error.stage in _SWEEP_STAGES:
        return _SWEEP_STAGES[error.stage]
    if _replay_failed(error) or not get_task(task).generates:
        return SweepStage.NUMERICAL_PARITY
    return SweepStage.GENERATION_PARITY


def _replay_failed(error: ObserverExportError) -> bool:
    """The observed-call replay failed (the graph itself computes something else than torch),
    as opposed to the runtime class's checks alone."""
    return error.report is not None and not all(call.ok for call in error.report.calls)


def failed_in_runtime_class(error: BaseException) -> bool:
    """A validation failure of the runtime class's checks only (the replay passed)."""
    return (
        isinstance(error, ObserverExportError)
        and error.stage == Stage.VALIDATION
        and error.kind is not ErrorKind.INTERNAL
        and not _replay_failed(error)
    )


def _describe(error: BaseException) -> str:
    """One line for the table: what the model or a library raised, or the reason with the first
    failing check of the validation report."""
    if not isinstance(error, ObserverExportError):
        return first_line(error)
    if error.kind is ErrorKind.INTERNAL:
        return first_line(error.__cause__)
    if error.stage in _RAISED_BY_THE_MODEL_OR_TORCH and error.__cause__ is not None:
        cause = first_line(root_cause(error))
        if error.kind is ErrorKind.MODEL_RUN:
            return f"{RUN_FAILS_WITHOUT_OBSERVER}: {cause}"
        if error.reason.startswith(_INPUTS_NOT_BUILT):
            # The model never ran: what raised is the default run's input building (families.py).
            return f"{error.reason.split(' (', 1)[0]}: {cause}"
        return cause
    failures = error.report.failures() if error.report is not None else []
    return first_line(error.reason) + (f" [{failures[0]}]" if failures else "")


#: How a family's default run says it could not build its inputs for the model (families.py): a gap
#: of the default run, which the table names before the cause.
_INPUTS_NOT_BUILT = "the default run cannot build"

#: Stages whose failures chain what the model's run or torch's exporter raised: the table shows that.
_RAISED_BY_THE_MODEL_OR_TORCH = (Stage.CAPTURE, Stage.TORCH_EXPORT, Stage.ONNX_CONVERSION)


def run_observer_path(
    model_type: str, task: str, workdir: Path, runtime_class: Any = None, shapes: str = "real"
) -> PathResult:
    """Builds the tiny model (`shapes`: see :mod:`legacy_shim.tooling.tiny_configs`) into
    `workdir/model`, then exports it to `workdir/observer`; a model whose own generate fails in
    plain torch with its cache (cpmant) is exported without past.

    `runtime_class` validates the export (default: the unchanged optimum class, here with the
    hook; a pass is then checked again without optimum-observer); another class is recorded as
    legacy_shim's (:attr:`Runtime.SHIM`)."""
    from optimum_observer.pipeline import export
    from .tiny_configs import build_tiny_model, tiny_feature_extractor

    contract = get_task(task)
    try:
        # In inference mode, as from_pretrained gives it: export() hands a caller's model back in
        # the mode it had, and the torch reference of the check without optimum-observer runs
        # after it (in training mode, dropout made torch's own tokens random).
        model = build_tiny_model(model_type, contract.auto_model_class, shapes=shapes).eval()
        model.save_pretrained(workdir / "model")
        # Saved with the model, as a checkpoint ships it: the legacy path's check loads it there.
        # Or the processor, for image-text-to-text types whose images need it (image_sizes).
        feature_extractor = tiny_feature_extractor(model_type, model.config, model)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(workdir / "model")
    except Exception as error:
        return PathResult.failure(SweepStage.CONFIG_BUILD, error, task)
    task = _task_for(model, task)
    start = time.perf_counter()
    try:
        observe = functools.partial(
            export, model, workdir / "observer", show_progress=False, runtime_class=runtime_class,
            feature_extractor=feature_extractor,
        )  # fmt: skip
        try:
            result = observe(task=task)
        except ObserverExportError as error:
            without_past = _without_past_after(error, task)
            if without_past is None:
                raise
            logger.info("%s: generate fails with its cache in plain torch, exporting %s", model_type, without_past)
            task = without_past
            result = observe(task=task)
    except Exception as error:
        logger.debug("observer export of %s failed", model_type, exc_info=True)
        return PathResult(
            Status.FAIL,
            classify_observer_error(error, task),
            _describe(error),
            task,
            failed_in_runtime_class=failed_in_runtime_class(error),
        )
    seconds = sum(v for k, v in result.timings.items() if k != Stage.VALIDATION.value)
    logger.info("%s exported in %.1fs (validation %.1fs)", model_type, seconds, time.perf_counter() - start - seconds)
    size = onnx_bytes(result.output_dir, result.onnx_files)
    passed = PathResult(Status.PASS, None, "", task, round(seconds, 2), size, patches=tuple(result.patches))
    if runtime_class is not None:
        return dataclasses.replace(passed, runtime=Runtime.SHIM)
    return _checked_without_observer(
        passed, model, result.output_dir, workdir / "without-observer", feature_extractor
    )


def _checked_without_observer(
    passed: PathResult, model: Any, output_dir: Path, scratch: Path, feature_extractor: Any | None = None
) -> PathResult:
    """`passed` (validated through the unchanged class with the hook) at level (a) when the same
    checks pass through that class without optimum-observer, else at (b) with the reason."""
    from .without_observer import RuntimeWithoutObserverError, check_without_observer

    start = time.perf_counter()
    try:
        report = check_without_observer(
            output_dir, model, get_task(passed.task), scratch, feature_extractor=feature_extractor
        )
        failure = failed_check(report.generation, report.runtime, report.atol)
    except RuntimeWithoutObserverError as error:
        failure = str(error)
    except Exception as error:
        logger.debug("check without optimum-observer failed", exc_info=True)
        failure = first_line(error)
    seconds = round(time.perf_counter() - start, 2)
    if not failure:
        return dataclasses.replace(passed, runtime=Runtime.WITHOUT_OBSERVER, without_observer_seconds=seconds)
    note = f"without optimum-observer: {failure}"
    return dataclasses.replace(passed, runtime=Runtime.WITH_HOOK, note=note, without_observer_seconds=seconds)


def failed_check(generation: Sequence[Any], runtime: Sequence[Any], atol: float) -> str:
    """The first failing runtime-class check (:class:`~optimum_observer.result.GenerationCheck`,
    :class:`~optimum_observer.result.RuntimeCheck`) in one line, or "" when all passed."""
    for check in generation:
        if not check.ok:
            return f"torch {check.torch_tokens} != onnx {check.onnx_tokens} {check.caveat}".strip()
    for check in runtime:
        if not check.ok:
            return f"{check.output}: max |diff| {check.max_abs_diff:.3g} > atol {atol}"
    return ""


def _task_for(model: Any, task: str) -> str:
    """`task`, or its variant without past when the model's forward takes no cache at all
    (openai-gpt, ctrl...): such a model generates by recomputing the whole prefix each step."""
    without_past = task.removesuffix("-with-past")
    parameters = inspect.signature(model.forward).parameters
    # transformers 5 names the argument `cache` (tasks.CACHE); 4.x `past_key_values` or, state-space, `cache_params`.
    takes_cache = bool({"past_key_values", "cache_params", CACHE} & parameters.keys())
    if get_task(task).with_past and not takes_cache and without_past in supported_tasks():
        return without_past
    return task


def _without_past_after(error: ObserverExportError, task: str) -> str | None:
    """The task without past, when `task` has a cache and the model's own run of it fails in
    plain torch (cpmant's generate with a cache): that model generates by recomputing the prefix."""
    without_past = task.removesuffix("-with-past")
    if error.kind is ErrorKind.MODEL_RUN and get_task(task).with_past and without_past in supported_tasks():
        return without_past
    return None


def runtime_class(task: str) -> type:
    """The unchanged `optimum.onnxruntime` class of the task."""
    import optimum.onnxruntime as optimum_runtime

    return getattr(optimum_runtime, get_task(task).runtime_class)


def shim_runtime_class(task: str) -> type:
    """legacy_shim's runtime class of the task (optimum's, plus the runtime fixes; for a task
    optimum-onnx has no class for, legacy_shim's own)."""
    from .. import runtime

    return getattr(runtime, get_task(task).runtime_class, None) or runtime_class(task)


def onnx_bytes(directory: Path, files: Sequence[str]) -> int:
    return sum((Path(directory) / name).stat().st_size for name in files)


# --- the orchestrator -------------------------------------------------------------------


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


#: The legacy path runs optimum-onnx as it ships: the hook would route its exports and patch its
#: runtime classes.
_LEGACY_ENV = {DISABLE_ENV_VAR: "1"}


def run_path_process(
    command: list[str], result_file: Path, timeout: float, task: str, env: dict[str, str] | None = None
) -> PathResult:
    """Runs one path's process (`env`: variables set for it); its result file, or a `crash` /
    `time limit` failure."""
    try:
        completed = subprocess.run(
            command, env=_child_env(**(env or {})), timeout=timeout, capture_output=True, text=True, cwd=_PROJECT_ROOT
        )
    except subprocess.TimeoutExpired:
        return PathResult.failure(SweepStage.TIME_LIMIT, f"no result within {timeout:.0f}s", task)
    if result_file.is_file():
        return PathResult.from_json(json.loads(result_file.read_text()))
    stderr_lines = [line for line in completed.stderr.splitlines() if line.strip()]
    detail = stderr_lines[-1] if stderr_lines else f"exit status {completed.returncode}"
    return PathResult.failure(SweepStage.CRASH, f"exit status {completed.returncode}: {detail}", task)


def legacy_supported_types(task: str, timeout: float) -> set[str]:
    """The model types the legacy exporter supports for `task`, asked of the legacy runner."""
    completed = subprocess.run(
        [sys.executable, "-m", LEGACY_RUNNER_MODULE, "supported", "--task", task],
        env=_child_env(), capture_output=True, text=True, timeout=timeout, cwd=_PROJECT_ROOT, check=True,
    )
    return set(json.loads(completed.stdout))


def sweep_one(
    model_type: str, task: str, timeout: float, legacy_types: set[str], shapes: str = "real"
) -> TypeResult:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{model_type}-") as scratch:
        workdir = Path(scratch)
        result_file = workdir / "observer.json"
        command = [sys.executable, "-m", "legacy_shim.tooling.sweep", "worker", model_type, "--task", task,
                   "--workdir", str(workdir), "--result", str(result_file), "--shapes", shapes]  # fmt: skip
        observer = run_path_process(command, result_file, timeout, task)
        absent = optimum_onnx_absent(task)
        if _runtime_may_be_the_limit(observer) and not absent:
            observer = _through_shim_runtime(model_type, task, timeout, workdir, observer, shapes)
        if absent:
            legacy = PathResult(Status.UNSUPPORTED, error=absent, task=task)
        elif model_type not in legacy_types:
            legacy = PathResult(Status.UNSUPPORTED, error="optimum-onnx has no OnnxConfig for this task", task=task)
        elif not (workdir / "model" / "config.json").is_file():
            legacy = PathResult(Status.SKIPPED, error="no tiny model was built", task=task)
        else:
            result_file = workdir / "legacy.json"
            command = [sys.executable, "-m", LEGACY_RUNNER_MODULE, "run", str(workdir / "model"), "--task", task,
                       "--output", str(workdir / "legacy"), "--result", str(result_file)]  # fmt: skip
            legacy = run_path_process(command, result_file, timeout, task, _LEGACY_ENV)
    return TypeResult(model_type, observer, legacy, round(time.perf_counter() - start, 1))


def _runtime_may_be_the_limit(result: PathResult) -> bool:
    """A failure the unchanged runtime class itself may cause (its cache sizes, its config
    reading, no state caches): the export is validated again through legacy_shim's runtime."""
    return result.status == Status.FAIL and (result.failed_in_runtime_class or result.stage == SweepStage.ORT_LOAD)


def _through_shim_runtime(
    model_type: str, task: str, timeout: float, workdir: Path, unchanged: PathResult, shapes: str
) -> PathResult:
    """The observer export validated through legacy_shim's runtime class (a process of the
    legacy runner), when that passes; else the unchanged runtime's failure, as it was."""
    result_file = workdir / "observer-shim.json"
    command = [sys.executable, "-m", LEGACY_RUNNER_MODULE, "observer", model_type, "--task", task,
               "--workdir", str(workdir / "shim"), "--result", str(result_file), "--shapes", shapes]  # fmt: skip
    (workdir / "shim").mkdir(exist_ok=True)
    shim = run_path_process(command, result_file, timeout, task)
    if shim.status != Status.PASS:
        return unchanged
    return dataclasses.replace(shim, note=f"with the hook: {unchanged.error}")


def coverage_path(out: Path, task: str) -> Path:
    return out / f"coverage-{task}.json"


def load_results(path: Path, shapes: str | None = None) -> dict[str, TypeResult]:
    """The results in `path`; with `shapes`, refuses a file measured on other tiny-model shapes
    (a resumed sweep would mix two kinds of models in one table; files written before the
    shapes were recorded say nothing and are taken as they are)."""
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    recorded = raw.get("shapes")
    if shapes is not None and recorded not in (None, shapes):
        raise ValueError(f"{path} was measured with shapes={recorded!r}, not {shapes!r}: resume with the same shapes")
    return {t: TypeResult.from_json(t, r) for t, r in raw["results"].items()}


def _revision() -> str:
    """The git commit of this source tree (with "+changes" when it differs), or "an unknown revision"."""
    root = _PROJECT_ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def load_caveats(path: Path) -> list[str]:
    """What the results file at `path` says of how it was measured (see :func:`coverage_document`)."""
    return list(json.loads(path.read_text()).get("caveats", ())) if path.is_file() else []


def write_results(
    path: Path,
    task: str,
    results: dict[str, TypeResult],
    shapes: str = "real",
    caveats: Sequence[str] = (),
    optimum_onnx_absent: str = "",
) -> None:
    payload = {
        "task": task,
        "shapes": shapes,
        **({"caveats": list(caveats)} if caveats else {}),
        # Why optimum-onnx could not serve the task where this was measured (read by the report).
        **({"optimum_onnx_absent": optimum_onnx_absent} if optimum_onnx_absent else {}),
        "versions": versions(),
        "results": {t: results[t].to_json() for t in sorted(results)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, path)


def run_sweep(
    task: str,
    out: Path,
    model_types: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    resume: bool = False,
    show_progress: bool | None = None,
    jobs: int = 1,
    shapes: str = "real",
    redo: bool = False,
) -> dict[str, TypeResult]:
    """Sweeps `model_types` (default: the task's whole auto mapping), `jobs` types at a time, on
    tiny models of `shapes` ("real" or "mha", see :mod:`legacy_shim.tooling.tiny_configs`);
    returns every result in the coverage file, including those kept from an earlier run when
    resuming. With `redo`, the types of `model_types` are measured again even when the file has
    them (the others are kept): a fix re-measured without re-running the whole table."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, not {shapes!r}")
    out = Path(out)
    every_type = model_types_for(task)
    wanted = list(model_types) if model_types else every_type
    unknown = sorted(set(wanted) - set(every_type))
    if unknown:
        raise ValueError(f"not model types of {task!r}'s auto mapping: {', '.join(unknown)}")
    path = coverage_path(out, task)
    results = load_results(path, shapes) if resume else {}
    # A resumed file keeps what it says of how it was measured; a fresh run starts without.
    caveats = load_caveats(path) if resume else []
    todo = [t for t in wanted if redo or t not in results]
    if redo and todo:
        caveats.append(f"re-measured at {_revision()} with --redo: {', '.join(sorted(todo))}")
    absent = optimum_onnx_absent(task)
    legacy_types = legacy_supported_types(task, timeout) if todo and not absent else set()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    with (
        tqdm(total=len(todo), desc=f"sweep {task}", unit="type", disable=not show) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        # Each type runs in child processes; the threads only wait for them.
        pending = {pool.submit(sweep_one, t, task, timeout, legacy_types, shapes): t for t in todo}
        for future in concurrent.futures.as_completed(pending):
            model_type = pending[future]
            results[model_type] = future.result()
            write_results(path, task, results, shapes, caveats, absent)
            bar.set_postfix_str(model_type)
            bar.update(1)
            logger.info("%s: observer %s, legacy %s", model_type, results[model_type].observer.status.value,
                        results[model_type].legacy.status.value)  # fmt: skip
    path.with_suffix(".md").write_text(markdown(task, results, versions(), shapes, caveats, absent))
    return results


# --- reports ----------------------------------------------------------------------------

#: What a failure means, recognised by a fragment of its first error line, so that a reader of
#: the coverage table can tell a limit of the approach (or of the runtime) from a bug.
KNOWN_REASONS: tuple[tuple[str, str], ...] = (
    ("object has no attribute 'clone'",
     "stateful cache (SSM / hybrid / recurrent states) that is not a registered pytree: not exported yet"),
    ("conflicts between user-specified ranges and inferred ranges",
     "recurrent state outside a cache class (rwkv's `state` list, reformer's buckets, xlstm's cache): "
     "torch.export fixes an axis the observed runs varied; not exported yet"),
    ("fake tensor in the exported program constant",
     "a parameter updated inside forward becomes a fake constant at torch.export (gemma3n's AltUp clamped its "
     "weight in place through `.data`: patched)"),
    ("Speech2Text2SinusoidalPositionalEmbedding",
     "the model can be neither built nor run in transformers 4.57 (its sinusoidal positional embedding never "
     "creates its table: `_init_weights` reads `.weight`, forward `.weights`); nothing to export"),
    ("object has no attribute 'generate'", "deprecated model class without generate(): not a generative model here"),
    ("ImportError", "needs an optional dependency that is not installed"),
    ("The checkpoint you are trying to load has model type",
     "the head's text config is registered only inside the multimodal config, so AutoConfig cannot load it back "
     "(legacy_shim's runtime classes load it with the sub-config class)"),
    ("Got invalid dimensions for input: past_key_values",
     "the unchanged runtime sizes its first-step cache from the config (legacy_shim.ORTModelForCausalLM reads "
     "it from the graph)"),
    ("object has no attribute 'hidden_size'", "the unchanged runtime reads hidden_size, which this config lacks"),
    ("complex-valued input", "complex-valued rotary embedding: ONNX has no complex type"),
    ("GuardOnDataDependentSymNode",
     "data-dependent control flow torch.export cannot trace (for example blt's entropy patching: the number "
     "of patches depends on the data)"),
    ("KeyError: 'last_hidden_state'",
     "the base model's output has no last_hidden_state, the output feature-extraction reads (DPR's pooled "
     "output, backbones' feature maps)"),
    ("use_cache` is only supported for `decoder_input_ids` of length 1",
     "the model takes a cache only with one new token, the export example needs several"),
    ("You have to specify pixel_values",
     "multimodal model: forward needs text and images together, the default run feeds one modality "
     "(a caller's run can feed both)"),
    ("decoder_input_ids and decoder_inputs_embeds",
     "encoder-decoder model: its base forward needs decoder inputs (export it for text2text-generation)"),
    ("couldn't connect to 'https://huggingface.co'", "its config builds a sub-model from the hub (no hub access)"),
    (RUN_FAILS_WITHOUT_OBSERVER,
     "the default run fails in plain torch, without the observer: for generation the model's own generate "
     "(with a cache only, as cpmant's in transformers 4.57, the sweep exports the task without past); for "
     "encoder tasks a forward that needs inputs besides its main one (a second modality, boxes, decoder "
     "inputs...)"),
    ("which the runtime does not feed",
     "generate feeds forward tensors the runtime class never feeds (xlnet: perm_mask and target_mapping "
     "over a dummy token it appends), so the graph cannot compute what torch did"),
    ("rewrites the prompt",
     "generate appends tokens to the prompt before forward sees it (xlm: a mask token whose prediction "
     "is the next token); the runtime class feeds the prompt as it is"),
    ("generates other tokens without its cache",
     "torch's own generate is not self-consistent (doge with sdpa: an unpadded prompt gets no causal mask, "
     "and its dynamic mask then drops causality; with eager attention torch gives the export's tokens)"),
)  # fmt: skip


#: Reasons that hold for one task only, looked up before :data:`KNOWN_REASONS` (whose fragments
#: may mean something else there).
TASK_REASONS: dict[str, tuple[tuple[str, str], ...]] = {
    "image-text-to-text": (
        ("the default run cannot build image-text inputs",
         "the default run feeds llava-style inputs (pixel_values [images, channels, height, width] of the vision "
         "config's image_size, one placeholder token per image feature, the config's image_token_id): this model "
         "takes images otherwise (image sizes, tiles, grids of patches, a vision config without image_size, no "
         "image token); a caller's `run` with the model's processor, or an image layout of its own, is needed"),
        ("Image features and image tokens do not match: tokens: 4, features 4",
         "its get_image_features returns a grid [images, rows, columns, hidden] (pixel shuffle), and the default "
         "run counts an image's tokens as its second axis (the rows), so the prompt holds too few placeholders: "
         "a gap of the default run (vision_language.tokens_per_image), not of the model"),
        ("never called the model's text_decoder's forward",
         "the model defines no `get_decoder` / `set_decoder` of its own (transformers 4.57's deepseek_vl, janus), so "
         "the routing cannot put the decoder part in place of the language model its forward calls: nothing was "
         "observed for decoder_model_merged.onnx"),
        ("at non-singleton dimension 4",
         "the outer model builds the 4-D prefix-LM attention mask and hands it to the decoder, so the decoder "
         "graph's attention_mask is 4-D while the runtime feeds the 2-D one (docs/vision_language.md: paligemma)"),
        ("tuple indices must be integers or slices, not str",
         "the outer model passes its decoder a mask mapping (one mask per attention kind, bidirectional over the "
         "image tokens), not the 2-D attention mask: example synthesis cannot take it as a graph input "
         "(docs/vision_language.md: the decoder part must take the 2-D mask and build the mapping in the graph)"),
        ("conflicts between user-specified ranges and inferred ranges",
         "torch.export fixed an axis the observed runs varied (aria: the number of images, pixel_values axis 0, "
         "as llava's list of per-image features did before its patch; not investigated further)"),
    ),
}  # fmt: skip


def known_reason(error: str, task: str | None = None) -> str:
    """What a failure means, from a fragment of its error line (:data:`TASK_REASONS` of `task` first)."""
    reasons = (*TASK_REASONS.get(task, ()), *KNOWN_REASONS)
    return next((reason for fragment, reason in reasons if fragment in error), "")


def _cell(result: PathResult) -> str:
    if result.status == Status.FAIL:
        return f"FAIL ({result.stage.value})" if result.stage else "FAIL"
    return result.status.value


def _runtime_cell(result: PathResult) -> str:
    return f"({result.runtime.level})" if result.status == Status.PASS and result.runtime else ""


def _size(result: PathResult) -> str:
    return f"{result.onnx_bytes / 1e6:.2f} MB" if result.onnx_bytes else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _explained(label: str, error: str, task: str | None = None) -> str:
    """A list item: the known reason of `error` (in `task`), when there is one, then the error itself."""
    reason = known_reason(error, task)
    return f"- `{label}`: {reason + ' - ' if reason else ''}`{_escape(error)}`"


def _at_level(results: dict[str, TypeResult], runtime: Runtime) -> list[str]:
    return sorted(t for t, r in results.items() if r.observer.status == Status.PASS and r.observer.runtime == runtime)


def markdown(
    task: str,
    results: dict[str, TypeResult],
    measured_on: dict[str, str],
    shapes: str | None = None,
    caveats: Sequence[str] = (),
    optimum_onnx_absent: str | None = None,
) -> str:
    """The coverage table of one task: the counts per runtime level, every type, the reason of
    each pass below (a), and the observer failures grouped by stage. `optimum_onnx_absent`: why
    optimum-onnx could not serve the task where it was measured (:func:`optimum_onnx_absent`; by
    default the task's own reason, if any); a table measured on another transformers major than 4
    says which in its title."""
    absent = NO_OPTIMUM_ONNX.get(task, "") if optimum_onnx_absent is None else optimum_onnx_absent
    how = "generates" if get_task(task).generates else "runs"
    shapes_text = f"tiny models of `shapes={shapes!r}`" if shapes else "tiny-model shapes not recorded"
    transformers_version = measured_on.get("transformers", "")
    title = task if transformers_version.startswith("4.") else f"{task} on transformers {transformers_version}"
    lines = [
        f"## {title}",
        "",
        "Measured on " + ", ".join(f"{k} {v}" for k, v in measured_on.items()) + f"; {shapes_text}.",
        "",
        *(
            _shim_only_counts(task, results, absent)
            if absent
            else _level_counts(task, results, how)
        ),
        *_not_measured(task, results, measured_on),
        *(f"- caveat: {caveat}" for caveat in caveats),
        "",
        "| model type | observer | runtime | exported task | export s | ONNX size | legacy | legacy stage / reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_type in sorted(results):
        r = results[model_type]
        legacy_detail = _escape(r.legacy.error) if r.legacy.status in (Status.FAIL, Status.UNVALIDATED) else ""
        lines.append(
            f"| {model_type} | {_cell(r.observer)} | {_runtime_cell(r.observer)} | {r.observer.task} | "
            f"{r.observer.export_seconds or ''} | {_size(r.observer)} | {_cell(r.legacy)} | {legacy_detail} |"
        )
    below_a = [] if absent else _at_level(results, Runtime.WITH_HOOK) + _at_level(results, Runtime.SHIM)
    below = [_explained(f"{t} ({results[t].observer.runtime.level})", results[t].observer.note) for t in below_a]
    if below:
        lines += ["", f"### Observer passes below (a): why the better runtime failed ({len(below)})", "", *below]
    failures: dict[str, list[str]] = {}
    for model_type, r in sorted(results.items()):
        if r.observer.status == Status.FAIL:
            stage = r.observer.stage.value if r.observer.stage else "unknown"
            failures.setdefault(stage, []).append(_explained(model_type, r.observer.error, task))
    if failures:
        lines += ["", f"### Observer failures by stage ({sum(map(len, failures.values()))})"]
        for stage in sorted(failures):
            lines += ["", f"#### {stage} ({len(failures[stage])})", "", *failures[stage]]
    return "\n".join(lines) + "\n"


def _shim_only_counts(task: str, results: dict[str, TypeResult], absent: str) -> list[str]:
    """The count lines of a task optimum-onnx neither exports nor runs where it was measured
    (`absent`, :func:`optimum_onnx_absent`): levels (a) and (b) name optimum-onnx's class, which
    does not exist or cannot run there, so every pass is (c)."""
    total = len(results)
    shim = _at_level(results, Runtime.SHIM)
    runtime = get_task(task).runtime_class
    return [
        f"- observer export with validation passes (every observed call replayed through ONNX Runtime, then "
        f"greedy tokens of `legacy_shim.{runtime}` against torch's): **{len(shim)} / {total}**, all at level (c)",
        f"  - levels (a) and (b) do not apply: {absent}. `legacy_shim.{runtime}` is the class users "
        "load (it stands alone on ONNX Runtime and does not depend on the hook), so (c) is the best level this "
        "task has",
        f"- legacy exporter: unsupported for every type, not run ({absent})",
    ]


def _level_counts(task: str, results: dict[str, TypeResult], how: str) -> list[str]:
    """The count lines per runtime level (a), (b), (c) and of the legacy exporter."""
    total = len(results)
    observer_pass = [t for t, r in results.items() if r.observer.status == Status.PASS]
    plain, hook, shim = (_at_level(results, runtime) for runtime in Runtime)
    legacy_pass = [t for t, r in results.items() if r.legacy.status == Status.PASS]
    legacy_unvalidated = [t for t, r in results.items() if r.legacy.status == Status.UNVALIDATED]
    return [
        f"- observer export {how} through optimum-onnx's unchanged `optimum.onnxruntime` class where "
        f"optimum-observer is not installed (a): **{len(plain)} / {total}**",
        f"  - only with optimum-observer's hook installed (b): {len(hook)} ({', '.join(hook) or 'none'})",
        *_a_not_measured(results, hook),
        f"  - only through `legacy_shim`'s runtime class (c): {len(shim)} ({', '.join(shim) or 'none'})",
        f"  - observer export with validation passes, any runtime: {len(observer_pass)} / {total}",
        f"- legacy exporter (optimum-onnx's `main_export` and runtime classes as they ship, hook off) with "
        f"validation passes: **{len(legacy_pass)} / {total}**"
        + (f" (exported, not validated by the sweep's check: {len(legacy_unvalidated)})" if legacy_unvalidated else ""),
    ]


def _a_not_measured(results: dict[str, TypeResult], hook: list[str]) -> list[str]:
    """A line naming the (b) passes whose (a) check never ran: results recorded before the sweep
    had it (their runtime label was the unchanged class in the sweep's own process, where the
    hook is on), so (a)'s count is a lower bound until they are re-run."""
    unmeasured = [t for t in hook if results[t].observer.without_observer_seconds is None and not results[t].observer.note]
    if not unmeasured:
        return []
    return [
        f"    - of which (a) not measured: {len(unmeasured)} (recorded before the sweep checked (a); "
        "re-run them to measure it)"
    ]


def _not_measured(task: str, results: dict[str, TypeResult], measured_on: dict[str, str]) -> list[str]:
    """A line naming the types of the task's mapping this table has no result for (a sweep cut
    short, or run on a subset), so a partial table never reads as the whole mapping. The mapping
    is the installed transformers': a table measured on another version (a transformers-5 table
    regenerated into the document from the default venv) is compared with none."""
    if measured_on.get("transformers", versions()["transformers"]) != versions()["transformers"]:
        return []
    mapping = model_types_for(task)
    missing = [t for t in mapping if t not in results]
    if not missing:
        return []
    return [
        f"- **partial**: {len(mapping) - len(missing)} of the {len(mapping)} model types of the mapping "
        f"measured; not measured ({len(missing)}, continue with `--resume`): {', '.join(missing)}"
    ]


def coverage_document(out: Path) -> str:
    """Every task swept into `out`, as one Markdown document (docs/coverage.md)."""
    sections = []
    # Tables measured with other packages (transformers 5) sit in subdirectories, after the default ones.
    for path in sorted(Path(out).glob("coverage-*.json")) + sorted(Path(out).glob("*/coverage-*.json")):
        raw = json.loads(path.read_text())
        results = {t: TypeResult.from_json(t, r) for t, r in raw["results"].items()}
        # "caveats": what a results file says of how it was measured (added by whoever wrote it);
        # "optimum_onnx_absent": recorded where optimum-onnx could not run (else the task's own reason).
        sections.append(
            markdown(
                raw["task"], results, raw["versions"], raw.get("shapes"), raw.get("caveats", ()),
                raw.get("optimum_onnx_absent"),
            )
        )  # fmt: skip
    header = (
        "# Architecture coverage\n\n"
        "Generated by `optimum-observer sweep` (do not edit by hand): every model type of each task's "
        "transformers auto mapping, as a tiny random model (`legacy_shim.tooling.tiny_configs`; real checkpoint "
        "shapes unless a table says `shapes='mha'`: grouped-query attention, explicit head_dim, MLA), exported "
        "through the observer stack and through the legacy exporter (optimum-onnx `main_export`) where it "
        "supports the type; each path is validated (replay of the observed calls / logits on the same "
        "inputs, then, through the task's `optimum.onnxruntime` class, greedy generation for the "
        "generation tasks and every output on batches of 2 and 3 for the encoder tasks).\n\n"
        "The runtime column says which runtime an observer pass reached, best first: (a) optimum-onnx's "
        "unchanged class in an interpreter where optimum-observer is not installed (what a user of plain "
        "optimum-onnx gets: the headline count), (b) the same class with optimum-observer's hook installed, "
        "(c) only `legacy_shim`'s runtime class. The legacy column is optimum-onnx as it ships (hook off); its "
        "reasons name what failed: optimum-onnx's exporter, its runtime class, or, as \"exported, not "
        "validated\", the sweep's check (it raised outside the runtime class: the torch model refused its inputs, or "
        "it could not build inputs for the model).\n\n"
        "Regenerate, one command per task (the causal-LM sweep took 53 minutes on 2 cores with "
        "`--jobs 2`, a test run beside it): `nice -n 10 optimum-observer sweep --task "
        "text-generation-with-past --jobs 2 --out docs/coverage-data --doc docs/coverage.md`; the tasks: "
        + ", ".join(f"`{t}`" for t in SWEPT_TASKS)
        + ".\n\n"
        "Tables titled \"on transformers 5.x\" come after the others: measured in the transformers-5 venv "
        "(README.md, \"transformers 5\") with `--out docs/coverage-data/transformers-5`. optimum-onnx cannot "
        "run there (its exporter fails at import, its runtime classes only through legacy_shim's adaptation), so "
        "their legacy column is not run and every observer pass is validated through `legacy_shim`'s runtime "
        "class, level (c).\n\n"
    )
    return header + "\n".join(sections)


# --- command line -----------------------------------------------------------------------


#: The tasks docs/coverage.md has a table for.
SWEPT_TASKS = (
    "text-generation-with-past",
    "text2text-generation-with-past",
    "automatic-speech-recognition-with-past",
    "feature-extraction",
    "text-classification",
    "image-text-to-text",
)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="text-generation-with-past", choices=supported_tasks())
    parser.add_argument(
        "--model-types", "--types", dest="model_types",
        help="comma-separated subset (default: the task's whole auto mapping)",
    )  # fmt: skip
    parser.add_argument(
        "--shapes", choices=SHAPES, default="real",
        help="tiny-model shapes: real checkpoint shapes (grouped-query attention, explicit head_dim, MLA) or mha",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds per type and path")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out")
    parser.add_argument(
        "--redo", action="store_true",
        help="with --resume: measure the --model-types again although --out has them, keep the rest",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="model types run at the same time")
    parser.add_argument("--out", type=Path, default=Path("sweep-results"), help="directory of coverage-{task}.json/.md")
    parser.add_argument("--doc", type=Path, help="also write the combined document of every task in --out here")


def run_from_args(args: argparse.Namespace) -> int:
    model_types = [t.strip() for t in args.model_types.split(",") if t.strip()] if args.model_types else None
    results = run_sweep(
        args.task, args.out, model_types, args.timeout, args.resume, jobs=args.jobs, shapes=args.shapes, redo=args.redo
    )
    levels = {runtime: len(_at_level(results, runtime)) for runtime in Runtime}
    legacy = sum(r.legacy.status == Status.PASS for r in results.values())
    if optimum_onnx_absent(args.task):
        counts = f"observer (c) {levels[Runtime.SHIM]}/{len(results)} ((a), (b) and legacy do not apply)"
    else:
        counts = (
            f"observer (a) {levels[Runtime.WITHOUT_OBSERVER]}/{len(results)} + (b) {levels[Runtime.WITH_HOOK]} "
            f"+ (c) {levels[Runtime.SHIM]}, legacy {legacy}/{len(results)}"
        )
    print(f"{args.task} ({args.shapes} shapes): {counts} -> {coverage_path(args.out, args.task)}")
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(coverage_document(args.out))
        print(f"wrote {args.doc}")
    return 0


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m legacy_shim.tooling.sweep worker")
    parser.add_argument("model_type")
    parser.add_argument("--task", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--shapes", choices=SHAPES, default="real")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runtime_class = shim_runtime_class(args.task) if optimum_onnx_absent(args.task) else None
    result = run_observer_path(args.model_type, args.task, args.workdir, runtime_class, shapes=args.shapes)
    args.result.write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m legacy_shim.tooling.sweep worker MODEL_TYPE --task T --workdir D --result F [--shapes S]")
    sys.exit(_worker_main(sys.argv[2:]))
