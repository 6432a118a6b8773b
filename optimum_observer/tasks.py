"""The tasks the observer stack exports, as data: what the runtime feeds and reads back.

A task contract names the graph inputs the matching `optimum.onnxruntime` class feeds, in
order, and the outputs it reads. Observed `forward` arguments outside the contract (for example
`cache_position`, which the runtime never feeds) are left for the model to compute itself.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TaskContract:
    name: str
    auto_model_class: str
    runtime_class: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    with_past: bool


TASKS: dict[str, TaskContract] = {
    contract.name: contract
    for contract in (
        TaskContract(
            name="text-generation-with-past",
            auto_model_class="AutoModelForCausalLM",
            runtime_class="ORTModelForCausalLM",
            inputs=("input_ids", "attention_mask", "position_ids", "past_key_values"),
            outputs=("logits", "past_key_values"),
            with_past=True,
        ),
        TaskContract(
            name="text-generation",
            auto_model_class="AutoModelForCausalLM",
            runtime_class="ORTModelForCausalLM",
            inputs=("input_ids", "attention_mask", "position_ids"),
            outputs=("logits",),
            with_past=False,
        ),
    )
}


def supported_tasks() -> tuple[str, ...]:
    """The task names :func:`optimum_observer.export` accepts."""
    return tuple(TASKS)


def get_task(name: str) -> TaskContract:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"Unknown task {name!r} for the observer exporter; supported: {', '.join(TASKS)}."
        ) from None
