"""Scoped patches for the known torch.export blockers of transformers 4.56-4.57.

Takes: nothing. Gives: :data:`PATCHES` and :func:`applied`, a context manager that applies
patches and restores the original attributes on exit, also when the block raises.

Each patch is one small function plus a :class:`Patch` record naming the failure it removes;
tests/test_patches.py shows each failure happening without its patch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import cache_utils

logger = logging.getLogger(__name__)


_INHERITED = object()


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace `owner.attribute` by `replacement` for the duration of an export."""

    name: str
    owner: Any
    attribute: str
    #: A function, or a module standing in for a model module's `torch` import.
    replacement: Callable[..., Any] | types.ModuleType
    fixes: str


#: Patches whose target this transformers version lacks (a module or class renamed or gone,
#: e.g. `DeepseekV2MoE` -> `DeepseekV2Moe` in transformers 5): "group: error", one per skipped
#: group. Their model types then export without them (or fail as they would unpatched); the
#: import of this module never fails for them.
SKIPPED_TARGETS: list[str] = []


def tolerant(build: Callable[[], Sequence[Patch]], name: str | None = None) -> tuple[Patch, ...]:
    """`build()`'s patches, or none when a module or attribute they patch does not exist here."""
    try:
        return tuple(build())
    except (ImportError, AttributeError) as error:
        label = name or getattr(build, "__name__", repr(build))
        SKIPPED_TARGETS.append(f"{label}: {error}")
        logger.debug("patches of %s skipped: %s", label, error)
        return ()


def _lazy_initialization_from_key_states(
    self: cache_utils.DynamicLayer, key_states: torch.Tensor, value_states: torch.Tensor | None = None
) -> None:
    # An empty tensor made from the incoming states instead of `torch.tensor([])`: the latter is
    # a constant created inside the traced graph, which torch.export lifts and then loses. It
    # stays 1-d like upstream's, which `torch.cat` skips, so values whose head size differs from
    # the keys' (DeepSeek's multi-head latent attention) still concatenate. transformers 5 passes
    # the value states too.
    self.dtype, self.device = key_states.dtype, key_states.device
    self.keys = key_states.new_zeros((0,))
    self.values = (key_states if value_states is None else value_states).new_zeros((0,))
    self.is_initialized = True


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
    ("longcat_flash", "LongcatFlashMoE"),
)


def _sparse_moe_patch(module_name: str, class_name: str, routing: Callable[..., Any]) -> tuple[Patch, ...]:
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return (
        Patch(
            name=f"dense_{module_name}_moe",
            owner=getattr(module, class_name),
            attribute="forward",
            replacement=_dense_moe_forward(routing),
            fixes=_MOE_DATA_DEPENDENT,
        ),
    )


def _expert_mixture_patch(module_name: str, class_name: str) -> tuple[Patch, ...]:
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return (
        Patch(
            name=f"dense_{module_name}_expert_mixture",
            owner=getattr(module, class_name),
            attribute="moe",
            replacement=_dense_expert_mixture,
            fixes=_EXPERT_LOOP_DATA_DEPENDENT,
        ),
    )


def _dbrx_patches() -> tuple[Patch, ...]:
    from transformers.models.dbrx.modeling_dbrx import DbrxExperts

    return (
        Patch(
            name="dense_dbrx_experts",
            owner=DbrxExperts,
            attribute="forward",
            replacement=_dense_dbrx_experts,
            fixes="GuardOnDataDependentSymNode: Eq(u0, 0) at `if token_idx.shape[0] == 0: continue`",
        ),
    )


def _aria_patches() -> tuple[Patch, ...]:
    from transformers.models.aria.modeling_aria import AriaTextMoELayer

    return (
        Patch(
            name="dense_aria_text_moe",
            owner=AriaTextMoELayer,
            attribute="forward",
            replacement=_dense_aria_moe,
            fixes="GuardOnDataDependentSymNode: u0 (`tokens_per_expert` sizes the grouped GEMM's slices)",
        ),
    )


