"""Capture: run the model the way a user would, under `torch.onnx.InputObserver`.

Takes: a loaded model, the task contract, an optional user `run` callable and tokenizer.
Gives: a :class:`Capture`, the observed calls projected onto the task contract (only the inputs
the runtime feeds; an empty cache counts as absent), each with the outputs torch returned, and
a second observer fed with those projected calls, whose `infer_dynamic_shapes` the next stage
uses.

Observing does not change what the run returns: the observer stores clones and hands the
model's own outputs back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import ObserverExportError, Stage
from .tasks import TaskContract

logger = logging.getLogger(__name__)

#: calls stored at most; generate() makes one call per new token.
MAX_STORED_CALLS = 64
DEFAULT_PROMPTS = (
    "Hello, my dog is cute",
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time",
)


@dataclasses.dataclass
class ObservedCall:
    """One call to `forward`, restricted to the task contract's inputs."""

    inputs: dict[str, Any]
    outputs: Any


@dataclasses.dataclass
class Capture:
    calls: list[ObservedCall]
    observer: torch.onnx.InputObserver
    return_value: Any


def _num_leaves(value: Any) -> int:
    return len(pytree.tree_flatten(value)[0])


def default_run(model: Any, tokenizer: Any | None = None) -> Callable[[Any], Any]:
    """`generate` over prompts of different lengths with batch 2 then 3, left padded."""

    padding_tokenizer = left_padding_copy(tokenizer)

    def run(model: Any) -> list[torch.Tensor]:
        # Two short prompts, then all three: the batches differ in size and in padded length.
        batches = [[DEFAULT_PROMPTS[0], DEFAULT_PROMPTS[2]], list(DEFAULT_PROMPTS)]
        vocab = model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(0)
        results = []
        for prompts in batches:
            if padding_tokenizer is not None:
                encoded = padding_tokenizer(prompts, return_tensors="pt", padding=True)
                input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            else:
                lengths = [4 + 2 * i for i in range(len(prompts))]
                input_ids = torch.randint(3, vocab, (len(prompts), max(lengths)), generator=generator)
                attention_mask = torch.ones_like(input_ids)
                for row, length in enumerate(lengths):
                    attention_mask[row, : max(lengths) - length] = 0
            results.append(
                model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    max_new_tokens=3,
                    min_new_tokens=3,
                    do_sample=False,
                    pad_token_id=pad_token_id(model, tokenizer),
                )
            )
        return results

    return run


def left_padding_copy(tokenizer: Any | None) -> Any | None:
    """A copy padding on the left (as batched generation needs); the caller's is left as it is."""
    if tokenizer is None:
        return None
    padding_tokenizer = copy.deepcopy(tokenizer)
    padding_tokenizer.padding_side = "left"
    if padding_tokenizer.pad_token is None:
        padding_tokenizer.pad_token = padding_tokenizer.eos_token or padding_tokenizer.unk_token
    return padding_tokenizer


def pad_token_id(model: Any, tokenizer: Any | None) -> int:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(model.generation_config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def _project(
    args: tuple[Any, ...], kwargs: dict[str, Any], signature_names: list[str], contract: TaskContract
) -> dict[str, Any]:
    named = {**dict(zip(signature_names, args)), **kwargs}
    projected = {}
    for name in contract.inputs:
        value = named.get(name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) and _num_leaves(value) == 0:
            # A cache whose layers are not initialised yet: the prefill call of generate().
            continue
        projected[name] = value
    return projected


def _contract_replay(contract: TaskContract) -> torch.nn.Module:
    """A module whose `forward` has exactly the contract's inputs as keyword parameters, so a
    second observer records the projected calls under the signature the export will use."""

    def forward(self: torch.nn.Module, **kwargs: Any) -> None:
        return None

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in contract.inputs]
    )
    return type("ContractReplay", (torch.nn.Module,), {"forward": forward})()


def capture(
    model: Any,
    contract: TaskContract,
    model_type: str,
    run: Callable[[Any], Any] | None = None,
    tokenizer: Any | None = None,
) -> Capture:
    run = run or default_run(model, tokenizer)
    observer = torch.onnx.InputObserver()
    try:
        with observer(model, store_n_calls=MAX_STORED_CALLS):
            return_value = run(model)
    except Exception as error:
        raise ObserverExportError(
            model_type,
            Stage.CAPTURE,
            f"running the model under the observer raised {type(error).__name__}: {error}",
            "check that the model runs in plain PyTorch with the same `run` callable "
            "(for the default run: model.generate on a batch of token ids).",
        ) from error

    if observer.num_obs() == 0:
        raise ObserverExportError(
            model_type,
            Stage.CAPTURE,
            "the run never called the model's forward, so there is nothing to export",
            "pass a `run` callable that calls the model it receives (for example model.generate(...) "
            "or model(**inputs)).",
        )

    info = observer.info
    calls = [
        ObservedCall(
            _project(candidate.args, candidate.kwargs, info.signature_names, contract),
            pytree.tree_unflatten(outputs, spec),
        )
        for candidate, outputs, spec in zip(info.inputs, info.flat_outputs, info.outputs_specs)
    ]
    contract_observer = torch.onnx.InputObserver()
    replay = _contract_replay(contract)
    with contract_observer(replay, store_n_calls=len(calls)):
        for call in calls:
            replay(**call.inputs)
    logger.info("captured %d calls to forward", len(calls))
    return Capture(calls=calls, observer=contract_observer, return_value=return_value)
