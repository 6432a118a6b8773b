"""Scoped patches that make the loops over time of recurrent language models exportable.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Why: RWKV's attention on CPU (`rwkv_linear_attention_cpu`), xLSTM's mLSTM backend and
RecurrentGemma's RG-LRU step through the sequence in a Python loop (`for t in range(seq_len)`).
torch.export unrolls the loop to the example's length and so fixes the sequence axis the
contract declares dynamic: "Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of 3 for
dimension inputs['input_ids'].shape[1]". The replacements run the same per-step update under
`torch.ops.higher_order.scan`, which exports to one ONNX `Scan` whatever the length.

xLSTM's backend also picks its kernel by the length in Python: one step for a single token, its
chunkwise form for whole chunks of `chunk_size` tokens, the step loop for the rest. The
replacement scans the step for every length: exactly torch's path below `chunk_size` tokens, and
for longer prompts the recurrent form of what the chunkwise one computes in parallel. In
transformers 4.57 the native chunkwise kernel itself raises ("'Tensor' object is not callable",
then a wrong `view` of the states once that is fixed), so the model's own run fails from
`chunk_size` tokens on: this patch is applied around the model's own runs too
(:attr:`~optimum_observer.patches.registry.Patch.model_runs`).

RecurrentGemma's RG-LRU keeps its state on the module (`rg_lru.recurrent_states`) and reads it
on the next call even when the model runs without a cache, so the model's own
`generate(use_cache=False)` on a batch of 3 after one of 2 fails in plain torch ("The size of
tensor a (3) must match the size of tensor b (2)"; transformers 4.57). The patch starts every
call without a cache from no state and keeps none, as upstream's prefill with a cache does
(for equal batch sizes the values are upstream's: its recurrence resets at position 0). It is
applied around the model's own runs too (:attr:`~optimum_observer.patches.registry.Patch.model_runs`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._higher_order_ops.scan import scan

from .registry import Patch

_LOOP_OVER_TIME = (
    "Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape of N for "
    "dimension inputs['input_ids'].shape[1] (a Python loop over the sequence, unrolled to the "
    "example's length)"
)


def _rwkv_linear_attention_scanned(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: list[torch.Tensor] | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """`rwkv_linear_attention_cpu` with its loop over the sequence (axis 1 of `key`) as a scan:
    the same numerically stable WKV update, step by step."""
    if state is None:
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
    else:
        num_state, den_state, max_state = state
    time_decay = -torch.exp(time_decay)

    def step(
        carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor], xs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        num, den, largest = carry
        current_key, current_value = xs
        current_key = current_key.float()
        max_for_output = torch.maximum(largest, current_key + time_first)
        e1 = torch.exp(largest - max_for_output)
        e2 = torch.exp(current_key + time_first - max_for_output)
        output = ((e1 * num + e2 * current_value) / (e1 * den + e2)).to(key.dtype)
        max_for_state = torch.maximum(largest + time_decay, current_key)
        e1 = torch.exp(largest + time_decay - max_for_state)
        e2 = torch.exp(current_key - max_for_state)
        carry = (
            (e1 * num + e2 * current_value).contiguous(),
            (e1 * den + e2).contiguous(),
            max_for_state.contiguous(),
        )
        return carry, output

    initial = (num_state.contiguous(), den_state.contiguous(), max_state.contiguous())
    (num_state, den_state, max_state), outputs = scan(step, initial, (key.movedim(1, 0), value.movedim(1, 0)))
    if return_state or state is not None:
        state = [num_state, den_state, max_state]
    return outputs.movedim(0, 1), state


def _xlstm_backend_scanned(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(
        self: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        igate: torch.Tensor,
        fgate: torch.Tensor,
        c_initial: torch.Tensor | None = None,
        n_initial: torch.Tensor | None = None,
        m_initial: torch.Tensor | None = None,
        return_last_states: bool = False,
        mode: str | None = None,
    ) -> Any:
        """`xLSTMBackend.forward` in inference mode: the step kernel scanned over the sequence
        (axis 2 of `query`) for every length; training goes to the original."""
        if "inference" not in (mode or self.config.mode):
            return original(
                self, query, key, value, igate, fgate, c_initial, n_initial, m_initial, return_last_states, mode
            )
        batch_size, heads, _, qk_head_dim = key.shape
        state_dtype = getattr(torch, self.config.inference_state_dtype)
        zeros = functools.partial(torch.zeros, device=key.device, dtype=torch.float32)
        initial = (
            c_initial if c_initial is not None else zeros(batch_size, heads, qk_head_dim, value.shape[-1]),
            n_initial if n_initial is not None else zeros(batch_size, heads, qk_head_dim),
            m_initial if m_initial is not None else zeros(batch_size, heads, 1),
        )

        def step(
            carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor], xs: tuple[torch.Tensor, ...]
        ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
            query_t, key_t, value_t, igate_t, fgate_t = xs
            hidden, states = self.step_kernel_fn(
                query=query_t,
                key=key_t,
                value=value_t,
                igate=igate_t[..., None],
                fgate=fgate_t[..., None],
                cstate=carry[0],
                nstate=carry[1],
                mstate=carry[2],
                eps=self.config.eps,
                dtype_state=state_dtype,
            )
            return tuple(s.contiguous() for s in states), hidden

        xs = tuple(t.movedim(2, 0) for t in (query, key, value, igate, fgate))
        states, hidden = scan(step, tuple(s.contiguous() for s in initial), xs)
        return hidden.movedim(0, 2), states

    return forward


def _rg_lru_scanned(self: torch.nn.Module, activations: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """`RecurrentGemmaRglru.forward` with its loop over the sequence as a scan, from the state on
    the module (zeros when there is none), for every length; the input normalisation is
    `sqrt(1 - a^2)` as upstream computes it eagerly (upstream skips it while tracing)."""
    batch_size, seq_len, lru_width = activations.shape
    reset = position_ids[:, :, None] == 0
    reshaped = activations.reshape(batch_size * seq_len, self.num_attention_heads, self.block_width).permute(1, 0, 2)

    def gate(bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        res = torch.baddbmm(bias[:, None, :], reshaped, weight)
        return torch.sigmoid(res.transpose(0, 1).reshape(batch_size, seq_len, lru_width))

    input_gate = gate(self.input_gate_bias, self.input_gate_weight)
    log_recurrent_gate = -8.0 * gate(self.recurrent_gate_bias, self.recurrent_gate_weight)
    log_recurrent_gate = log_recurrent_gate * torch.nn.functional.softplus(self.recurrent_param)
    recurrent_gate = torch.exp(log_recurrent_gate) * ~reset
    multiplier = reset + ~reset * torch.sqrt(1 - torch.exp(2 * log_recurrent_gate))
    normalized = activations * input_gate * multiplier.type(activations.dtype)
    state = self.recurrent_states
    if state is None:
        state = torch.zeros((batch_size, lru_width), dtype=torch.float32, device=activations.device)

    def step(carry: torch.Tensor, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        gate_t, input_t = xs
        carry = (gate_t.float() * carry + input_t.float()).contiguous()
        return carry, carry.to(activations.dtype, copy=True)

    state, outputs = scan(step, state.float().contiguous(), (recurrent_gate.movedim(1, 0), normalized.movedim(1, 0)))
    self.recurrent_states = state
    return outputs.movedim(0, 1)


def _recurrent_gemma_block_without_stale_state(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(
        self: torch.nn.Module,
        input_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache_position: torch.Tensor,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """`RecurrentGemmaRecurrentBlock.forward`; without a cache, from no RG-LRU state and
        keeping none."""
        if use_cache:
            return original(self, input_states, position_ids, attention_mask, cache_position, use_cache)
        self.rg_lru.recurrent_states = None
        try:
            return original(self, input_states, position_ids, attention_mask, cache_position, use_cache)
        finally:
            self.rg_lru.recurrent_states = None

    return forward


PATCHES = (
    Patch(
        name="rwkv_scanned_linear_attention",
        target="transformers.models.rwkv.modeling_rwkv:rwkv_linear_attention_cpu",
        replacement=_rwkv_linear_attention_scanned,
        fixes=_LOOP_OVER_TIME,
    ),
    Patch(
        name="xlstm_scanned_backend",
        target="transformers.models.xlstm.modeling_xlstm:xLSTMBackend.forward",
        wrap=_xlstm_backend_scanned,
        fixes=f"{_LOOP_OVER_TIME}; and, in the model's own run from `chunk_size` tokens on, TypeError: "
        "'Tensor' object is not callable (transformers 4.57's native chunkwise kernel)",
        model_runs=True,
    ),
    Patch(
        name="recurrent_gemma_scanned_rg_lru",
        target="transformers.models.recurrent_gemma.modeling_recurrent_gemma:RecurrentGemmaRglru.forward",
        replacement=_rg_lru_scanned,
        fixes=_LOOP_OVER_TIME,
    ),
    Patch(
        name="recurrent_gemma_no_state_without_cache",
        target="transformers.models.recurrent_gemma.modeling_recurrent_gemma:RecurrentGemmaRecurrentBlock.forward",
        wrap=_recurrent_gemma_block_without_stale_state,
        fixes="RuntimeError: The size of tensor a (3) must match the size of tensor b (2) at non-singleton "
        "dimension 0 (without a cache, the RG-LRU reads the state the previous call left on the module: "
        "the model's own generate(use_cache=False) fails when the batch size changes)",
        model_runs=True,
    ),
)
