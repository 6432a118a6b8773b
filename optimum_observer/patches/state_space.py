"""Scoped patches that make state-space (Mamba) mixers exportable with their states.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

Why: transformers' Mamba mixers run two different programs, picked in Python: a prefill that
convolves the whole prompt and a decode step that rolls a one-token convolution window, chosen
by `cache_position.shape[0] == conv_kernel_size`, and a Python loop over the sequence for the
selective scan. torch.export bakes in the branch of its example and unrolls the loop to the
example's length, so the exported graph is only right for one sequence length and one phase.

The replacement is one program for both phases, exactly equal to each:

- the convolution runs over the cached window (its last `kernel - 1` inputs; zeros before the
  first call, as `MambaCache` starts) followed by the new inputs, without padding, and the new
  window is the last `kernel` inputs: the prefill's left zero padding and the decode step's
  roll are both this;
- the selective scan is `torch.ops.higher_order.scan` over the sequence, starting from the
  cached SSM state (zeros before the first call), which exports to one ONNX `Scan` (Mamba2's
  prefill computes the same states with its chunked algorithm, its decode step with exactly
  this recurrence);
- the attention mask the runtime feeds covers past and new tokens; the new tokens' part is its
  last `sequence_length` columns (generate itself passes the prompt's mask at prefill, and no
  mask, meaning all ones, at decode). An empty mask means all ones.

The new states are written back into the cache object as the step's outputs
(`present.{i}.conv_state`, `present.{i}.ssm_state`). `cache_position` is not read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._higher_order_ops.scan import scan

from .registry import Patch

_BRANCH_AND_LOOP = (
    "a graph right for one phase and one length only: the mixer picks prefill or decode with "
    "`cache_position.shape[0] == conv_kernel_size` and unrolls `for i in range(seq_len)` "
    "(ONNX Runtime: 'Got invalid dimensions' or wrong states on the other phase)"
)
_CACHE_POSITION_REQUIRED = (
    "ValueError: You have to specify the `cache_position` manually when `use_cache=True` and "
    "`cache_params` is passed (the runtime feeds the states, not cache positions)"
)


def _new_tokens_mask(
    attention_mask: torch.Tensor | None, batch_size: int, length: int
) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones((batch_size, length))
    return torch.cat([ones, attention_mask], dim=1)[:, -length:]


def _selective_scan(
    ssm_state: torch.Tensor,
    discrete_a: torch.Tensor,
    delta_b_u: torch.Tensor,
    c: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = A_t * h_{t-1} + (dt B u)_t, y_t = h_t C_t, over axis 2 of `discrete_a` (batch,
    channels, sequence, state); returns the last state and y (batch, channels, sequence)."""

    def step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        a_t, b_u_t, c_t = xs
        state = (a_t * state + b_u_t).contiguous()
        y_t = torch.matmul(state.to(dtype), c_t.unsqueeze(-1))[..., 0]
        return state, y_t

    xs = (discrete_a.movedim(2, 0), delta_b_u.movedim(2, 0), c.movedim(1, 0))
    last_state, ys = scan(step, ssm_state.contiguous(), xs)
    return last_state, ys.movedim(0, -1)


