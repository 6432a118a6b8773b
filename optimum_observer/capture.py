"""Capture: run the model the way a user would, under `torch.onnx.InputObserver`.

Takes: a loaded model, the task contract, an optional user `run` callable (by default the task
family's, :mod:`optimum_observer.families`), tokenizer and feature extractor.
Gives: one :class:`Capture` per graph of the contract: the observed calls of the graph's module
(the model, or its encoder) that belong to the graph (all, or the generate steps without or with
a cache), projected onto the graph's inputs (only the inputs the runtime feeds; an empty cache
counts as absent), each with the outputs torch returned, and a second observer fed with those
projected calls, whose `infer_dynamic_shapes` the next stage uses.

Observing does not change what the run returns: the observer stores clones and hands the
model's own outputs back unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import vision_language
from .errors import RUN_FAILS_WITHOUT_OBSERVER, ErrorKind, ObserverExportError, Stage
from .families import family_of
from .tasks import CACHE, Calls, GraphContract, TaskContract

logger = logging.getLogger(__name__)

#: calls stored at most per observed module; generate() makes one call per new token.
MAX_STORED_CALLS = 64


@dataclasses.dataclass
class ObservedCall:
    """One call to `forward`, restricted to the graph contract's inputs."""

    inputs: dict[str, Any]
    outputs: Any
    #: tensors forward also received that are not graph inputs (`cache_position` aside, which
    #: the model derives from the cache): the runtime never feeds them.
    unfed: tuple[str, ...] = ()


@dataclasses.dataclass
class Capture:
    """The observed calls of one graph."""

    graph: GraphContract
    calls: list[ObservedCall]
    observer: torch.onnx.InputObserver
    return_value: Any
    #: what the model's positions add to the runtime's (see :func:`position_offset`); the calls'
    #: `position_ids` are the runtime's, and the export adds this back inside the graph.
    position_offset: int = 0


def _num_leaves(value: Any) -> int:
    return len(pytree.tree_flatten(value)[0])


def observed_module(model: Any, module: str) -> torch.nn.Module:
    """The module a graph is observed on: the model, its encoder, or a part of a vision-language
    model (a new module around the model's own submodules, :data:`vision_language.PARTS`)."""
    if module == "model":
        return model
    if module in vision_language.PARTS:
        return vision_language.PARTS[module](model)
    return model.get_encoder()


def _named(args: tuple[Any, ...], kwargs: dict[str, Any], signature_names: list[str]) -> dict[str, Any]:
    return {**dict(zip(signature_names, args)), **kwargs}


def _belongs(named: dict[str, Any], graph: GraphContract) -> bool:
    if graph.calls is Calls.ALL:
        return True
    # transformers 5 passes the cache as `cache`; an absent argument is no past (pytree counts a
    # None as one leaf, which sent every transformers-5 decoder call to the with-past graph).
    cache = next((named[n] for n in ("past_key_values", CACHE) if named.get(n) is not None), None)
    has_past = cache is not None and _num_leaves(cache) > 0
    return has_past == (graph.calls is Calls.WITH_PAST)


def _project(named: dict[str, Any], graph: GraphContract) -> dict[str, Any]:
    projected = {}
    for contract_input in graph.inputs:
        value = next((named[s] for s in contract_input.sources if named.get(s) is not None), None)
        if value is not None and contract_input.first_of:
            value = value[0]
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) and _num_leaves(value) == 0:
            # A cache whose layers are not initialised yet: the prefill call of generate().
            continue
        projected[contract_input.name] = value
    return projected


def runtime_position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The `position_ids` Optimum's ORTModelForCausalLM feeds: the attention mask counted from 0,
    1 on padding, for the last `new_tokens` positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -new_tokens:]


def position_offset(calls: list[ObservedCall]) -> int:
    """The constant the model's `position_ids` add to the runtime's on every unpadded position
    (RoBERTa-style models count from `padding_idx + 1`), or 0 when they are the runtime's or
    differ by no single constant."""
    offsets = set()
    for call in calls:
        positions, mask = call.inputs.get("position_ids"), call.inputs.get("attention_mask")
        if not isinstance(positions, torch.Tensor) or not isinstance(mask, torch.Tensor):
            continue
        if positions.dim() != 2 or mask.dim() != 2 or positions.shape[0] != mask.shape[0]:
            return 0
        visible = mask[:, -positions.shape[1] :] != 0
        difference = positions - runtime_position_ids(mask, positions.shape[1])
        offsets.update(int(d) for d in difference[visible].unique())
    return offsets.pop() if len(offsets) == 1 else 0


def _with_runtime_positions(call: ObservedCall) -> ObservedCall:
    positions, mask = call.inputs.get("position_ids"), call.inputs.get("attention_mask")
    if positions is None or mask is None:
        return call
    runtime = runtime_position_ids(mask, positions.shape[1]).to(positions.dtype)
    return dataclasses.replace(call, inputs={**call.inputs, "position_ids": runtime})


