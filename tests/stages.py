"""Runs the stages of the observer export on a tiny model, for stage-level tests; and the one way
the patch tests convert a model without some patches.

:func:`observe` loads nothing itself: it captures and synthesizes every graph of a loaded model
as the pipeline does, once; :func:`conversion_error`, :func:`convert_without` and
:func:`replay_without` then convert those graphs as often as a test needs, with every export
patch but the ones it names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from optimum_observer import capture, conversion, loading, naming, synthesis, validation
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.errors import ObserverExportError
from optimum_observer.patches import PATCHES, Patch, for_model
from optimum_observer.result import CallCheck
from optimum_observer.synthesis import ExportExample
from optimum_observer.tasks import TaskContract, get_task
from tiny_models import save_causal_lm

CONTRACT = get_task("text-generation-with-past")


def load_tiny(model_type: str, directory: Path, **overrides: Any) -> loading.LoadedModel:
    return load(save_causal_lm(model_type, directory, **overrides))


def load(source: Path | torch.nn.Module, contract: TaskContract = CONTRACT) -> loading.LoadedModel:
    """Loads a saved model (or takes a built one) for `contract` as the pipeline does, on CPU in fp32."""
    return loading.load(
        source,
        contract,
        tokenizer=None,
        dtype=None,
        device="cpu",
        trust_remote_code=False,
        model_kwargs=None,
        hub_kwargs={},
    )


def capture_and_synthesize(loaded: loading.LoadedModel, run=None):
    with registered_caches():
        (captured,) = capture.capture(loaded.model, CONTRACT, loaded.model_type, run, loaded.tokenizer)
        example = synthesis.synthesize(captured, loaded.model_type)
    return captured, example


@dataclasses.dataclass
class Observed:
    """A loaded model's run, captured and synthesized per graph of its task: ready to convert."""

    loaded: loading.LoadedModel
    captures: list[capture.Capture]
    examples: list[ExportExample]

    @property
    def model_type(self) -> str:
        return self.loaded.model_type


def observe(loaded: loading.LoadedModel, contract: TaskContract = CONTRACT) -> Observed:
    with registered_caches():
        captures = capture.capture(loaded.model, contract, loaded.model_type, None, loaded.tokenizer)
        examples = [synthesis.synthesize(c, loaded.model_type) for c in captures]
    return Observed(loaded, captures, examples)


def without(observed: Observed, *names: str) -> list[Patch]:
    """The patches the pipeline applies to the observed model but `names`, each of which must be
    one of them (so a test of a patch also checks that the model's export selects it)."""
    selected = for_model(PATCHES, observed.loaded.model, observed.model_type)
    unknown = set(names) - {p.name for p in selected}
    assert not unknown, f"not a patch {observed.model_type}'s export applies: {sorted(unknown)}"
    return [p for p in selected if p.name not in names]


def convert_without(observed: Observed, *names: str, graph: int = 0) -> torch.onnx.ONNXProgram:
    """Converts one graph as the pipeline does, without the patches `names`; raises the export
    stage's ObserverExportError when torch.export or the ONNX translation refuses."""
    captured = observed.captures[graph]
    with registered_caches():
        return conversion.convert(
            observed.loaded.model,
            captured.graph,
            observed.examples[graph],
            observed.model_type,
            patches=without(observed, *names),
            position_offset=captured.position_offset,
        )


def conversion_error(observed: Observed, *names: str) -> ObserverExportError:
    """The error of the first graph (in the pipeline's order) that fails to convert without `names`."""
    for graph in range(len(observed.captures)):
        try:
            convert_without(observed, *names, graph=graph)
        except ObserverExportError as error:
            return error
    raise AssertionError(f"{observed.model_type} converted without {names}")


def replay_without(observed: Observed, directory: Path, *names: str) -> list[CallCheck]:
    """Every observed call replayed through the first graph converted without `names`, named and
    saved in `directory` (the replay of validation, without its generation check)."""
    program = convert_without(observed, *names)
    captured, example = observed.captures[0], observed.examples[0]
    with registered_caches():
        naming.apply_names(program, captured, example, observed.model_type)
    path = Path(directory) / "model.onnx"
    program.save(str(path))
    return validation.replay_calls(path, captured, example, naming.input_names(example), atol=1e-4)