def _mamba_mixer_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache_params: Any = None,
    cache_position: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`slow_forward` of the Mamba (1) mixers (mamba, falcon_mamba, jamba) as one program for
    prefill and decode (see the module docstring)."""
    batch_size, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    hidden_states, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
    mask = _new_tokens_mask(attention_mask, batch_size, seq_len)
    if mask is not None:
        hidden_states = hidden_states * mask.unsqueeze(1)

    if cache_params is not None:
        conv_state = cache_params.conv_states[self.layer_idx]
        ssm_state = cache_params.ssm_states[self.layer_idx].clone()
    else:
        conv_state = hidden_states.new_zeros((batch_size, self.intermediate_size, self.conv_kernel_size))
        ssm_state = hidden_states.new_zeros((batch_size, self.intermediate_size, self.ssm_state_size))
    window = torch.cat([conv_state[..., 1:].to(hidden_states.dtype), hidden_states], dim=-1)
    hidden_states = torch.nn.functional.conv1d(
        window, self.conv1d.weight, self.conv1d.bias, groups=self.conv1d.groups
    )  # [batch, intermediate_size, seq_len]
    hidden_states = self.act(hidden_states)
    if mask is not None:
        hidden_states = hidden_states * mask.unsqueeze(1)

    ssm_parameters = self.x_proj(hidden_states.transpose(1, 2))
    time_step, B, C = torch.split(
        ssm_parameters, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )
    if hasattr(self, "rms_eps"):  # falcon_mamba normalises them
        from transformers.models.falcon_mamba.modeling_falcon_mamba import rms_forward

        B = rms_forward(B, variance_epsilon=self.rms_eps)
        C = rms_forward(C, variance_epsilon=self.rms_eps)
        time_step = rms_forward(time_step, variance_epsilon=self.rms_eps)
    elif hasattr(self, "dt_layernorm"):  # jamba's learned norms
        time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
    discrete_time_step = torch.nn.functional.softplus(self.dt_proj(time_step)).transpose(1, 2)
    A = -torch.exp(self.A_log.float())
    discrete_A = torch.exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])
    discrete_B = discrete_time_step[:, :, :, None] * B[:, None, :, :].float()
    delta_b_u = discrete_B * hidden_states[:, :, :, None].float()
    ssm_state, scan_output = _selective_scan(ssm_state, discrete_A, delta_b_u, C, dtype)
    scan_output = scan_output + hidden_states * self.D[None, :, None]
    scan_output = scan_output * self.act(gate)

    if cache_params is not None:
        cache_params.conv_states[self.layer_idx] = window[..., -self.conv_kernel_size :]
        cache_params.ssm_states[self.layer_idx] = ssm_state.to(cache_params.ssm_states[self.layer_idx].dtype)
    return self.out_proj(scan_output.transpose(1, 2))


def _mamba2_mixer_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache_params: Any = None,
    cache_position: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`Mamba2Mixer.torch_forward` as one program for prefill and decode: the decode step's
    recurrence, scanned over the sequence (the prefill's chunked algorithm computes the same
    states from zeros)."""
    batch_size, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    mask = _new_tokens_mask(attention_mask, batch_size, seq_len)
    if mask is not None:
        hidden_states = (hidden_states * mask[:, :, None]).to(dtype)
    if hasattr(self, "mup_vector"):  # falcon_h1's muP multipliers
        hidden_states = hidden_states * self.ssm_in_multiplier
        projected_states = self.in_proj(hidden_states) * self.mup_vector
    else:
        projected_states = self.in_proj(hidden_states)
    groups_state = self.n_groups * self.ssm_state_size
    d_mlp = (projected_states.shape[-1] - 2 * self.intermediate_size - 2 * groups_state - self.num_heads) // 2
    _, _, gate, hidden_states_B_C, dt = projected_states.split(
        [d_mlp, d_mlp, self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
    )

    if cache_params is not None:
        conv_state = cache_params.conv_states[self.layer_idx]
        ssm_state = cache_params.ssm_states[self.layer_idx]
    else:
        conv_state = hidden_states.new_zeros((batch_size, self.conv_dim, self.conv_kernel_size))
        ssm_state = hidden_states.new_zeros((batch_size, self.num_heads, self.head_dim, self.ssm_state_size))
    window = torch.cat([conv_state[..., 1:].to(dtype), hidden_states_B_C.transpose(1, 2)], dim=-1)
    hidden_states_B_C = self.act(
        torch.nn.functional.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv1d.groups)
    ).transpose(1, 2)
    if mask is not None:
        hidden_states_B_C = (hidden_states_B_C * mask[:, :, None]).to(dtype)
    x, B, C = torch.split(hidden_states_B_C, [self.intermediate_size, groups_state, groups_state], dim=-1)

    A = -torch.exp(self.A_log.float())  # [num_heads]
    dt = torch.nn.functional.softplus(dt + self.dt_bias)
    if self.time_step_limit is not None:  # zamba2 leaves it unset and does not clamp
        dt = torch.clamp(dt, self.time_step_limit[0], self.time_step_limit[1])  # [batch, seq_len, num_heads]
    x = x.reshape(batch_size, seq_len, self.num_heads, self.head_dim).float()
    heads_per_group = self.num_heads // self.n_groups
    B = B.reshape(batch_size, seq_len, self.n_groups, self.ssm_state_size).float()
    C = C.reshape(batch_size, seq_len, self.n_groups, self.ssm_state_size).float()
    B = B.repeat_interleave(heads_per_group, dim=2, output_size=self.num_heads)
    C = C.repeat_interleave(heads_per_group, dim=2, output_size=self.num_heads)
    decay = torch.exp(dt * A)  # [batch, seq_len, num_heads]
    dBx = (dt[..., None] * x)[..., None] * B[:, :, :, None, :]  # [batch, seq_len, heads, head_dim, state]

    def step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        decay_t, dBx_t, C_t = xs
        state = (state * decay_t[..., None, None] + dBx_t).contiguous()
        return state, torch.matmul(state, C_t[..., None])[..., 0]

    xs = (decay.movedim(1, 0), dBx.movedim(1, 0), C.movedim(1, 0))
    new_ssm_state, ys = scan(step, ssm_state.float().contiguous(), xs)
    y = ys.movedim(0, 1) + x * self.D[:, None]  # [batch, seq_len, num_heads, head_dim]
    y = y.reshape(batch_size, seq_len, -1)
    if getattr(self, "mamba_rms_norm", True):
        scan_output = self.norm(y, gate)
    else:  # falcon_h1 without the gated norm
        scan_output = y * torch.nn.functional.silu(gate)

    if cache_params is not None:
        cache_params.conv_states[self.layer_idx] = window[..., -self.conv_kernel_size :]
        cache_params.ssm_states[self.layer_idx] = new_ssm_state.to(ssm_state.dtype)
    return self.out_proj(scan_output.to(dtype))