def _unfed_tensors(named: dict[str, Any], graph: GraphContract) -> tuple[str, ...]:
    sources = {s for i in graph.inputs for s in i.sources} | {"cache_position"}
    return tuple(k for k, v in named.items() if isinstance(v, torch.Tensor) and k not in sources)


def _contract_replay(graph: GraphContract) -> torch.nn.Module:
    """A module whose `forward` has exactly the graph's inputs as keyword parameters, so a
    second observer records the projected calls under the signature the export will use."""

    def forward(self: torch.nn.Module, **kwargs: Any) -> None:
        return None

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in graph.input_names]
    )
    return type("ContractReplay", (torch.nn.Module,), {"forward": forward})()


def _graph_capture(
    graph: GraphContract, observer: torch.onnx.InputObserver, return_value: Any, model_type: str
) -> Capture:
    info = observer.info
    if graph.observed_inputs:
        seen = (_named(c.args, c.kwargs, info.signature_names) for c in info.inputs)
        tensors = (name for named in seen for name, value in named.items() if isinstance(value, torch.Tensor))
        graph = graph.with_observed(list(dict.fromkeys(tensors)))
    calls = []
    for candidate, outputs, spec in zip(info.inputs, info.flat_outputs, info.outputs_specs):
        named = _named(candidate.args, candidate.kwargs, info.signature_names)
        if _belongs(named, graph):
            outputs = pytree.tree_unflatten(outputs, spec)
            calls.append(ObservedCall(_project(named, graph), outputs, _unfed_tensors(named, graph)))
    if not calls:
        raise ObserverExportError(
            model_type,
            Stage.CAPTURE,
            f"the run called the {graph.module} but never in the way {graph.file_name} is exported from "
            f"(calls {graph.calls.value}), so that graph has nothing to export",
            "run the whole model the way it is used, for example model.generate(...) for a "
            "generation task, which calls the encoder once and the decoder once per new token "
            "(at least 2 new tokens).",
        )
    offset = position_offset(calls)
    if offset:
        logger.info("position_ids are the runtime's + %d: the graph takes the runtime's", offset)
        calls = [_with_runtime_positions(call) for call in calls]
    contract_observer = torch.onnx.InputObserver()
    replay = _contract_replay(graph)
    with contract_observer(replay, store_n_calls=len(calls)):
        for call in calls:
            replay(**call.inputs)
    logger.info("captured %d calls for %s", len(calls), graph.file_name)
    return Capture(graph, calls, contract_observer, return_value, position_offset=offset)


def _run_failure(
    model: Any, run: Callable[[Any], Any], contract: TaskContract, model_type: str, error: Exception
) -> ObserverExportError:
    """The error of a run that raised under the observer; the run is tried once more without
    it, to tell the model's own failure from the observer's."""
    try:
        run(model)
    except Exception:
        return ObserverExportError(
            model_type,
            Stage.CAPTURE,
            f"{RUN_FAILS_WITHOUT_OBSERVER}: {type(error).__name__}: {error}",
            "the run fails in plain PyTorch as well, so the observer is not the cause: check the run "
            "and the model's code in the installed transformers version (for the default run: "
            f"{family_of(contract).run_hint}).",
            kind=ErrorKind.MODEL_RUN,
        )
    return ObserverExportError(
        model_type,
        Stage.CAPTURE,
        f"running the model under the observer raised {type(error).__name__}: {error}",
        "check that the model runs in plain PyTorch with the same `run` callable "
        f"(for the default run: {family_of(contract).run_hint}).",
    )


@contextlib.contextmanager
def _observing(observer: torch.onnx.InputObserver, module: torch.nn.Module) -> Iterator[None]:
    """`observer(module)`, leaving no instance attribute `forward` behind: the observer puts the
    bound method back as one (a reference cycle, and a `forward` that hides the class's)."""
    had_forward = "forward" in vars(module)
    try:
        with observer(module, store_n_calls=MAX_STORED_CALLS):
            yield
    finally:
        if not had_forward:
            vars(module).pop("forward", None)


def _check_position_limit(model: Any, calls: list[ObservedCall], model_type: str) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    fed = max((_positions(call) for call in calls), default=0)
    if fed > limit:
        logger.warning(
            "[%s] the run fed %d positions, more than the model's max_position_embeddings (%d): the "
            "model was observed past its position limit, where its outputs are not meaningful, and "
            "the export's example sizes come from these calls. Run it on prompts shorter than %d "
            "tokens (including the new ones).",
            model_type,
            fed,
            limit,
            limit,
        )