def _hunyuan_patches() -> tuple[Patch, ...]:
    from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1Moe

    return (
        Patch(
            name="dense_hunyuan_v1_moe",
            owner=HunYuanMoEV1Moe,
            attribute="forward",
            replacement=_dense_hunyuan_moe_forward,
            fixes=_MOE_DATA_DEPENDENT,
        ),
    )


def _gpt_oss_patches() -> tuple[Patch, ...]:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return (
        Patch(
            name="dense_gpt_oss_experts",
            owner=GptOssExperts,
            attribute="forward",
            replacement=_dense_gpt_oss_experts,
            fixes=_MOE_DATA_DEPENDENT,
        ),
    )


def _moe_patches() -> tuple[Patch, ...]:
    return (
        *(p for entry in _SPARSE_MOE_BLOCKS for p in tolerant(functools.partial(_sparse_moe_patch, *entry), entry[1])),
        *(p for entry in _EXPERT_MIXTURE_METHODS for p in tolerant(functools.partial(_expert_mixture_patch, *entry), entry[1])),
        *tolerant(_dbrx_patches),
        *tolerant(_aria_patches),
        *tolerant(_hunyuan_patches),
        *tolerant(_gpt_oss_patches),
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


def _switch_patches() -> tuple[Patch, ...]:
    from transformers.models.switch_transformers import modeling_switch_transformers as switch

    return (
        Patch(
            name="switch_router_cast_if_needed",
            owner=switch.SwitchTransformersTop1Router,
            attribute="_cast_classifier",
            replacement=_switch_router_cast_if_needed,
            fixes="RuntimeError: _apply(): Couldn't swap Linear.weight (the router re-casts its "
            "classifier inside forward; fails from the second graph exported from one model on)",
        ),
        Patch(
            name="dense_switch_transformers_experts",
            owner=switch.SwitchTransformersSparseMLP,
            attribute="forward",
            replacement=_switch_dense_experts,
            fixes="data-dependent loop `for idx in torch.nonzero(idx_mask).tolist()` over the experts hit",
        ),
    )


def _not_compiling() -> bool:
    return False


def _fsmt_patches() -> tuple[Patch, ...]:
    from transformers.models.fsmt import modeling_fsmt

    return (
        Patch(
            name="fsmt_decoder_config",
            owner=modeling_fsmt.FSMTDecoder,
            attribute="config",
            # `DynamicCache(config=None)` is the plain cache FSMT's own generate() passes in.
            replacement=property(lambda self: None),
            fixes="AttributeError: 'FSMTDecoder' object has no attribute 'config' (the decoder builds "
            "its cache from `self.config` when its first call gets none: decoder_model.onnx's graph; "
            "transformers 4.57 never sets it)",
        ),
    )


def _pegasus_x_patches() -> tuple[Patch, ...]:
    from transformers.models.pegasus_x import modeling_pegasus_x

    return (
        Patch(
            name="pegasus_x_decoder_mask_while_exporting",
            owner=modeling_pegasus_x,
            attribute="is_torchdynamo_compiling",
            replacement=_not_compiling,
            fixes="The size of tensor a (s + 1) must match the size of tensor b (s + 2) (while compiling, "
            "the Pegasus-X decoder builds no all-ones mask, and its causal mask built without one is one "
            "position longer than the keys)",
        ),
    )


#: The 2-d attention mask GitModel.forward was called with, for the mask function below.
_GIT_ATTENTION_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "git_attention_mask", default=None
)