def _zamba_scan(
    module: torch.nn.Module, hidden_states: torch.Tensor, ssm_state: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zamba's per-head selective scan from `ssm_state` (batch, heads, head_dim, state) over
    hidden_states (heads, batch, head_dim, seq_len): the output with its `D` skip (same layout)
    and the last state."""
    ssm_parameters = (module.x_proj_weight[:, None, :, :] @ hidden_states).transpose(-1, -2)
    time_step, B, C = torch.split(
        ssm_parameters, [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1
    )
    discrete_time_step = torch.nn.functional.softplus(
        (module.dt_proj_weight[:, None] @ time_step.transpose(-1, -2)) + module.dt_proj_bias[:, None, :, None]
    )
    A = -torch.exp(module.A_log.float())
    discrete_A = torch.exp(A[:, None, :, None, :] * discrete_time_step[:, :, :, :, None])
    delta_b_u = discrete_time_step[..., None] * B[:, :, None, :, :].float() * hidden_states[..., None].float()

    def step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        a_t, b_u_t, c_t = xs  # [batch, heads, hd, N], same, [heads, batch, N]
        state = (a_t * state + b_u_t).contiguous()
        return state, torch.matmul(state.transpose(0, 1).to(dtype), c_t.unsqueeze(-1))[..., 0]

    xs = (discrete_A.permute(3, 1, 0, 2, 4), delta_b_u.permute(3, 1, 0, 2, 4), C.permute(2, 0, 1, 3))
    ssm_state, ys = scan(step, ssm_state.contiguous(), xs)
    return ys.movedim(0, -1) + hidden_states * module.D[:, None, :, None], ssm_state


def _zamba_mixer_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache_params: Any = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ZambaMambaMixer.slow_forward` (Mamba 1 split into `n_mamba_heads` heads) as one program
    for prefill and decode."""
    batch_size, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, head_dim = self.n_mamba_heads, self.mamba_head_dim
    projected_states = self.in_proj(hidden_states).transpose(1, 2)
    hidden_states, gate = projected_states.view(batch_size, -1, 2, seq_len).chunk(2, dim=2)
    hidden_states = hidden_states.squeeze(2)
    gate = gate.squeeze(2).reshape(batch_size, heads, -1, seq_len).transpose(0, 1)
    mask = _new_tokens_mask(attention_mask, batch_size, seq_len)
    if mask is not None:
        hidden_states = hidden_states * mask.unsqueeze(1)

    if cache_params is not None:
        conv_state = cache_params.conv_states[self.layer_idx]
        ssm_state = cache_params.ssm_states[self.layer_idx]
    else:
        conv_state = hidden_states.new_zeros((batch_size, self.intermediate_size, self.conv_kernel_size))
        ssm_state = hidden_states.new_zeros((batch_size, heads, head_dim, self.ssm_state_size))
    window = torch.cat([conv_state[..., 1:].to(hidden_states.dtype), hidden_states], dim=-1)
    hidden_states = self.act(
        torch.nn.functional.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv1d.groups)
    )
    if mask is not None:
        hidden_states = hidden_states * mask.unsqueeze(1)

    hidden_states = hidden_states.reshape(-1, heads, head_dim, seq_len).transpose(0, 1)  # [heads, batch, hd, L]
    scan_output, ssm_state = _zamba_scan(self, hidden_states, ssm_state, dtype)
    scan_output = scan_output * self.act(gate)
    if cache_params is not None:
        cache_params.conv_states[self.layer_idx] = window[..., -self.conv_kernel_size :]
        cache_params.ssm_states[self.layer_idx] = ssm_state
    return self.out_proj(scan_output.transpose(0, 1).reshape(batch_size, -1, seq_len).transpose(1, 2))