def _positions(call: ObservedCall) -> int:
    """The positions one call covers: its attention mask's length, or its tokens after what its
    cache holds (a cache without positions, a state-space model's, holds none)."""
    mask = call.inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.shape[1]
    ids, cache = call.inputs.get("input_ids"), call.inputs.get("past_key_values")
    cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return (ids.shape[-1] if isinstance(ids, torch.Tensor) else 0) + int(cached)


def _sizes(captures: list[Capture], name: str, axis: int) -> set[int]:
    return {
        call.inputs[name].shape[axis]
        for capture in captures
        for call in capture.calls
        if isinstance(call.inputs.get(name), torch.Tensor) and call.inputs[name].dim() > axis
    }


def check_observed_sizes(captures: list[Capture], contract: TaskContract, model_type: str) -> None:
    """Refuses a run whose observations cannot give the graph the runtime needs, naming why.

    Axes the runtime varies are exported dynamic only when the run showed them at two sizes: a
    decoder observed at one sequence length gets `input_ids` fixed to it, and one observed
    with fewer than two cached steps gets no past inputs or a fixed past length. An encoder
    observed at one length, or any model at one batch size, is only warned about (a caller may
    mean it; the batch axis is made dynamic regardless, but not checked at other sizes).
    """
    hint = (
        "run the model at two batch sizes and two prompt lengths, as the default run does "
        "(leave run=None), e.g. model.generate on batches of 2 and 3 prompts of different lengths "
        "with max_new_tokens >= 3"
    )
    lengths = _sizes(captures, "input_ids", 1)
    one_graph_for_every_step = family_of(contract).one_graph_for_every_step
    if len(lengths) == 1 and one_graph_for_every_step:
        raise ObserverExportError(
            model_type,
            Stage.SYNTHESIS,
            f"every call of the run fed input_ids of one length ({lengths.pop()}), so the sequence "
            "axis, which the runtime varies, would be fixed to that length in the graph",
            hint + ".",
        )
    if len(lengths) == 1:
        logger.warning(
            "[%s] every call of the run fed input_ids of one length (%d): the graph accepts only "
            "that length; %s.",
            model_type,
            next(iter(lengths)),
            hint,
        )
    # The graphs that serve the prompt and every cached step (a decoder-only model's, a
    # vision-language model's decoder) need the cache seen at two lengths.
    for capture in captures:
        if capture.graph.calls is not Calls.ALL or "past_key_values" not in capture.graph.input_names:
            continue
        cached = sum("past_key_values" in call.inputs for call in capture.calls)
        if cached < 2:
            raise ObserverExportError(
                model_type,
                Stage.SYNTHESIS,
                f"{contract.name} needs calls that read a cache (past_key_values), seen at two "
                f"lengths; the run made {cached}, so the graph would have "
                + ("no past inputs" if not cached else "its past length fixed"),
                "generate at least 3 new tokens with the cache on (model.generate(..., "
                "max_new_tokens=3, use_cache=True)), or, for a decoder-only model, export for "
                "text-generation (no cache).",
            )
    batches = _sizes(captures, "input_ids", 0) or _sizes(captures, contract.graphs[0].inputs[0].name, 0)
    if len(batches) == 1:
        logger.warning(
            "[%s] the run showed one batch size (%d): the batch axis is exported dynamic, but no "
            "other size was observed or is checked; %s.",
            model_type,
            next(iter(batches)),
            hint,
        )


def capture(
    model: Any,
    contract: TaskContract,
    model_type: str,
    run: Callable[[Any], Any] | None = None,
    tokenizer: Any | None = None,
    feature_extractor: Any | None = None,
) -> list[Capture]:
    """Runs `run(model)` with one observer per observed module; one :class:`Capture` per graph."""
    family = family_of(contract)
    run = run or family.default_run(model, contract, tokenizer, feature_extractor)
    modules = {name: observed_module(model, name) for name in contract.observed_modules}
    observers = {name: torch.onnx.InputObserver() for name in contract.observed_modules}
    try:
        with contextlib.ExitStack() as stack:
            for name, observer in observers.items():
                stack.enter_context(_observing(observer, modules[name]))
            stack.enter_context(family.routed(model, modules))
            return_value = run(model)
    except Exception as error:
        raise _run_failure(model, run, contract, model_type, error) from error

    for name, observer in observers.items():
        if observer.num_obs() == 0:
            what = "forward" if name == "model" else f"{name}'s forward"
            raise ObserverExportError(
                model_type,
                Stage.CAPTURE,
                f"the run never called the model's {what}, so there is nothing to export",
                "pass a `run` callable that calls the model it receives the way it is used (for "
                "example model.generate(...) or model(**inputs)).",
            )
    captures = [
        _graph_capture(graph, observers[graph.module], return_value, model_type) for graph in contract.graphs
    ]
    _check_position_limit(model, [call for c in captures for call in c.calls], model_type)
    return captures
