"""Patches of MoE dispatch: dense experts instead of loops over the experts the data selected.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

A sparse MoE block loops over the experts its router picked, a set that depends on the data, so
torch.export cannot trace it. Each replacement runs every expert on every token and weights it by
its routing weight (0 when not among the token's top k): the same sum, without the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .registry import Patch

def _softmax_top_k_routing(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mixtral / Qwen-MoE routing: softmax, top-k, renormalised unless `norm_topk_prob` is False."""
    router_logits = self.gate(x)
    probabilities = torch.softmax(router_logits, dim=1, dtype=torch.float)
    weights, experts = torch.topk(probabilities, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return router_logits, weights, experts


def _ernie_statics_routing(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ernie 4.5 routing: experts picked on bias-corrected scores, weighted by the raw ones."""
    router_logits = self.gate(x.float())
    probabilities = torch.softmax(router_logits, dim=1, dtype=torch.float)
    _, experts = torch.topk(self.moe_statics(probabilities), self.top_k, dim=-1)
    weights = torch.gather(probabilities, dim=-1, index=experts)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=self.norm_min)
    return router_logits, weights, experts


def _phimoe_routing(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PhiMoE routing: the model's own `sparsemixer`, in inference mode."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    router_logits = self.gate(x)
    weights, experts = sparsemixer(router_logits, jitter_eps=self.router_jitter_noise, training=False)
    return router_logits, weights, experts


def _jamba_routing(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jamba routing: softmax over its `router`, top-k, not renormalised."""
    router_logits = self.router(x)
    weights, experts = torch.topk(torch.softmax(router_logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
    return router_logits, weights.to(x.dtype), experts


def _shared_experts(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if getattr(self, "shared_expert", None) is not None:  # qwen2_moe: gated shared expert
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    if getattr(self, "shared_experts", None) is not None:  # ernie4_5_moe
        return self.shared_experts(x)
    return None


def _dense_moe_forward(routing: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., Any]:
    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Every expert runs on every token and is weighted by its routing weight (0 when not in
        # the token's top k): the same sum as the sparse loop, without the loop over the
        # data-dependent set of experts hit.
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_dim)
        router_logits, weights, experts = routing(self, x)
        dense_weights = torch.zeros_like(router_logits, dtype=weights.dtype).scatter(1, experts, weights)
        dense_weights = dense_weights.to(x.dtype)
        output = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            output = output + expert(x) * dense_weights[:, index, None]
        shared = _shared_experts(self, x)
        if shared is not None:
            output = output + shared
        return output.reshape(batch_size, sequence_length, hidden_dim), router_logits

    return forward


_MOE_DATA_DEPENDENT = (
    "GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 0) "
    "(`for expert_idx in expert_hit:` iterates over the experts the data selected)"
)

#: Sparse MoE blocks with the data-dependent expert loop: (module, class, routing).
_SPARSE_MOE_BLOCKS = (
    ("mixtral", "MixtralSparseMoeBlock", _softmax_top_k_routing),
    ("qwen2_moe", "Qwen2MoeSparseMoeBlock", _softmax_top_k_routing),
    ("qwen3_moe", "Qwen3MoeSparseMoeBlock", _softmax_top_k_routing),
    ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", _ernie_statics_routing),
    ("phimoe", "PhimoeSparseMoeBlock", _phimoe_routing),
    ("jamba", "JambaSparseMoeBlock", _jamba_routing),
    ("qwen3_next", "Qwen3NextSparseMoeBlock", _softmax_top_k_routing),
    ("minimax", "MiniMaxSparseMoeBlock", _softmax_top_k_routing),
)


def _dense_expert_mixture(
    self: torch.nn.Module, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """DeepSeek-style `moe(hidden_states, topk_indices, topk_weights)`, every expert on every token.

    The routing arrives as arguments, so one replacement serves every block of this shape: each
    expert's output is weighted by its routing weight (0 when not among the token's top k).
    """
    dense_weights = torch.zeros(
        hidden_states.shape[0], len(self.experts), dtype=topk_weights.dtype, device=hidden_states.device
    ).scatter(1, topk_indices, topk_weights)
    output = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
    for index, expert in enumerate(self.experts):
        output = output + expert(hidden_states) * dense_weights[:, index, None]
    return output.type(hidden_states.dtype)


def _dense_dbrx_experts(
    self: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor, top_weights: torch.Tensor, top_experts: torch.Tensor
) -> torch.Tensor:
    """DBRX experts (one fused weight tensor per projection), every expert on every token."""
    batch_size, sequence_length, hidden_size = x.shape
    x = x.view(-1, hidden_size)
    mlp = self.mlp
    shape = (mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size)
    w1, v1, w2 = (weight.view(shape) for weight in (mlp.w1, mlp.v1, mlp.w2))
    dense_weights = torch.zeros_like(weights, dtype=top_weights.dtype).scatter(1, top_experts, top_weights)
    output = torch.zeros_like(x)
    for index in range(self.moe_num_experts):
        output = output + mlp(x, w1[index], v1[index], w2[index]) * dense_weights[:, index, None]
    return output.reshape(batch_size, sequence_length, hidden_size)


def _dense_aria_moe(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Aria's text MoE (grouped GEMMs over tokens sorted by expert), every expert on every token."""
    shape = hidden_states.shape
    x = hidden_states.view(-1, shape[-1])
    logits = self.router(x)
    top_logits, top_indices = torch.topk(logits, k=self.config.moe_topk, dim=1)
    scores = torch.softmax(top_logits, dim=-1)
    dense_weights = torch.zeros_like(logits, dtype=scores.dtype).scatter(1, top_indices, scores)
    projection, gate = torch.einsum("th,ehi->tei", x, self.experts.fc1.weight).chunk(2, dim=-1)
    expert_outputs = torch.einsum("tei,eih->teh", torch.nn.functional.silu(projection) * gate, self.experts.fc2.weight)
    output = (expert_outputs * dense_weights[..., None].to(expert_outputs.dtype)).sum(dim=1).view(shape)
    return output + self.shared_experts(hidden_states)


def _dense_gpt_oss_experts(
    self: torch.nn.Module, hidden_states: torch.Tensor, router_indices: Any = None, routing_weights: Any = None
) -> torch.Tensor:
    """GPT-OSS experts on the path upstream takes off CPU: every expert on every token (batched
    matmuls), weighted by the dense routing weights. On CPU upstream loops over the experts hit."""
    batch_size = hidden_states.shape[0]
    num_experts = routing_weights.shape[1]
    hidden_states = hidden_states.reshape(-1, self.hidden_size).repeat(num_experts, 1)
    hidden_states = hidden_states.view(num_experts, -1, self.hidden_size)
    gate_up = torch.bmm(hidden_states, self.gate_up_proj) + self.gate_up_proj_bias[..., None, :]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=self.limit)
    up = up.clamp(min=-self.limit, max=self.limit)
    glu = gate * torch.sigmoid(gate * self.alpha)
    next_states = torch.bmm((up + 1) * glu, self.down_proj) + self.down_proj_bias[..., None, :]
    next_states = next_states.view(num_experts, batch_size, -1, self.hidden_size)
    next_states = next_states * routing_weights.transpose(0, 1).view(num_experts, batch_size, -1)[..., None]
    return next_states.sum(dim=0)


def _dense_hunyuan_moe_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """HunYuan MoE: softmax top-k routing (renormalised), every expert on every token, plus the
    shared MLP; one tensor out, as upstream returns."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    shared = self.shared_mlp(hidden_states)
    router_logits = self.gate(hidden_states)
    x = hidden_states.view(-1, hidden_dim)
    weights, experts = torch.topk(torch.softmax(router_logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    dense_weights = torch.zeros_like(router_logits, dtype=weights.dtype).scatter(1, experts, weights).to(x.dtype)
    output = torch.zeros_like(x)
    for index, expert in enumerate(self.experts):
        output = output + expert(x) * dense_weights[:, index, None]
    return output.reshape(batch_size, sequence_length, hidden_dim) + shared


_EXPERT_LOOP_DATA_DEPENDENT = (
    "GuardOnDataDependentSymNode on `if token_indices.numel() > 0` / `for num_tokens in tokens_per_expert` "
    "(the loop over experts branches on how many tokens the data routed to each)"
)

#: Blocks whose `moe(hidden_states, topk_indices, topk_weights)` loops over the experts the data hit.
_EXPERT_MIXTURE_METHODS = (
    ("deepseek_v2", "DeepseekV2MoE"),
    ("deepseek_v3", "DeepseekV3MoE"),
    ("dots1", "Dots1MoE"),
    ("glm4_moe", "Glm4MoeMoE"),
    ("glm4v_moe", "Glm4vMoeTextMoE"),
    ("longcat_flash", "LongcatFlashMoE"),
)


def _switch_router_cast_if_needed(self: torch.nn.Module) -> None:
    # The original reassigns `self.classifier = self.classifier.to(self.dtype)` on every call;
    # tracing it swaps the parameter, which fails once an earlier export of the same model (the
    # encoder, before the decoders) holds a weak reference to it. Cast only when needed.
    if self.classifier.weight.dtype != self.dtype:
        self.classifier = self.classifier.to(self.dtype)


def _switch_dense_experts(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[Any, ...]:
    """Switch Transformers' top-1 MLP with every expert run on every token, kept where routed.

    Each expert is a per-token MLP, so running it on all tokens and keeping its output where the
    router mask sends the token there is the original sum, without the loop over the
    data-dependent list of experts hit (`torch.nonzero(...).tolist()`).
    """
    router_mask, router_probs, router_logits = self.router(hidden_states)
    expert_index = torch.argmax(router_mask, dim=-1)
    next_states = torch.zeros_like(hidden_states)
    for index in range(router_mask.shape[-1]):
        expert = getattr(self.experts, f"expert_{index}")
        next_states = next_states + expert(hidden_states) * router_mask[..., index, None].to(hidden_states.dtype)
    return router_probs * next_states, (router_logits, expert_index)



def _modeling(model_type: str) -> str:
    return f"transformers.models.{model_type}.modeling_{model_type}"


PATCHES = (
    *(
        Patch(
            name=f"dense_{module}_moe",
            target=f"{_modeling(module)}:{block}.forward",
            replacement=_dense_moe_forward(routing),
            fixes=_MOE_DATA_DEPENDENT,
        )
        for module, block, routing in _SPARSE_MOE_BLOCKS
    ),
    *(
        Patch(
            name=f"dense_{module}_expert_mixture",
            target=f"{_modeling(module)}:{block}.moe",
            replacement=_dense_expert_mixture,
            fixes=_EXPERT_LOOP_DATA_DEPENDENT,
        )
        for module, block in _EXPERT_MIXTURE_METHODS
    ),
    Patch(
        name="dense_dbrx_experts",
        target=f"{_modeling('dbrx')}:DbrxExperts.forward",
        replacement=_dense_dbrx_experts,
        fixes="GuardOnDataDependentSymNode: Eq(u0, 0) at `if token_idx.shape[0] == 0: continue`",
    ),
    Patch(
        name="dense_aria_text_moe",
        target=f"{_modeling('aria')}:AriaTextMoELayer.forward",
        replacement=_dense_aria_moe,
        fixes="GuardOnDataDependentSymNode: u0 (`tokens_per_expert` sizes the grouped GEMM's slices)",
    ),
    Patch(
        name="dense_hunyuan_v1_moe",
        target=f"{_modeling('hunyuan_v1_moe')}:HunYuanMoEV1Moe.forward",
        replacement=_dense_hunyuan_moe_forward,
        fixes=_MOE_DATA_DEPENDENT,
    ),
    Patch(
        name="dense_gpt_oss_experts",
        target=f"{_modeling('gpt_oss')}:GptOssExperts.forward",
        replacement=_dense_gpt_oss_experts,
        fixes=_MOE_DATA_DEPENDENT,
    ),
    Patch(
        name="switch_router_cast_if_needed",
        target=f"{_modeling('switch_transformers')}:SwitchTransformersTop1Router._cast_classifier",
        replacement=_switch_router_cast_if_needed,
        fixes="RuntimeError: _apply(): Couldn't swap Linear.weight (the router re-casts its "
        "classifier inside forward; fails from the second graph exported from one model on)",
    ),
    Patch(
        name="dense_switch_transformers_experts",
        target=f"{_modeling('switch_transformers')}:SwitchTransformersSparseMLP.forward",
        replacement=_switch_dense_experts,
        fixes="data-dependent loop `for idx in torch.nonzero(idx_mask).tolist()` over the experts hit",
    ),
)