def _git_forward_handing_mask_to_mask_function(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Upstream adds the padding mask in forward behind `if past_key_values_length > 0`; the
        # mask function below adds it instead, so forward gets none.
        bound = signature.bind(self, *args, **kwargs)
        token = _GIT_ATTENTION_MASK.set(bound.arguments.get("attention_mask"))
        bound.arguments["attention_mask"] = None
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            _GIT_ATTENTION_MASK.reset(token)

    return forward


def _git_attention_mask(
    self: torch.nn.Module,
    tgt: torch.Tensor,
    memory: torch.Tensor,
    tgt_mask: torch.Tensor,
    past_key_values_length: int,
    memory_key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GitModel's additive mask, padding included, with no Python branch on the cache length.

    Upstream, without a cache the text block is causal and the padding mask is added; with one
    it is all zeros (one new token sees every key) and padding is ignored. torch.export keeps the
    branch of its example (with a cache), so the exported first step was neither causal nor
    padded. Here a text query at position `past + i` sees the keys up to it (the same two masks
    for the calls generate makes), and padding is weighted by a tensor that is 1 without a cache.
    """
    num_memory, num_tgt = memory.shape[1], tgt.shape[1]
    dtype, device = tgt.dtype, tgt.device
    text_queries = torch.arange(num_tgt, device=device)[:, None] + past_key_values_length
    text_keys = torch.arange(past_key_values_length + num_tgt, device=device)[None, :]
    text = torch.zeros(text_keys.shape[1], device=device, dtype=dtype).masked_fill(
        text_keys > text_queries, float("-inf")
    )
    memory_rows = torch.cat(
        (
            torch.zeros((num_memory, num_memory), device=device, dtype=dtype),
            torch.full((num_memory, text_keys.shape[1]), float("-inf"), device=device, dtype=dtype),
        ),
        dim=1,
    )
    text_rows = torch.cat((torch.zeros((num_tgt, num_memory), device=device, dtype=dtype), text), dim=1)
    mask = torch.cat((memory_rows, text_rows), dim=0)[None, None]
    batch = memory.shape[0]
    memory_padding = torch.zeros((batch, num_memory), device=device, dtype=dtype)
    if memory_key_padding_mask is not None:
        memory_padding = memory_padding.masked_fill(memory_key_padding_mask, float("-inf"))
    text_padding = torch.zeros((batch, text_keys.shape[1]), device=device, dtype=dtype)
    attention_mask = _GIT_ATTENTION_MASK.get()
    if attention_mask is not None:
        # A tensor, not a Python bool: a value torch.export cannot fold into its example's branch.
        without_cache = (attention_mask.new_ones(past_key_values_length).sum() == 0).to(dtype)
        text_padding = (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min * without_cache
    return mask + torch.cat((memory_padding, text_padding), dim=1)[:, None, None, :]


def _git_patches() -> tuple[Patch, ...]:
    from transformers.models.git.modeling_git import GitModel

    fixes = (
        "first generate step (empty cache) of the exported GIT decoder neither causal nor padded: "
        "observed call 0 off by about 0.02 (GitModel branches on `past_key_values_length > 0` in "
        "Python, and torch.export keeps the branch of its example, which has a cache)"
    )
    return (
        Patch(
            name="git_attention_mask_without_cache_branch",
            owner=GitModel,
            attribute="create_attention_mask",
            replacement=_git_attention_mask,
            fixes=fixes,
        ),
        Patch(
            name="git_padding_in_attention_mask",
            owner=GitModel,
            attribute="forward",
            replacement=_git_forward_handing_mask_to_mask_function(GitModel.forward),
            fixes=fixes,
        ),
    )


def _cpmant_attention_mask(
    self: torch.nn.Module, input_ids: torch.Tensor, span: torch.Tensor, context: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """CpmAntModel._prepare_attention_mask with the left-padding mask from `arange`, not from a
    Python list of `seqlen` numbers (which makes the sequence length a constant)."""
    batch, seqlen, device = input_ids.size(0), input_ids.size(1), input_ids.device
    directional_mask_2d = torch.arange(seqlen, device=device) <= torch.arange(seqlen, device=device).view(-1, 1)
    attention_mask = context[:, None, :] | (
        context[:, :, None].logical_not() & directional_mask_2d.view(1, seqlen, seqlen)
    )
    attention_mask = attention_mask & (span[:, None, :] == span[:, :, None])
    distance_to_end = torch.arange(seqlen - self.prompt_length, device=device).flip(0)
    mask_1d = distance_to_end[None, :].repeat(batch, 1) < length[:, None]
    mask_1d = torch.cat((torch.ones(batch, self.prompt_length, device=device).bool(), mask_1d), dim=1)
    return mask_1d.view(batch, seqlen, 1) & mask_1d.view(batch, 1, seqlen) & attention_mask


def _cpmant_patches() -> tuple[Patch, ...]:
    from transformers.models.cpmant.modeling_cpmant import CpmAntModel

    return (
        Patch(
            name="cpmant_attention_mask_from_arange",
            owner=CpmAntModel,
            attribute="_prepare_attention_mask",
            replacement=_cpmant_attention_mask,
            fixes="Received user-specified dim hint Dim.DYNAMIC, but tracing inferred a static shape for "
            "inputs['input_ids'].shape[1] (`torch.tensor(list(range(seqlen - prompt_length))[::-1])`)",
        ),
    )


def _real_rotary_forward(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    # Upstream returns `torch.polar(1, freqs) * scaling`, a complex tensor; this returns the same
    # numbers as real pairs (..., dim / 2, 2): (cos, sin) * scaling.
    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv_freq.to(x.device) @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """`view_as_real(view_as_complex(x as pairs) * complex(cos, sin)).flatten(3)`, in real arithmetic."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


def _llama4_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Queries and keys are (batch, positions, heads, head size) here.
    freqs = freqs[:, :, None]
    return _rotate_pairs(xq, freqs), _rotate_pairs(xk, freqs)


def _deepseek_v2_apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Queries and keys are (batch, heads, positions, head size) here.
    freqs = freqs.unsqueeze(1)
    return _rotate_pairs(xq, freqs), _rotate_pairs(xk, freqs)


_COMPLEX_ROTARY = (
    "DispatchError: No ONNX function found for aten.unsqueeze: No decompositions registered for the "
    "complex-valued input (rotary embedding as complex numbers, torch.polar / view_as_complex)"
)

#: Rotary embeddings computed in complex numbers: (module, rotary class, real apply function).
_COMPLEX_ROTARY_MODELS = (
    ("llama4", "Llama4TextRotaryEmbedding", _llama4_apply_rotary_emb),
    ("deepseek_v2", "DeepseekV2RotaryEmbedding", _deepseek_v2_apply_rotary_emb),
)


def _real_rotary_patch(module_name: str, rotary_class: str, apply_function: Callable[..., Any]) -> tuple[Patch, ...]:
    from transformers.modeling_rope_utils import dynamic_rope_update

    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return (
        Patch(
            name=f"real_{module_name}_rotary_embedding",
            owner=getattr(module, rotary_class),
            attribute="forward",
            replacement=torch.no_grad()(dynamic_rope_update(_real_rotary_forward)),
            fixes=_COMPLEX_ROTARY,
        ),
        # Module attribute: the attention looks it up at call time.
        Patch(
            name=f"real_{module_name}_apply_rotary_emb",
            owner=module,
            attribute="apply_rotary_emb",
            replacement=apply_function,
            fixes=_COMPLEX_ROTARY,
        ),
    )


def _real_rotary_patches() -> tuple[Patch, ...]:
    return tuple(
        p for entry in _COMPLEX_ROTARY_MODELS for p in tolerant(functools.partial(_real_rotary_patch, *entry), entry[1])
    )


def _state_space_patches() -> tuple[Patch, ...]:
    # Their own module (it imports `Patch` from this one).
    from .state_space_patches import state_space_patches

    return state_space_patches()


def _sliding_window_patches() -> tuple[Patch, ...]:
    from .sliding_window_patches import sliding_window_patches

    return sliding_window_patches()


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="dynamic_layer_lazy_initialization",
        owner=cache_utils.DynamicLayer,
        attribute="lazy_initialization",
        replacement=_lazy_initialization_from_key_states,
        fixes="Constant tensor lifted_tensor_N is not in the constants dictionary "
        "(DynamicLayer.lazy_initialization creates torch.tensor([]) inside the graph)",
    ),
    *_moe_patches(),
    *tolerant(_switch_patches),
    *tolerant(_pegasus_x_patches),
    *tolerant(_fsmt_patches),
    *tolerant(_git_patches),
    *tolerant(_cpmant_patches),
    *_real_rotary_patches(),
    *_state_space_patches(),
    *_sliding_window_patches(),
)