def _short_conv_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    past_key_values: Any = None,
    cache_position: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Lfm2ShortConv.slow_forward` (a gated causal convolution) as one program for prefill and
    decode: its window is the cached one followed by the new inputs."""
    # No padding mask: the decoder layer passes the 4-d causal mask (or none), which upstream's
    # `apply_mask_to_padding_states` leaves alone (it masks only with a 2-d mask).
    batch_size = hidden_states.shape[0]
    B, C, x = self.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
    Bx = B * x
    if past_key_values is not None:
        conv_state = past_key_values.conv_cache[self.layer_idx]
    else:
        conv_state = Bx.new_zeros((batch_size, Bx.shape[1], self.L_cache))
    window = torch.cat([conv_state[..., 1:].to(Bx.dtype), Bx], dim=-1)
    conv_out = torch.nn.functional.conv1d(window, self.conv.weight, self.conv.bias, groups=self.conv.groups)
    if past_key_values is not None:
        past_key_values.conv_cache[self.layer_idx] = window[..., -self.L_cache :]
    return self.out_proj((C * conv_out).transpose(-1, -2).contiguous())


def _gated_delta_net_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache_params: Any = None,
    cache_position: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Qwen3NextGatedDeltaNet.forward` as one program for prefill and decode: the causal
    convolution over the cached window, then the gated delta rule's recurrence (upstream's decode
    step; its prefill computes the same states in chunks) scanned over the sequence."""
    from transformers.models.qwen3_next.modeling_qwen3_next import l2norm

    batch_size, seq_len, _ = hidden_states.shape
    mask = _new_tokens_mask(attention_mask, batch_size, seq_len)
    if mask is not None:
        hidden_states = (hidden_states * mask[:, :, None]).to(hidden_states.dtype)
    query, key, value, z, b, a = self.fix_query_key_value_ordering(
        self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states)
    )
    query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
    mixed_qkv = torch.cat((query, key, value), dim=-1).transpose(1, 2)

    conv_state = cache_params.conv_states[self.layer_idx] if cache_params is not None else None
    recurrent_state = cache_params.recurrent_states[self.layer_idx] if cache_params is not None else None
    if conv_state is None:
        conv_state = mixed_qkv.new_zeros((batch_size, mixed_qkv.shape[1], self.conv_kernel_size))
    window = torch.cat([conv_state[..., 1:].to(mixed_qkv.dtype), mixed_qkv], dim=-1)
    mixed_qkv = torch.nn.functional.silu(
        torch.nn.functional.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv1d.groups)
    ).transpose(1, 2)
    query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(batch_size, seq_len, -1, self.head_k_dim)
    key = key.reshape(batch_size, seq_len, -1, self.head_k_dim)
    value = value.reshape(batch_size, seq_len, -1, self.head_v_dim)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * torch.nn.functional.softplus(a.float() + self.dt_bias)
    if self.num_v_heads // self.num_k_heads > 1:
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        key = key.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)

    dtype = query.dtype
    query, key = l2norm(query, dim=-1, eps=1e-6), l2norm(key, dim=-1, eps=1e-6)
    query, key, value, beta, g = (
        x.transpose(1, 2).contiguous().float() for x in (query, key, value, beta, g)
    )
    query = query / (query.shape[-1] ** 0.5)
    if recurrent_state is None:
        recurrent_state = value.new_zeros((batch_size, value.shape[1], key.shape[-1], value.shape[-1]))

    def step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        q_t, k_t, v_t, g_t, beta_t = xs
        state = state * g_t.exp()[..., None, None]
        delta = (v_t - (state * k_t[..., None]).sum(dim=-2)) * beta_t[..., None]
        state = (state + k_t[..., None] * delta[..., None, :]).contiguous()
        return state, (state * q_t[..., None]).sum(dim=-2)

    xs = tuple(x.movedim(2, 0) for x in (query, key, value, g, beta))
    last_state, core_attn_out = scan(step, recurrent_state.float().contiguous(), xs)
    core_attn_out = core_attn_out.movedim(0, 1).to(dtype)  # [batch, seq_len, heads, v_head_dim]

    if cache_params is not None:
        cache_params.conv_states[self.layer_idx] = window[..., -self.conv_kernel_size :]
        cache_params.recurrent_states[self.layer_idx] = last_state
    z_shape = z.shape
    core_attn_out = self.norm(core_attn_out.reshape(-1, core_attn_out.shape[-1]), z.reshape(-1, z.shape[-1]))
    return self.out_proj(core_attn_out.reshape(z_shape).reshape(batch_size, seq_len, -1))


def _lightning_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Any,
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MiniMaxLightningAttention.forward` as one program for prefill and decode: upstream's
    decode recurrence (state = decay * state + k^T v, output q state) scanned over the sequence
    from the cached state; its prefill computes the same in blocks."""
    batch_size, seq_len, _ = hidden_states.shape
    qkv_states = self.act_fn(self.qkv_proj(hidden_states))
    qkv_states = qkv_states.reshape(batch_size, seq_len, self.num_attention_heads, 3 * self.head_dim)
    query_states, key_states, value_states = (
        s.transpose(1, 2) for s in torch.split(qkv_states, self.head_dim, 3)
    )
    mask = _new_tokens_mask(attention_mask, batch_size, seq_len)
    if mask is not None:  # padding contributes nothing to the state
        value_states = value_states.masked_fill(~mask.to(torch.bool)[:, None, :, None], 0)
    state = past_key_values.get_linear_cache(self.layer_idx) if past_key_values is not None else None
    if state is None:
        state = value_states.new_zeros((batch_size, self.num_attention_heads, self.head_dim, self.head_dim))
    # The decay per step is a scanned input: a tensor the step function closes over is traced
    # with its own symbolic sizes, which torch.export then cannot reconcile.
    decay = torch.exp(-self.slope_rate)[None].expand(seq_len, -1, -1, -1)  # [seq_len, heads, 1, 1]

    def step(state: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        q_t, k_t, v_t, decay_t = xs  # [batch, heads, head_dim] x 3, [heads, 1, 1]
        state = (decay_t * state + k_t[..., :, None] * v_t[..., None, :]).contiguous()
        return state, torch.matmul(q_t[..., None, :], state)[..., 0, :]

    xs = (*(x.movedim(2, 0) for x in (query_states, key_states, value_states)), decay)
    state, attn_output = scan(step, state.contiguous(), xs)
    attn_output = attn_output.movedim(0, 1).reshape(
        batch_size, seq_len, self.num_attention_heads * self.head_dim
    )
    attn_output = torch.sigmoid(self.output_gate(hidden_states)) * self.norm(attn_output)
    if past_key_values is not None:
        past_key_values.set_linear_cache(self.layer_idx, state)
    return self.out_proj(attn_output), state


# transformers 5 runs the state-space and hybrid mixers through module-level functions that
# read and update the mixer's states in a `DynamicCache` of linear-attention layers, picking a
# decode update by `seq_len == 1`. On a cache with states their convolution
# (`causal_conv1d_forward`) and Mamba2's chunked scan are right for any length; the Mamba (1)
# scans (`mamba_selective_scan`, zamba's per-head ones) start from zeros whatever the cache holds.
# The replacements below scan from the cached state instead.


def _previous_recurrent_state(cache: Any, layer_idx: int) -> torch.Tensor | None:
    """A linear-attention layer's recurrent state, None before its first step."""
    return None if cache is None else cache.get_recurrent_state(layer_idx, state_idx=0)


def _store_recurrent_state(cache: Any, layer_idx: int, state: torch.Tensor) -> None:
    """Sets a linear-attention layer's recurrent state as a new tensor, where upstream copies it
    into the old one in place (the graph's output is the new tensor; the convolution before it,
    upstream's, has marked the layer as having stepped)."""
    layer = cache.layers[layer_idx]
    layer.recurrent_states[0] = state
    layer.is_recurrent_states_initialized[0] = True


def _new_tokens_padding_mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`apply_mask_to_padding_states` (transformers 5) with a mask over past and new tokens: the
    new tokens' columns. Upstream multiplies by the whole mask, which the runtime's (past and new
    tokens) does not fit."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden_states
    mask = _new_tokens_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1])
    return (hidden_states * mask[:, :, None]).to(hidden_states.dtype)


