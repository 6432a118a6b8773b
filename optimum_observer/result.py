"""Typed results returned by :func:`optimum_observer.export`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .optimization import PostProcessing


@dataclasses.dataclass(frozen=True)
class CallCheck:
    """One observed call replayed through ONNX Runtime and compared with the torch outputs."""

    index: int
    max_abs_diff: float
    ok: bool
    error: str = ""
    #: the ONNX file the call was replayed through.
    graph: str = "model.onnx"
    #: "torch" and/or "ONNX Runtime" when their outputs held a NaN or inf (a failure).
    nonfinite: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationCheck:
    """Greedy generation through the runtime class compared token by token with torch."""

    prompt_lengths: tuple[int, ...]
    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]
    #: on a mismatch, why torch's tokens are not ones the runtime can give, when that is known
    #: (see :func:`optimum_observer.validation.torch_reference_caveat`).
    caveat: str = ""

    @property
    def ok(self) -> bool:
        return self.torch_tokens == self.onnx_tokens


@dataclasses.dataclass(frozen=True)
class RuntimeCheck:
    """One output of the runtime class on one batch compared with the torch model's."""

    index: int
    output: str
    max_abs_diff: float
    ok: bool
    #: "torch" and/or "ONNX Runtime" when their outputs held a NaN or inf (a failure).
    nonfinite: tuple[str, ...] = ()


def nonfinite_text(sides: tuple[str, ...]) -> str:
    return f"NaN or inf in the outputs of {' and '.join(sides)}" if sides else ""


@dataclasses.dataclass(frozen=True)
class QualityCheck:
    """A quantized export against the fp32 one: perplexity on a fixed text, greedy tokens."""

    #: the `export()` argument bounding it (defaults: optimization.QUALITY_LIMITS).
    limit_name: ClassVar[str] = "max_perplexity_ratio"

    reference_perplexity: float
    perplexity: float
    #: the quantized file's greedy generation against torch's (not required to match).
    generation: list[GenerationCheck]

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    @property
    def token_agreement(self) -> float:
        """The share of generated tokens equal to torch's, position by position."""
        pairs = [
            (want, have)
            for check in self.generation
            for want_row, have_row in zip(check.torch_tokens, check.onnx_tokens)
            for want, have in zip(want_row, have_row)
        ]
        return sum(want == have for want, have in pairs) / len(pairs) if pairs else 1.0

    def within(self, limit: float) -> bool:
        return self.perplexity_ratio <= limit

    def shortfall(self, limit: float) -> str:
        return f"raise the perplexity to {self.perplexity_ratio:.3f}x the fp32 file's, above the accepted {limit}x"

    def table_lines(self) -> list[str]:
        return [
            f"{'quantized: perplexity / fp32 file':<48} {self.perplexity_ratio:>11.4f}x  "
            f"({self.perplexity:.4g} / {self.reference_perplexity:.4g})",
            f"{'quantized: greedy tokens equal to torch':<48} {self.token_agreement:>12.2f}",
        ]


def _smallest(values: list[float] | tuple[float, ...]) -> float:
    return math.nan if any(math.isnan(value) for value in values) else min(values, default=1.0)


@dataclasses.dataclass(frozen=True)
class CosineCheck:
    """A quantized encoder export against torch: per output, the cosine similarity of each
    input's output (its padded positions left out) to torch's, on the reference batches."""

    limit_name: ClassVar[str] = "min_cosine"

    #: output name -> one cosine per input, batch after batch.
    cosines: dict[str, tuple[float, ...]]

    @property
    def min_cosine(self) -> float:
        """The smallest cosine; NaN when any is (a NaN or inf output), which no limit accepts."""
        return _smallest([value for per_output in self.cosines.values() for value in per_output])

    def within(self, limit: float) -> bool:
        return self.min_cosine >= limit

    def shortfall(self, limit: float) -> str:
        return f"lower the cosine of the outputs to torch's to {self.min_cosine:.4f}, below the accepted {limit}"

    def table_lines(self) -> list[str]:
        return [
            f"{f'quantized: min cosine to torch, {name}':<48} {_smallest(values):>12.5f}  ({len(values)} inputs)"
            for name, values in self.cosines.items()
        ]


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    atol: float
    calls: list[CallCheck]
    generation: list[GenerationCheck]
    runtime: list[RuntimeCheck] = dataclasses.field(default_factory=list)
    #: for a quantized export: its quality against the fp32 file (decoders) or torch (encoders);
    #: a threshold, not `ok`, decides.
    quality: QualityCheck | CosineCheck | None = None

    @property
    def ok(self) -> bool:
        return (
            all(c.ok for c in self.calls)
            and all(g.ok for g in self.generation)
            and all(r.ok for r in self.runtime)
        )

    @property
    def nonfinite(self) -> tuple[str, ...]:
        """The sides ("torch", "ONNX Runtime") whose outputs held a NaN or inf anywhere."""
        sides = {side for check in (*self.calls, *self.runtime) for side in check.nonfinite}
        return tuple(side for side in ("torch", "ONNX Runtime") if side in sides)

    def _rows(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        """One table row per check: the row, whether the check passed, the lines under it."""
        rows = []
        for c in self.calls:
            verdict = "ok" if c.ok else f"FAIL {c.error}".strip()
            row = f"{f'observed call {c.index} ({c.graph})':<48} {c.max_abs_diff:>12.3g}  {verdict}"
            rows.append((row, c.ok, ()))
        for r in self.runtime:
            verdict = "ok" if r.ok else f"FAIL {nonfinite_text(r.nonfinite)}".strip()
            row = f"{f'runtime class, batch {r.index}: {r.output}':<48} {r.max_abs_diff:>12.3g}  {verdict}"
            rows.append((row, r.ok, ()))
        for i, g in enumerate(self.generation):
            verdict = "ok" if g.ok else f"FAIL {g.caveat}".strip()
            tokens = () if g.ok else (f"    torch: {g.torch_tokens}", f"    onnx : {g.onnx_tokens}")
            rows.append((f"{'greedy generation ' + str(i):<48} {'':>12}  {verdict}", g.ok, tokens))
        return rows

    def failures(self) -> list[str]:
        """The table rows of the checks that failed, in table order."""
        return [row.strip() for row, ok, _ in self._rows() if not ok]

    def table(self) -> str:
        """A plain-text table of every check, for logs and error messages."""
        lines = [f"{'check':<48} {'max |diff|':>12}  result"]
        for row, _, details in self._rows():
            lines.append(row)
            lines.extend(details)
        if self.quality is not None:
            lines.extend(self.quality.table_lines())
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an observer export produced.

    Attributes:
        output_dir: the finished output directory.
        model_type: `config.model_type` of the exported model.
        task: the task the model was exported for.
        onnx_files: the ONNX files written, relative to `output_dir`.
        dynamic_axes: for each ONNX input and output, its symbolic axes (axis -> name); when
            the task has several files, keyed `"{file}:{name}"` (`"decoder_model.onnx:logits"`).
        validation: the validation report, or None when validation was skipped.
        timings: wall time per stage, in seconds.
        patches: the names of the patches applied during the export (those the model's classes
            need, see `optimum-observer patches`), in the order applied.
        post_processing: the fusions and quantization applied, when asked for.
    """

    output_dir: Path
    model_type: str
    task: str
    onnx_files: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    validation: ValidationReport | None
    timings: dict[str, float]
    patches: tuple[str, ...] = ()
    post_processing: PostProcessing | None = None
