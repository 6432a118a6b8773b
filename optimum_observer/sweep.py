"""Coverage sweep: every model type of a task, exported through each path, in its own process.

Takes: a task (e.g. `text-generation-with-past`), optionally a subset of model types, a time
limit per type and an output directory.
Gives: `coverage-{task}.json` (one :class:`TypeResult` per model type, with the versions it was
measured on) and the Markdown table `coverage-{task}.md` beside it; optionally a combined
document over every task swept into the directory (`docs/coverage.md`).

Per model type, a worker process (`python -m optimum_observer.sweep worker ...`) builds the tiny
model of :mod:`optimum_observer.tiny_configs`, saves it, and runs the observer export with its
validation (observed-call replay and greedy generation through the unchanged runtime class).
When the legacy exporter supports the pair, a second process runs the legacy path on the same
saved model. That path is a command, not an import: `optimum_observer` never imports
optimum-onnx's exporter or `legacy_shim`; `legacy_shim.legacy_runner` speaks the same JSON
result format (:class:`PathResult`). A crash or a hang in one type is recorded (stage
`crash` / `time limit`) and the sweep goes on; results are written after every type, so an
interrupted sweep resumes where it stopped (`resume=True`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import enum
import importlib.util
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

from .errors import RUN_FAILS_WITHOUT_OBSERVER, ObserverExportError, Stage
from .tasks import get_task, supported_tasks

logger = logging.getLogger(__name__)

LEGACY_RUNNER_MODULE = "legacy_shim.legacy_runner"
#: The runtime labels of :attr:`PathResult.runtime`.
UNCHANGED_RUNTIME = "optimum.onnxruntime"
SHIM_RUNTIME = "legacy_shim"
DEFAULT_TIMEOUT_SECONDS = 300.0
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


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


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    #: the path does not handle this (model type, task) pair at all (legacy: no OnnxConfig).
    UNSUPPORTED = "unsupported"
    #: the path was not run (legacy runner not installed, or config build failed first).
    SKIPPED = "skipped"


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
    #: the runtime class the observer export was validated through (its generation parity)
    runtime: str = UNCHANGED_RUNTIME
    #: for a pass through legacy_shim's runtime only: why the unchanged runtime failed
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "status": self.status.value,
            "stage": self.stage.value if self.stage else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PathResult:
        return cls(
            **{
                **raw,
                "status": Status(raw["status"]),
                "stage": SweepStage(raw["stage"]) if raw.get("stage") else None,
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


def classify_observer_error(error: BaseException) -> SweepStage:
    """The sweep stage of an exception raised by :func:`optimum_observer.export`."""
    if not isinstance(error, ObserverExportError):
        module = type(error).__module__ or ""
        return SweepStage.ORT_LOAD if module.startswith("onnxruntime") else SweepStage.CRASH
    if error.stage == Stage.LOAD:
        return SweepStage.LOAD
    if error.stage in (Stage.CAPTURE, Stage.SYNTHESIS):
        return SweepStage.CAPTURE
    if error.stage == Stage.EXPORT:
        cause = type(error.__cause__).__name__
        return SweepStage.TORCH_EXPORT if cause == "TorchExportError" else SweepStage.ONNX_CONVERSION
    if error.stage in (Stage.NAMING, Stage.PACKAGING):
        return SweepStage.ONNX_CONVERSION
    replay_failed = any(line.lstrip().startswith("observed call") and "FAIL" in line for line in error.reason.splitlines())
    return SweepStage.NUMERICAL_PARITY if replay_failed else SweepStage.GENERATION_PARITY


def _describe(error: BaseException) -> str:
    if not isinstance(error, ObserverExportError):
        return first_line(error)
    if error.stage in (Stage.CAPTURE, Stage.EXPORT) and error.__cause__ is not None:
        cause = first_line(root_cause(error))
        fails_in_torch = error.reason.startswith(RUN_FAILS_WITHOUT_OBSERVER)
        return f"{RUN_FAILS_WITHOUT_OBSERVER}: {cause}" if fails_in_torch else cause
    failed_rows = [line.strip() for line in error.reason.splitlines() if "FAIL" in line]
    return first_line(error.reason) + (f" [{failed_rows[0]}]" if failed_rows else "")


def run_observer_path(
    model_type: str, task: str, workdir: Path, runtime_class: Any = None, runtime: str = UNCHANGED_RUNTIME
) -> PathResult:
    """Builds the tiny model into `workdir/model`, then exports it to `workdir/observer`; a model
    whose own generate fails in plain torch with its cache (cpmant) is exported without past.

    `runtime_class` validates generation (default: the unchanged optimum class); `runtime`
    labels it in the result."""
    from .pipeline import export
    from .tiny_configs import build_tiny_model

    contract = get_task(task)
    try:
        model = build_tiny_model(model_type, contract.auto_model_class)
        model.save_pretrained(workdir / "model")
    except Exception as error:
        return PathResult.failure(SweepStage.CONFIG_BUILD, error, task)
    task = _task_for(model, task)
    start = time.perf_counter()
    try:
        try:
            result = export(model, workdir / "observer", task=task, show_progress=False, runtime_class=runtime_class)
        except ObserverExportError as error:
            without_past = _without_past_after(error, task)
            if without_past is None:
                raise
            logger.info("%s: generate fails with its cache in plain torch, exporting %s", model_type, without_past)
            task = without_past
            result = export(model, workdir / "observer", task=task, show_progress=False, runtime_class=runtime_class)
    except Exception as error:
        logger.debug("observer export of %s failed", model_type, exc_info=True)
        return PathResult(Status.FAIL, classify_observer_error(error), _describe(error), task, runtime=runtime)
    seconds = sum(v for k, v in result.timings.items() if k != Stage.VALIDATION.value)
    logger.info("%s exported in %.1fs (validation %.1fs)", model_type, seconds, time.perf_counter() - start - seconds)
    size = onnx_bytes(result.output_dir, result.onnx_files)
    return PathResult(Status.PASS, None, "", task, round(seconds, 2), size, runtime=runtime)


def _task_for(model: Any, task: str) -> str:
    """`task`, or its variant without past when the model's forward takes no cache at all
    (openai-gpt, ctrl...): such a model generates by recomputing the whole prefix each step."""
    without_past = task.removesuffix("-with-past")
    parameters = inspect.signature(model.forward).parameters
    takes_cache = "past_key_values" in parameters or "cache_params" in parameters
    if get_task(task).with_past and not takes_cache and without_past in supported_tasks():
        return without_past
    return task


def _without_past_after(error: ObserverExportError, task: str) -> str | None:
    """The task without past, when `task` has a cache and the model's own run of it fails in
    plain torch (cpmant's generate with a cache): that model generates by recomputing the prefix."""
    without_past = task.removesuffix("-with-past")
    failed_in_torch = error.stage == Stage.CAPTURE and error.reason.startswith(RUN_FAILS_WITHOUT_OBSERVER)
    if failed_in_torch and get_task(task).with_past and without_past in supported_tasks():
        return without_past
    return None


def onnx_bytes(directory: Path, files: Sequence[str]) -> int:
    return sum((Path(directory) / name).stat().st_size for name in files)


# --- the orchestrator -------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_path_process(command: list[str], result_file: Path, timeout: float, task: str) -> PathResult:
    """Runs one path's process; its result file, or a `crash` / `time limit` failure."""
    try:
        completed = subprocess.run(
            command, env=_child_env(), timeout=timeout, capture_output=True, text=True, cwd=_PROJECT_ROOT
        )
    except subprocess.TimeoutExpired:
        return PathResult.failure(SweepStage.TIME_LIMIT, f"no result within {timeout:.0f}s", task)
    if result_file.is_file():
        return PathResult.from_json(json.loads(result_file.read_text()))
    stderr_lines = [line for line in completed.stderr.splitlines() if line.strip()]
    detail = stderr_lines[-1] if stderr_lines else f"exit status {completed.returncode}"
    return PathResult.failure(SweepStage.CRASH, f"exit status {completed.returncode}: {detail}", task)


def legacy_runner_available() -> bool:
    return importlib.util.find_spec(LEGACY_RUNNER_MODULE.split(".")[0]) is not None


def legacy_supported_types(task: str, timeout: float) -> set[str] | None:
    """The model types the legacy exporter supports for `task`, asked of the legacy runner;
    None when the runner is not installed."""
    if not legacy_runner_available():
        return None
    completed = subprocess.run(
        [sys.executable, "-m", LEGACY_RUNNER_MODULE, "supported", "--task", task],
        env=_child_env(), capture_output=True, text=True, timeout=timeout, cwd=_PROJECT_ROOT, check=True,
    )
    return set(json.loads(completed.stdout))


def sweep_one(model_type: str, task: str, timeout: float, legacy_types: set[str] | None) -> TypeResult:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{model_type}-") as scratch:
        workdir = Path(scratch)
        result_file = workdir / "observer.json"
        command = [sys.executable, "-m", "optimum_observer.sweep", "worker", model_type, "--task", task,
                   "--workdir", str(workdir), "--result", str(result_file)]  # fmt: skip
        observer = run_path_process(command, result_file, timeout, task)
        if _runtime_may_be_the_limit(observer) and legacy_types is not None:
            observer = _through_shim_runtime(model_type, task, timeout, workdir, observer)
        if legacy_types is None:
            legacy = PathResult(Status.SKIPPED, error="legacy runner not installed", task=task)
        elif model_type not in legacy_types:
            legacy = PathResult(Status.UNSUPPORTED, error="optimum-onnx has no OnnxConfig for this task", task=task)
        elif not (workdir / "model" / "config.json").is_file():
            legacy = PathResult(Status.SKIPPED, error="no tiny model was built", task=task)
        else:
            result_file = workdir / "legacy.json"
            command = [sys.executable, "-m", LEGACY_RUNNER_MODULE, "run", str(workdir / "model"), "--task", task,
                       "--output", str(workdir / "legacy"), "--result", str(result_file)]  # fmt: skip
            legacy = run_path_process(command, result_file, timeout, task)
    return TypeResult(model_type, observer, legacy, round(time.perf_counter() - start, 1))


#: Failures the unchanged runtime class itself may cause (its cache sizes, its config reading,
#: no state caches): the export is validated again through legacy_shim's runtime.
_RUNTIME_STAGES = (SweepStage.GENERATION_PARITY, SweepStage.ORT_LOAD)


def _runtime_may_be_the_limit(result: PathResult) -> bool:
    return result.status == Status.FAIL and result.stage in _RUNTIME_STAGES


def _through_shim_runtime(
    model_type: str, task: str, timeout: float, workdir: Path, unchanged: PathResult
) -> PathResult:
    """The observer export validated through legacy_shim's runtime class (a process of the
    legacy runner), when that passes; else the unchanged runtime's failure, as it was."""
    result_file = workdir / "observer-shim.json"
    command = [sys.executable, "-m", LEGACY_RUNNER_MODULE, "observer", model_type, "--task", task,
               "--workdir", str(workdir / "shim"), "--result", str(result_file)]  # fmt: skip
    (workdir / "shim").mkdir(exist_ok=True)
    shim = run_path_process(command, result_file, timeout, task)
    if shim.status != Status.PASS:
        return unchanged
    shim.note = f"unchanged runtime: {unchanged.error}"
    return shim


def coverage_path(out: Path, task: str) -> Path:
    return out / f"coverage-{task}.json"


def load_results(path: Path) -> dict[str, TypeResult]:
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {t: TypeResult.from_json(t, r) for t, r in raw["results"].items()}


def write_results(path: Path, task: str, results: dict[str, TypeResult]) -> None:
    payload = {
        "task": task,
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
) -> dict[str, TypeResult]:
    """Sweeps `model_types` (default: the task's whole auto mapping), `jobs` types at a time;
    returns every result in the coverage file, including those kept from an earlier run when
    resuming."""
    out = Path(out)
    every_type = model_types_for(task)
    wanted = list(model_types) if model_types else every_type
    unknown = sorted(set(wanted) - set(every_type))
    if unknown:
        raise ValueError(f"not model types of {task!r}'s auto mapping: {', '.join(unknown)}")
    path = coverage_path(out, task)
    results = load_results(path) if resume else {}
    todo = [t for t in wanted if t not in results]
    legacy_types = legacy_supported_types(task, timeout) if todo else set()
    show = sys.stderr.isatty() if show_progress is None else show_progress
    with (
        tqdm(total=len(todo), desc=f"sweep {task}", unit="type", disable=not show) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool,
    ):
        # Each type runs in child processes; the threads only wait for them.
        pending = {pool.submit(sweep_one, t, task, timeout, legacy_types): t for t in todo}
        for future in concurrent.futures.as_completed(pending):
            model_type = pending[future]
            results[model_type] = future.result()
            write_results(path, task, results)
            bar.set_postfix_str(model_type)
            bar.update(1)
            logger.info("%s: observer %s, legacy %s", model_type, results[model_type].observer.status.value,
                        results[model_type].legacy.status.value)  # fmt: skip
    path.with_suffix(".md").write_text(markdown(task, results, versions()))
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
     "a tensor built inside forward becomes a fake constant at torch.export (gemma3n's per-layer inputs)"),
    ("Speech2Text2SinusoidalPositionalEmbedding",
     "the model cannot be built in transformers 4.57 (its positional embedding has no weight)"),
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
     "data-dependent control flow torch.export cannot trace (for example xmod's per-language adapters, blt's "
     "entropy patching)"),
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