def _mask_kept_after_the_first_step(original: Callable[..., Any]) -> Callable[..., Any]:
    def prepare_inputs_for_generation(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        inputs = original(self, *args, **kwargs)
        if inputs.get("attention_mask") is None and kwargs.get("attention_mask") is not None:
            # generate's mask over past and new tokens, as the runtime feeds it: the mixers read
            # its new tokens' columns (`_new_tokens_padding_mask`).
            inputs["attention_mask"] = kwargs["attention_mask"]
        return inputs

    return prepare_inputs_for_generation


_NO_CALL_WITH_MASK_AND_STATES = (
    "transformers 5: RuntimeError: At least one call to the observed model must contain all the "
    "named arguments (generate drops the attention mask after the first step, before which the "
    "cache holds no states: no call has both)"
)


def _mamba_scan_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    time_step: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    gate: torch.Tensor,
    cache: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """`mamba_scan_forward` (transformers 5) as one program: the selective scan from the cached
    state (zeros before the first step), its `D` skip and gate."""
    dtype = hidden_states.dtype
    batch_size, intermediate_size, _ = hidden_states.shape
    ssm_state = _previous_recurrent_state(cache, module.layer_idx)
    if ssm_state is None:
        ssm_state = hidden_states.new_zeros((batch_size, intermediate_size, module.ssm_state_size), dtype=torch.float32)
    bias = module.dt_proj.bias
    discrete_time_step = torch.nn.functional.softplus(time_step + bias[:, None] if bias is not None else time_step)
    A = -torch.exp(module.A_log.float())
    discrete_A = torch.exp(A[None, :, None, :] * discrete_time_step[:, :, :, None])
    delta_b_u = discrete_time_step[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    last_state, scan_output = _selective_scan(ssm_state, discrete_A, delta_b_u, C, dtype)
    scan_output = (scan_output + hidden_states * module.D[None, :, None]) * torch.nn.functional.silu(gate)
    if cache is not None:
        _store_recurrent_state(cache, module.layer_idx, last_state.to(ssm_state.dtype))
    return scan_output.to(dtype)


def _zamba_mixer_forward_on_dynamic_cache(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`ZambaMambaMixer.forward` (transformers 5) as one program for prefill and decode: upstream
    picks a per-head decode update or per-head scans from zeros by `seq_len == 1`."""
    # Upstream's convolution: on a cache with states it convolves the cached window and the new
    # inputs whatever their number (its decode step computes the same).
    from transformers.models.zamba.modeling_zamba import causal_conv1d_forward

    batch_size, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, head_dim = self.n_mamba_heads, self.mamba_head_dim
    hidden_states = _new_tokens_padding_mask(hidden_states, attention_mask)
    projected_states = self.in_proj(hidden_states).transpose(1, 2)
    hidden_states, gate = projected_states.view(batch_size, -1, 2, seq_len).chunk(2, dim=2)
    gate = gate.reshape(batch_size, heads, head_dim, seq_len).transpose(0, 1)
    hidden_states = causal_conv1d_forward(
        self.conv1d, hidden_states.squeeze(2).contiguous(), cache, self.layer_idx, activation=self.activation
    )
    hidden_states = _new_tokens_padding_mask(hidden_states.transpose(1, 2), attention_mask).transpose(1, 2)
    hidden_states = hidden_states.reshape(batch_size, heads, head_dim, seq_len).transpose(0, 1)
    ssm_state = _previous_recurrent_state(cache, self.layer_idx)
    if ssm_state is None:
        ssm_state = hidden_states.new_zeros((batch_size, heads, head_dim, self.ssm_state_size), dtype=torch.float32)
    scan_output, last_state = _zamba_scan(self, hidden_states, ssm_state.float(), dtype)
    scan_output = scan_output * torch.nn.functional.silu(gate)
    if cache is not None:
        _store_recurrent_state(cache, self.layer_idx, last_state.to(ssm_state.dtype))
    return self.out_proj(scan_output.transpose(0, 1).reshape(batch_size, -1, seq_len).transpose(1, 2).to(dtype))


def _without_cache_position_check(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(
        self: torch.nn.Module, *args: Any, cache_position: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        if cache_position is None and kwargs.get("cache_params") is not None:
            # The model only insists on one; the exported mixers never read it.
            cache_position = torch.zeros(1, dtype=torch.long)
        return original(self, *args, cache_position=cache_position, **kwargs)

    return forward


def _mamba_mask_as_given(
    self: torch.nn.Module, attention_mask: torch.Tensor | None, cache_position: Any
) -> Any:
    # Upstream drops the mask when `cache_position[0] > 0 or torch.all(attention_mask == 1)`,
    # a data-dependent branch; the unified mixers read the new tokens' columns of any mask.
    return attention_mask


_MASK_DATA_DEPENDENT = (
    "GuardOnDataDependentSymNode in `_update_mamba_mask` (`torch.all(attention_mask == 1)` decides "
    "whether the SSM layers mask padding)"
)


def _cache_position_from_cache(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(
        self: torch.nn.Module, *args: Any, cache_position: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        cache = kwargs.get("past_key_values")
        if cache_position is None and cache is not None:
            tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            past = cache.get_seq_length()
            cache_position = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        return original(self, *args, cache_position=cache_position, **kwargs)

    return forward


def _causal_mask_from_mask_width(original: Callable[..., Any]) -> Callable[..., Any]:
    def update_causal_mask(
        self: torch.nn.Module,
        attention_mask: torch.Tensor | None,
        input_tensor: torch.Tensor,
        cache_position: Any,
    ) -> torch.Tensor:
        if attention_mask is None or attention_mask.dim() != 2 or self.config._attn_implementation != "sdpa":
            return original(self, attention_mask, input_tensor, cache_position)
        # Upstream's mask, as wide as the 2-d mask (past and new tokens) instead of the value
        # `cache_position[-1] + 1`: a key is hidden when it comes after the query or is padding.
        key_positions = torch.arange(attention_mask.shape[-1], device=input_tensor.device)
        hidden = (key_positions[None, :] > cache_position[:, None])[None, None] | (
            attention_mask[:, None, None, :] == 0
        )
        zeros = torch.zeros(hidden.shape, dtype=input_tensor.dtype, device=input_tensor.device)
        return zeros.masked_fill(hidden, torch.finfo(input_tensor.dtype).min)

    return update_causal_mask


_MASK_WIDTH_DATA_DEPENDENT = (
    "GuardOnDataDependentSymNode: Eq(Min(8, u0), 8) (jamba's `_update_causal_mask`, copied by "
    "zamba2, sizes the mask by the value `cache_position[-1] + 1`)"
)
#: Models with jamba's `_update_causal_mask`: (module, model class).
_VALUE_SIZED_CAUSAL_MASKS = (
    ("jamba.modeling_jamba", "JambaModel"),
    ("zamba2.modeling_zamba2", "Zamba2Model"),
)

_CACHE_POSITION_IGNORES_CACHE = (
    "wrong logits after the first step: without `cache_position` (generate passes it, the runtime "
    "does not) the hybrid model counts positions from 0 whatever the cache holds, so the causal "
    "mask hides the cached tokens"
)

#: (module under transformers.models, mixer class, its unified forward, model class that
#: insists on `cache_position` or None)
_MIXERS = (
    ("mamba.modeling_mamba", "MambaMixer", _mamba_mixer_forward, "MambaModel"),
    ("falcon_mamba.modeling_falcon_mamba", "FalconMambaMixer", _mamba_mixer_forward, "FalconMambaModel"),
    ("mamba2.modeling_mamba2", "Mamba2Mixer", _mamba2_mixer_forward, "Mamba2Model"),
    ("bamba.modeling_bamba", "BambaMixer", _mamba2_mixer_forward, None),
    ("granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridMambaLayer", _mamba2_mixer_forward, None),
    ("jamba.modeling_jamba", "JambaMambaMixer", _mamba_mixer_forward, None),
    ("falcon_h1.modeling_falcon_h1", "FalconH1Mixer", _mamba2_mixer_forward, None),
    ("zamba2.modeling_zamba2", "Zamba2MambaMixer", _mamba2_mixer_forward, None),
    ("zamba.modeling_zamba", "ZambaMambaMixer", _zamba_mixer_forward, None),
    ("lfm2.modeling_lfm2", "Lfm2ShortConv", _short_conv_forward, None),
    ("qwen3_next.modeling_qwen3_next", "Qwen3NextGatedDeltaNet", _gated_delta_net_forward, None),
)
#: Hybrid models whose `_update_mamba_mask` branches on the mask's values: (module, model class).
_MAMBA_MASKS = (
    ("bamba.modeling_bamba", "BambaModel"),
    ("granitemoehybrid.modeling_granitemoehybrid", "GraniteMoeHybridModel"),
    ("jamba.modeling_jamba", "JambaModel"),
    ("falcon_h1.modeling_falcon_h1", "FalconH1Model"),
)
#: Hybrid models that count positions from 0 without `cache_position`: (module, model class).
_POSITIONS_FROM_ZERO = (
    ("bamba.modeling_bamba", "BambaModel"),
    ("jamba.modeling_jamba", "JambaModel"),
    ("falcon_h1.modeling_falcon_h1", "FalconH1Model"),
    ("zamba.modeling_zamba", "ZambaModel"),
)


_STATES_REPLAYED_ONE_PHASE = (
    "transformers 5: wrong states and outputs after a multi-token call on a cache with states: the "
    "Mamba (1) scan (`mamba_selective_scan`) starts from zeros whatever the cache holds, and the "
    "decode update is picked by `seq_len == 1` (the graph replays only its example's phase)"
)
_WHOLE_MASK_ON_NEW_TOKENS = (
    "transformers 5: RuntimeError: The size of tensor a (3) must match the size of tensor b (8) "
    "(`apply_mask_to_padding_states` multiplies the new tokens by the runtime's mask over past and "
    "new tokens)"
)
#: transformers 5 models whose generate passes no attention mask after the first step.
_MASK_DROPPED_AFTER_THE_FIRST_STEP = (
    ("mamba.modeling_mamba", "MambaForCausalLM"),
    ("falcon_mamba.modeling_falcon_mamba", "FalconMambaForCausalLM"),
    ("mamba2.modeling_mamba2", "Mamba2ForCausalLM"),
)
_MAMBA_MODULES = ("mamba.modeling_mamba", "falcon_mamba.modeling_falcon_mamba", "jamba.modeling_jamba")
#: transformers 5's module-level functions of the state-space mixers, replaced in each model's
#: module that defines them (a module of transformers 4.57 lacks them: skipped there):
#: (function, its unified replacement, failure, modules).
_LINEAR_CACHE_FUNCTIONS = (
    ("apply_mask_to_padding_states", _new_tokens_padding_mask, _WHOLE_MASK_ON_NEW_TOKENS, _MAMBA_MODULES),
    ("mamba_scan_forward", _mamba_scan_forward, _STATES_REPLAYED_ONE_PHASE, _MAMBA_MODULES),
)  # fmt: skip


def _target(module_name: str, attribute: str) -> str:
    return f"transformers.models.{module_name}:{attribute}"


def _short(module_name: str) -> str:
    return module_name.split(".")[0]


PATCHES = (
    *(
        Patch(f"{_short(module)}_unified_mixer", _target(module, f"{mixer}.forward"), _BRANCH_AND_LOOP,
              forward, transformers=4)  # fmt: skip
        for module, mixer, forward, _ in _MIXERS
    ),
    *(
        Patch(
            f"{_short(module)}_cache_position_optional",
            _target(module, f"{model}.forward"),
            _CACHE_POSITION_REQUIRED,
            wrap=_without_cache_position_check,
        )
        for module, _, _, model in _MIXERS
        if model is not None
    ),
    *(
        Patch(f"{_short(module)}_mamba_mask", _target(module, f"{model}._update_mamba_mask"), _MASK_DATA_DEPENDENT,
              _mamba_mask_as_given)  # fmt: skip
        for module, model in _MAMBA_MASKS
    ),
    *(
        Patch(
            f"{_short(module)}_cache_position_from_cache",
            _target(module, f"{model}.forward"),
            _CACHE_POSITION_IGNORES_CACHE,
            wrap=_cache_position_from_cache,
        )
        for module, model in _POSITIONS_FROM_ZERO
    ),
    Patch("minimax_unified_lightning_attention",
          _target("minimax.modeling_minimax", "MiniMaxLightningAttention.forward"), _BRANCH_AND_LOOP,
          _lightning_attention_forward),  # fmt: skip
    Patch("qwen3_next_linear_attention_mask",
          _target("qwen3_next.modeling_qwen3_next", "Qwen3NextModel._update_linear_attn_mask"),
          _MASK_DATA_DEPENDENT, _mamba_mask_as_given),  # fmt: skip
    *(
        Patch(
            f"{_short(module)}_causal_mask_width",
            _target(module, f"{model}._update_causal_mask"),
            _MASK_WIDTH_DATA_DEPENDENT,
            wrap=_causal_mask_from_mask_width,
        )
        for module, model in _VALUE_SIZED_CAUSAL_MASKS
    ),
    *(
        Patch(f"{_short(module)}_unified_{function}", _target(module, function), fixes, replacement,
              model_runs=function == "apply_mask_to_padding_states", transformers=5)  # fmt: skip
        for function, replacement, fixes, modules in _LINEAR_CACHE_FUNCTIONS
        for module in modules
    ),
    Patch("zamba_unified_mixer_on_dynamic_cache",
          _target("zamba.modeling_zamba", "ZambaMambaMixer.forward"), _STATES_REPLAYED_ONE_PHASE,
          _zamba_mixer_forward_on_dynamic_cache, transformers=5),  # fmt: skip
    *(
        Patch(f"{_short(module)}_mask_kept_after_the_first_step",
              _target(module, f"{model}.prepare_inputs_for_generation"), _NO_CALL_WITH_MASK_AND_STATES,
              wrap=_mask_kept_after_the_first_step, model_runs=True, transformers=5)  # fmt: skip
        for module, model in _MASK_DROPPED_AFTER_THE_FIRST_STEP
    ),
)
