"""Greedy generation in torch: the default run's and the runtime checks' reference tokens.

Takes: a decoder-only model, a batch (`input_ids`, `attention_mask`) and greedy settings
(`max_new_tokens`, `min_new_tokens`, `pad_token_id`, `use_cache`, `do_sample=False`).
Gives: :func:`generate`, the prompt followed by the new tokens, as `model.generate` returns them.

A model with `generate` is asked for it. Some classes of transformers 4.57 have none (deprecated
models written before 4.50, when `PreTrainedModel` stopped inheriting `GenerationMixin`: open-llama,
mega, transfo-xl, xlm-prophetnet); their users run forward in a loop, and so does
:func:`greedy_loop`: each step's inputs come from the model's own `prepare_inputs_for_generation`
when it has one (what its `generate` called), the cache forward returned is fed back (key/value
tuples as the `DynamicCache` their forward reads), and the highest logit is taken. The exported graph is still used through the runtime class's `generate`
(its own `GenerationMixin`), which this loop stands in for on the torch side.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .cache_pytree import is_legacy_key_value_cache

#: Where forward returns its cache, in the order `GenerationMixin` looks for it.
CACHE_OUTPUTS = ("past_key_values", "cache_params", "state", "mems", "past_buckets_states")


def has_generate(model: Any) -> bool:
    return callable(getattr(model, "generate", None))


def generate(model: Any, inputs: dict[str, torch.Tensor], **settings: Any) -> torch.Tensor:
    """`model.generate(**inputs, **settings)`, or :func:`greedy_loop` for a model without it."""
    if has_generate(model):
        return model.generate(**inputs, **settings)
    return greedy_loop(model, inputs, **settings)


def _eos_token_ids(model: Any) -> list[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _accepts(model: Any) -> tuple[set[str], bool]:
    parameters = inspect.signature(model.forward).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return set(parameters), any_keyword


def _step_inputs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor | None, cache: Any, use_cache: bool
) -> dict[str, Any]:
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    # The positions this step adds to the cache, as generate passes them (GenerationMixin's own
    # prepare_inputs_for_generation needs them; older models' ignore them).
    cache_position = torch.arange(0 if cache is None else ids.shape[1] - 1, ids.shape[1], device=ids.device)
    if prepare is not None:
        inputs = prepare(
            ids, past_key_values=cache, attention_mask=mask, use_cache=use_cache, cache_position=cache_position
        )
    else:
        inputs = {"input_ids": ids[:, -1:] if cache is not None else ids, "attention_mask": mask}
        if mask is not None:
            positions = mask.long().cumsum(-1) - 1
            inputs["position_ids"] = positions.masked_fill(mask == 0, 1)[:, -inputs["input_ids"].shape[1] :]
        inputs["past_key_values"] = cache
    inputs.setdefault("use_cache", use_cache)
    accepted, any_keyword = _accepts(model)
    return {k: v for k, v in inputs.items() if v is not None and (any_keyword or k in accepted)}


def _as_cache(cache: Any) -> Any:
    """The cache forward returned, ready to be fed back: key/value pairs returned as tuples (the
    legacy format, which the deprecated models' forward still returns) become the `DynamicCache`
    their forward reads (`past_key_values.get_seq_length()`, annotated `Optional[Cache]`)."""
    if not is_legacy_key_value_cache(cache):
        return cache
    from transformers import DynamicCache

    return DynamicCache.from_legacy_cache(cache)


def greedy_loop(
    model: Any,
    inputs: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    pad_token_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedy decoding by calling forward once per new token, as `generate` would: the end of
    sequence token is masked until `min_new_tokens`, and a finished row continues with
    `pad_token_id`. Only greedy decoding: `do_sample=True` is refused."""
    if do_sample:
        raise ValueError(f"{type(model).__name__} has no generate(); the loop that stands in for it is greedy only")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__} has no generate(), and the greedy loop that stands in for it drives "
            "decoder-only models only (an encoder-decoder model's run needs its encoder outputs fed to every "
            "decoder step)"
        )
    device = next(model.parameters()).device
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    eos = _eos_token_ids(model)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    cache = None
    with torch.no_grad():
        for step in range(max_new_tokens):
            outputs = model(**_step_inputs(model, ids, mask, cache, use_cache))
            logits = outputs.logits[:, -1, :].float()
            if eos and step < min_new_tokens:
                logits[:, eos] = -float("inf")
            new = logits.argmax(-1)
            if pad_token_id is not None:
                new = torch.where(finished, torch.full_like(new, pad_token_id), new)
            ids = torch.cat([ids, new[:, None]], dim=-1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            if use_cache:
                cache = _as_cache(next((outputs[name] for name in CACHE_OUTPUTS if outputs.get(name) is not None), None))
            if eos:
                finished |= torch.isin(new, torch.tensor(eos, device=device))
                if bool(finished.all()):
                    break
    return ids
