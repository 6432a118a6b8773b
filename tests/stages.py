"""Runs the first stages of the observer export on a tiny model, for stage-level tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimum_observer import capture, loading, synthesis
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.tasks import TaskContract, get_task
from tiny_models import save_causal_lm

CONTRACT = get_task("text-generation-with-past")


def load_tiny(model_type: str, directory: Path, **overrides: Any) -> loading.LoadedModel:
    return load(save_causal_lm(model_type, directory, **overrides))


def load(source: Path, contract: TaskContract = CONTRACT) -> loading.LoadedModel:
    """Loads a saved model for `contract` as the pipeline does, on CPU in fp32."""
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