@contextlib.contextmanager
def applied(patches: Sequence[Patch]) -> Iterator[None]:
    """Applies `patches` in order and restores the originals in reverse order on exit."""
    originals: list[tuple[Patch, Any]] = []
    try:
        for patch in patches:
            # Inherited attributes are absent from the owner's __dict__: restoring means deleting.
            originals.append((patch, patch.owner.__dict__.get(patch.attribute, _INHERITED)))
            setattr(patch.owner, patch.attribute, patch.replacement)
            logger.debug("patched %s (%s)", patch.name, patch.fixes)
        yield
    finally:
        for patch, original in reversed(originals):
            if original is _INHERITED:
                delattr(patch.owner, patch.attribute)
            else:
                setattr(patch.owner, patch.attribute, original)



@contextlib.contextmanager
def plain_tensor_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Buffers registered as `nn.Parameter` objects are plain tensors for the block.

    Fixes: `KeyError: "attribute 'b_c_rms' already exists"` when torch.onnx.export unlifts the
    exported program (falcon_mamba registers `nn.Parameter(..., requires_grad=False)` objects
    with `register_buffer`, which torch re-registers as a parameter and then as a buffer).
    The module's own buffer objects are put back on exit, also when the block raises.
    """
    replaced: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if isinstance(buffer, torch.nn.Parameter):
                    replaced.append((module, name, buffer))
                    module._buffers[name] = buffer.data
        yield
    finally:
        for module, name, buffer in replaced:
            module._buffers[name] = buffer


def no_op_rule_constants() -> list[Any]:
    """The constant patterns (the 0 of `x + 0`, the 1 of `x * 1`...) of onnxscript's no-op
    rewrite rules, the ones :func:`exact_no_op_constants` makes exact. onnxscript is imported
    here, at export time, not when this module is."""
    from onnxscript.rewriter._pattern_ir import Constant
    from onnxscript.rewriter.rules.common import _no_op

    return [
        pattern
        for rule in _no_op.rules.rules
        for node in rule._target_pattern._nodes
        for pattern in node.inputs
        if isinstance(pattern, Constant)
    ]


@contextlib.contextmanager
def exact_no_op_constants() -> Iterator[None]:
    """onnxscript's no-op rewrites (`x + 0`, `x - 0`, `x * 1`, `x / 1` -> `x`) match only an
    exact 0 or 1 for the block.

    Fixes: NaN logits from Helium (`rms_norm_eps=1e-8`) after `torch.onnx.export(optimize=True)`:
    the rules compare their constant with `math.isclose(..., abs_tol=1e-8)`, so the RMSNorm's
    `variance + 1e-8` is rewritten to `variance`, and a zero hidden vector (the pad token's
    embedding, present in every padded batch) gives `0 * rsqrt(0) = NaN`. The rules' own
    tolerances are put back on exit.
    """
    saved = [(pattern, pattern._rel_tol, pattern._abs_tol) for pattern in no_op_rule_constants()]
    try:
        for pattern, _, _ in saved:
            pattern._rel_tol = pattern._abs_tol = 0.0
        yield
    finally:
        for pattern, rel_tol, abs_tol in saved:
            pattern._rel_tol, pattern._abs_tol = rel_tol, abs_tol