def known_reason(error: str) -> str:
    return next((reason for fragment, reason in KNOWN_REASONS if fragment in error), "")


def _cell(result: PathResult) -> str:
    if result.status == Status.PASS:
        return "pass (shim runtime)" if result.runtime == SHIM_RUNTIME else "pass"
    if result.status == Status.FAIL:
        return f"FAIL ({result.stage.value})" if result.stage else "FAIL"
    return result.status.value


def _size(result: PathResult) -> str:
    return f"{result.onnx_bytes / 1e6:.2f} MB" if result.onnx_bytes else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(task: str, results: dict[str, TypeResult], measured_on: dict[str, str]) -> str:
    """The coverage table of one task, with counts and failures grouped by stage."""
    total = len(results)
    observer_pass = sorted(t for t, r in results.items() if r.observer.status == Status.PASS)
    shim_only = [t for t in observer_pass if results[t].observer.runtime == SHIM_RUNTIME]
    legacy_pass = sorted(t for t, r in results.items() if r.legacy.status == Status.PASS)
    lines = [
        f"## {task}",
        "",
        "Measured on " + ", ".join(f"{k} {v}" for k, v in measured_on.items()) + ".",
        "",
        f"- observer export with validation passes: **{len(observer_pass)} / {total}** "
        f"({len(observer_pass) - len(shim_only)} validated through the unchanged "
        f"`optimum.onnxruntime` class, {len(shim_only)} only through `legacy_shim`'s runtime class: "
        f"{', '.join(shim_only) or 'none'})",
        f"- legacy exporter (optimum-onnx) with validation passes: **{len(legacy_pass)} / {total}**",
        *_not_measured(task, results),
        "",
        "| model type | observer | exported task | export s | ONNX size | legacy | legacy stage / reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_type in sorted(results):
        r = results[model_type]
        legacy_detail = _escape(r.legacy.error) if r.legacy.status == Status.FAIL else ""
        lines.append(
            f"| {model_type} | {_cell(r.observer)} | {r.observer.task} | {r.observer.export_seconds or ''} | "
            f"{_size(r.observer)} | {_cell(r.legacy)} | {legacy_detail} |"
        )
    failures: dict[str, list[str]] = {}
    for model_type, r in sorted(results.items()):
        if r.observer.status == Status.FAIL:
            stage = r.observer.stage.value if r.observer.stage else "unknown"
            reason = known_reason(r.observer.error)
            failures.setdefault(stage, []).append(
                f"- `{model_type}`: {reason + ' - ' if reason else ''}`{_escape(r.observer.error)}`"
            )
    if failures:
        lines += ["", f"### Observer failures by stage ({sum(map(len, failures.values()))})"]
        for stage in sorted(failures):
            lines += ["", f"#### {stage} ({len(failures[stage])})", "", *failures[stage]]
    return "\n".join(lines) + "\n"


def _not_measured(task: str, results: dict[str, TypeResult]) -> list[str]:
    """A line naming the types of the task's mapping this table has no result for (a sweep cut
    short, or run on a subset), so a partial table never reads as the whole mapping."""
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
    for path in sorted(Path(out).glob("coverage-*.json")):
        raw = json.loads(path.read_text())
        results = {t: TypeResult.from_json(t, r) for t, r in raw["results"].items()}
        sections.append(markdown(raw["task"], results, raw["versions"]))
    header = (
        "# Architecture coverage\n\n"
        "Generated by `optimum-observer sweep` (do not edit by hand): every model type of each task's "
        "transformers auto mapping, as a tiny random model (`optimum_observer.tiny_configs`), exported "
        "through the observer stack and through the legacy exporter (optimum-onnx `main_export`) where it "
        "supports the type; each path is validated (replay of the observed calls / logits on the same "
        "inputs, then, through the unchanged `optimum.onnxruntime` class, greedy generation for the "
        "generation tasks and every output on batches of 2 and 3 for the encoder tasks).\n\n"
        "Regenerate, one command per task (the causal-LM sweep took 53 minutes on 2 cores with "
        "`--jobs 2`, a test run beside it): `nice -n 10 optimum-observer sweep --task "
        "text-generation-with-past --jobs 2 --out docs/coverage-data --doc docs/coverage.md`.\n\n"
    )
    return header + "\n".join(sections)


# --- command line -----------------------------------------------------------------------


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="text-generation-with-past")
    parser.add_argument("--model-types", help="comma-separated subset (default: the task's whole auto mapping)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds per type and path")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out")
    parser.add_argument("--jobs", type=int, default=1, help="model types run at the same time")
    parser.add_argument("--out", type=Path, default=Path("sweep-results"), help="directory of coverage-{task}.json/.md")
    parser.add_argument("--doc", type=Path, help="also write the combined document of every task in --out here")


def run_from_args(args: argparse.Namespace) -> int:
    model_types = [t.strip() for t in args.model_types.split(",") if t.strip()] if args.model_types else None
    results = run_sweep(args.task, args.out, model_types, args.timeout, args.resume, jobs=args.jobs)
    passed = sum(r.observer.status == Status.PASS for r in results.values())
    legacy = sum(r.legacy.status == Status.PASS for r in results.values())
    print(f"{args.task}: observer {passed}/{len(results)}, legacy {legacy}/{len(results)} -> {coverage_path(args.out, args.task)}")
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(coverage_document(args.out))
        print(f"wrote {args.doc}")
    return 0


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimum_observer.sweep worker")
    parser.add_argument("model_type")
    parser.add_argument("--task", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_observer_path(args.model_type, args.task, args.workdir)
    args.result.write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m optimum_observer.sweep worker MODEL_TYPE --task T --workdir D --result F")
    sys.exit(_worker_main(sys.argv[2:]))
