"""The maintainers' migration workflow: compare both exporters on one model type, then migrate it.

Takes: a model type and a task. Gives:

* :func:`compare`: a :class:`Comparison` of the legacy export (optimum-onnx's unchanged
  `main_export`) and the observer export of the same tiny random model
  (`legacy_shim.tooling.tiny_configs`): graph inputs/outputs, logits on the same inputs (each
  against torch and against each other), greedy tokens, file size, ONNX Runtime prefill and
  decode latency. Both exports are loaded and run through the same unchanged
  `optimum.onnxruntime` class, so the numbers compare the files, not two runtimes.
* :func:`migrate`: adds the type to the router's migration registry
  (:func:`legacy_shim.registry.add_migration`) only when the comparison shows parity, with the
  comparison's summary as the entry's evidence; otherwise raises :class:`MigrationRefused`.

Command line (also `optimum-observer compare|migrate ...`, :mod:`legacy_shim.tooling.commands`)::

    python -m legacy_shim.tooling.migration compare --model-type llama --task text-generation-with-past
    python -m legacy_shim.tooling.migration migrate llama --task text-generation-with-past
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

import optimum_observer
from optimum_observer.families import family_of
from optimum_observer.reference_inputs import generation_inputs
from optimum_observer.tasks import get_task
from optimum_observer.validation import ValidationInputs

from ..registry import MigrationEntry, add_migration
from .legacy_runner import ATOL, legacy_export, load_torch_model, runtime_class
from .sweep import versions
from .tiny_configs import save_tiny_model

logger = logging.getLogger(__name__)

LATENCY_PROMPT_TOKENS = 32
LATENCY_REPEATS = 5


class MigrationRefused(RuntimeError):
    """The comparison did not show parity; the registry was not changed."""

    def __init__(self, comparison: Comparison):
        self.comparison = comparison
        super().__init__(
            f"{comparison.model_type} / {comparison.task} is not migrated: no parity between the legacy and "
            f"observer exports.\n{comparison.table()}"
        )


@dataclasses.dataclass(frozen=True)
class ExportSide:
    """One exporter's file, measured."""

    inputs: list[str]
    outputs: list[str]
    onnx_bytes: int
    export_seconds: float
    max_diff_vs_torch: float
    tokens: list[list[list[int]]]
    prefill_ms: float
    decode_ms: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    model_type: str
    task: str
    atol: float
    legacy: ExportSide
    observer: ExportSide
    torch_tokens: list[list[list[int]]]
    max_diff_between: float

    @property
    def greedy_parity(self) -> bool:
        return self.legacy.tokens == self.torch_tokens == self.observer.tokens

    @property
    def numerical_parity(self) -> bool:
        return all(d <= self.atol for d in (self.legacy.max_diff_vs_torch, self.observer.max_diff_vs_torch))

    @property
    def parity(self) -> bool:
        return self.greedy_parity and self.numerical_parity

    def table(self) -> str:
        """The side-by-side report."""
        rows = [
            ("graph inputs", _names(self.legacy.inputs), _names(self.observer.inputs)),
            ("graph outputs", _names(self.legacy.outputs), _names(self.observer.outputs)),
            ("ONNX size", f"{self.legacy.onnx_bytes / 1e6:.2f} MB", f"{self.observer.onnx_bytes / 1e6:.2f} MB"),
            ("export time", f"{self.legacy.export_seconds:.2f} s", f"{self.observer.export_seconds:.2f} s"),
            ("max |logits - torch|", f"{self.legacy.max_diff_vs_torch:.3g}", f"{self.observer.max_diff_vs_torch:.3g}"),
            ("greedy tokens == torch", str(self.legacy.tokens == self.torch_tokens),
             str(self.observer.tokens == self.torch_tokens)),  # fmt: skip
            (f"ORT prefill {LATENCY_PROMPT_TOKENS} tokens", f"{self.legacy.prefill_ms:.2f} ms", f"{self.observer.prefill_ms:.2f} ms"),
            ("ORT decode step", f"{self.legacy.decode_ms:.2f} ms", f"{self.observer.decode_ms:.2f} ms"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{self.model_type} / {self.task}", f"{'':<{width}}  {'legacy':<40}  observer"]
        lines += [f"{name:<{width}}  {legacy:<40}  {observer}" for name, legacy, observer in rows]
        same_io = self.legacy.inputs == self.observer.inputs and self.legacy.outputs == self.observer.outputs
        lines.append(f"same graph input/output names: {'yes' if same_io else 'no'}")
        lines.append(f"max |logits legacy - observer|: {self.max_diff_between:.3g} (atol {self.atol})")
        lines.append(f"parity: {'yes' if self.parity else 'NO'}")
        return "\n".join(lines)

    def evidence(self) -> str:
        """One line for the registry entry: what showed parity, on which versions."""
        measured_on = ", ".join(f"{k} {v}" for k, v in versions().items())
        return (
            f"optimum-observer compare on a tiny random {self.model_type}: greedy tokens of both exports equal "
            f"torch's; max |logits - torch| legacy {self.legacy.max_diff_vs_torch:.2g}, observer "
            f"{self.observer.max_diff_vs_torch:.2g} (atol {self.atol}); decode {self.legacy.decode_ms:.2f} ms legacy "
            f"vs {self.observer.decode_ms:.2f} ms observer; {measured_on}"
        )


def _names(names: list[str]) -> str:
    return f"{len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def _graph_io(directory: Path) -> tuple[list[str], list[str]]:
    graph = ir.load(directory / "model.onnx").graph
    return [v.name for v in graph.inputs], [v.name for v in graph.outputs]


def _median_ms(step: Any) -> float:
    timings = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        step()
        timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def _latency(onnx_model: Any, vocab: int) -> tuple[float, float]:
    """Median prefill (LATENCY_PROMPT_TOKENS tokens, batch 1) and decode-step wall times."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, vocab, (1, LATENCY_PROMPT_TOKENS), generator=generator)
    mask = torch.ones_like(input_ids)
    prefill = onnx_model(input_ids=input_ids, attention_mask=mask)
    next_ids = prefill.logits[:, -1:].argmax(-1)
    decode_mask = torch.ones(1, LATENCY_PROMPT_TOKENS + 1, dtype=mask.dtype)
    return (
        _median_ms(lambda: onnx_model(input_ids=input_ids, attention_mask=mask)),
        _median_ms(
            lambda: onnx_model(input_ids=next_ids, attention_mask=decode_mask, past_key_values=prefill.past_key_values)
        ),
    )


def _measure(directory: Path, torch_model: Any, task: str, export_seconds: float) -> tuple[ExportSide, Any]:
    runtime = runtime_class(task)
    onnx_model = runtime.from_pretrained(directory)
    family = family_of(get_task(task))
    inputs = ValidationInputs(directory, torch_model, get_task(task), runtime)
    checks = family.check_generation(inputs)
    prefill_ms, decode_ms = _latency(onnx_model, torch_model.config.get_text_config().vocab_size)
    graph_inputs, graph_outputs = _graph_io(directory)
    side = ExportSide(
        inputs=graph_inputs,
        outputs=graph_outputs,
        onnx_bytes=sum(p.stat().st_size for p in directory.glob("*.onnx*")),
        export_seconds=export_seconds,
        max_diff_vs_torch=max(check.max_abs_diff for check in family.compare_outputs(inputs)),
        tokens=[c.onnx_tokens for c in checks],
        prefill_ms=prefill_ms,
        decode_ms=decode_ms,
    )
    return side, (onnx_model, [c.torch_tokens for c in checks])


def compare(model_type: str, task: str = "text-generation-with-past", atol: float = ATOL) -> Comparison:
    """Exports a tiny random `model_type` both ways and measures both files side by side."""
    contract = get_task(task)
    with tempfile.TemporaryDirectory(prefix=f"compare-{model_type}-") as scratch:
        scratch = Path(scratch)
        model_dir = save_tiny_model(model_type, contract.auto_model_class, scratch / "model")
        torch_model = load_torch_model(model_dir, task)
        legacy_seconds = legacy_export(model_dir, scratch / "legacy", task)
        start = time.perf_counter()
        optimum_observer.export(model_dir, scratch / "observer", task=task, validate=False, show_progress=False)
        observer_seconds = time.perf_counter() - start
        legacy, (legacy_model, torch_tokens) = _measure(scratch / "legacy", torch_model, task, legacy_seconds)
        observer, (observer_model, _) = _measure(scratch / "observer", torch_model, task, observer_seconds)
        between = max(
            (legacy_model(**i).logits - observer_model(**i).logits).abs().mul(i["attention_mask"][..., None]).max().item()
            for i in generation_inputs(torch_model, None)
        )
    return Comparison(model_type, task, atol, legacy, observer, torch_tokens, between)


def migrate(
    model_type: str,
    task: str = "text-generation-with-past",
    *,
    since: str | None = None,
    registry_path: str | Path | None = None,
    comparison: Comparison | None = None,
) -> MigrationEntry:
    """Adds `model_type` / `task` to the migration registry when :func:`compare` shows parity.

    Raises:
        MigrationRefused: no parity; the registry is unchanged.
    """
    comparison = comparison or compare(model_type, task)
    if not comparison.parity:
        raise MigrationRefused(comparison)
    return add_migration(
        model_type, [task], since or optimum_observer.__version__, comparison.evidence(), path=registry_path
    )


DEFAULT_TASK = "text-generation-with-past"


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", required=True)
    parser.add_argument("--task", default=DEFAULT_TASK)


def migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_type")
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--since", help="version the move ships in (default: this optimum-observer version)")
    parser.add_argument("--registry", type=Path, help="registry file (default: legacy_shim/migrated.json)")


def run_compare(args: argparse.Namespace) -> int:
    """`compare` (arguments: :func:`compare_arguments`); 1 without parity."""
    _configure_logging()
    comparison = compare(args.model_type, args.task)
    print(comparison.table())
    return 0 if comparison.parity else 1


def run_migrate(args: argparse.Namespace) -> int:
    """`migrate` (arguments: :func:`migrate_arguments`); 1 when refused."""
    _configure_logging()
    comparison = compare(args.model_type, args.task)
    print(comparison.table())
    try:
        entry = migrate(args.model_type, args.task, since=args.since, registry_path=args.registry, comparison=comparison)
    except MigrationRefused:
        print(f"refused: {args.model_type} / {args.task} stays on the legacy exporter (no parity)", file=sys.stderr)
        return 1
    print(f"migrated: {entry.to_json()}")
    return 0


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimum-observer", description="Compare the exporters; migrate a type.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare_arguments(commands.add_parser("compare", help="export one model type with both exporters and report side by side"))
    migrate_arguments(commands.add_parser("migrate", help="move a model type to the observer when compare shows parity"))
    args = parser.parse_args(argv)
    return run_compare(args) if args.command == "compare" else run_migrate(args)


if __name__ == "__main__":
    sys.exit(main())
