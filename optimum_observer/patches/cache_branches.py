"""Patches of decoders that branch in Python on whether their cache is empty.

Takes: nothing. Gives: :data:`PATCHES` (see :mod:`optimum_observer.patches.registry`).

A decoder-only export is one graph for the prompt (empty cache) and every cached step; torch.export
keeps the branch of its example (a cache of 5 positions and 3 new tokens), so a decoder that picks
its masks and positions with `if past_key_values_length != 0` gives a graph whose first step is
wrong, or fails on the example itself when the cached branch allows one new token only.

ProphetNet (and its copy, XLM-ProphetNet) computes its positions, relative position buckets and
its two attention masks (main stream, n-gram predict streams) differently with and without a
cache. :func:`_stream_inputs` computes both versions as tensors for any cache length and new-token
count, and selects with a tensor that is 1 when the cache holds positions: each is, value for value,
what the upstream branch computes for the calls `generate` makes (the prompt on an empty cache,
then one token at a time), checked in tests/test_cache_branches.py.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .registry import Patch


def _relative_buckets(module: nn.Module, relative: torch.Tensor) -> torch.Tensor:
    """The model module's own `compute_relative_buckets` (unidirectional)."""
    compute = sys.modules[type(module).__module__].compute_relative_buckets
    return compute(module.num_buckets, module.relative_max_distance, relative, False)


def _stream_inputs(
    decoder: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past_length: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The main and n-gram stream inputs of a ProphetNet decoder, with no branch on the cache.

    Returns the hidden states of every stream, the main and predict attention masks, the main and
    predict relative position buckets and the position ids. For query `q = past + i` and main key
    `k`, upstream's prompt branch (empty cache) and its cached branch (one new token) differ by
    `padding_idx` in the relative positions, by an off-by-one of its buffered predict buckets, and by
    the masks: the prompt is causal and padded, a cached step attends to every key (no mask at all).
    """
    batch, length = inputs_embeds.shape[:2]
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    minimum = torch.finfo(dtype).min
    padding_idx = decoder.position_embeddings.padding_idx
    padding_idx = 0 if padding_idx is None else padding_idx
    # 1 when the cache holds positions: a tensor, so that the graph decides, not the example.
    cached = (inputs_embeds.new_ones(past_length).sum() > 0).long()
    prompt = 1 - cached
    new = torch.arange(length, device=device)
    queries = new + past_length
    keys = torch.arange(past_length + length, device=device)

    positions = queries + 1 + padding_idx
    positions = torch.where(cached.bool(), positions, positions.clamp(0, decoder.position_embeddings.max_length - 1))
    position_ids = positions[None].expand(batch, length)
    main_stream = inputs_embeds + decoder.position_embeddings._forward(position_ids)
    predicting_pos_embed = decoder.position_embeddings._forward(position_ids + 1)
    ngram_embeddings = decoder.ngram_embeddings.weight
    ngram_hidden_states = [ngram_embeddings[ngram - 1] + predicting_pos_embed for ngram in range(decoder.ngram)]
    hidden_states = torch.cat([main_stream] + ngram_hidden_states, 1)

    first_layer = decoder.layers[0].self_attn
    main_relative = keys[None, :] - queries[:, None] - padding_idx * cached
    main_buckets = _relative_buckets(first_layer, main_relative)[None].expand(batch, -1, -1)
    predict_relative = torch.cat(
        [
            keys[None, :] - queries[:, None] - 1 - padding_idx * cached,
            new[None, :] - new[:, None] + prompt - padding_idx * cached,
        ],
        dim=-1,
    )
    predict_buckets = _relative_buckets(first_layer, predict_relative)[None].expand(batch, -1, -1)

    heads = decoder.config.num_decoder_attention_heads
    zero = torch.zeros((), dtype=dtype, device=device)
    causal = torch.where(keys[None, :] > queries[:, None], minimum, zero)
    padding = torch.zeros((batch, past_length + length), dtype=dtype, device=device)
    if attention_mask is not None:
        padding = (1.0 - attention_mask.to(dtype)) * torch.finfo(decoder.dtype).min * prompt.to(dtype)
    main_mask = (causal[None, None] + padding[:, None, None, :]).expand(batch, heads, length, -1).to(dtype)

    streams = torch.arange(decoder.ngram, device=device)
    main_visible = (keys[None, None, :] <= queries[None, :, None] - streams[:, None, None] * prompt) | (
        keys[None, None, :] == 0
    )
    predict_visible = (new[None, :] == new[:, None])[None].expand(decoder.ngram, -1, -1)
    bias = torch.where(torch.cat([main_visible, predict_visible], dim=-1), zero, minimum)
    predict_padding = torch.cat([padding, torch.zeros((batch, length), dtype=dtype, device=device)], dim=-1)
    predict_mask = (bias[None, None] + predict_padding[:, None, None, None, :]).expand(
        batch, heads, decoder.ngram, length, -1
    )
    return hidden_states, main_mask, predict_mask.to(dtype), main_buckets, predict_buckets, position_ids


def _prophetnet_decoder_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    cross_attn_head_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: torch.Tensor | None = None,
) -> Any:
    """ProphetNetDecoder.forward (transformers 4.57) with :func:`_stream_inputs` in place of its
    branches on the cache length; the layers are called as upstream calls them."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    use_cache = use_cache if use_cache is not None else self.config.use_cache
    output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
    output_hidden_states = (
        output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
    )
    return_dict = return_dict if return_dict is not None else self.config.use_return_dict
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `decoder_input_ids` and `decoder_inputs_embeds`.")
    if inputs_embeds is None:
        inputs_embeds = self.word_embeddings(input_ids)
    if use_cache and past_key_values is None:
        past_key_values = (
            EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
            if encoder_hidden_states is not None
            else DynamicCache(config=self.config)
        )
    if use_cache and isinstance(past_key_values, tuple):
        past_key_values = EncoderDecoderCache.from_legacy_cache(past_key_values)
    past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
    sequence_length = inputs_embeds.shape[1]

    hidden_states, main_mask, predict_mask, main_buckets, predict_buckets, position_ids = _stream_inputs(
        self, inputs_embeds, attention_mask, past_length
    )
    extended_encoder_attention_mask = None
    if encoder_attention_mask is not None:
        extended_encoder_attention_mask = (
            1.0 - encoder_attention_mask[:, None, None, :].repeat(1, self.config.num_decoder_attention_heads, 1, 1)
        ) * torch.finfo(self.dtype).min
        extended_encoder_attention_mask = extended_encoder_attention_mask.to(inputs_embeds.dtype)
    if self.embeddings_layer_norm:
        hidden_states = self.embeddings_layer_norm(hidden_states)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

    main_states, ngram_states = [], []
    main_attentions, ngram_attentions, cross_attentions = [], [], []
    for index, decoder_layer in enumerate(self.layers):
        if output_hidden_states:
            main_states.append(hidden_states[:, :sequence_length])
            ngram_states.append(hidden_states[:, sequence_length:])
        layer_outputs = decoder_layer(
            hidden_states,
            main_mask,
            encoder_hidden_states,
            encoder_attn_mask=extended_encoder_attention_mask,
            layer_head_mask=head_mask[index] if head_mask is not None else None,
            cross_attn_layer_head_mask=cross_attn_head_mask[index] if cross_attn_head_mask is not None else None,
            extended_predict_attention_mask=predict_mask,
            main_relative_position_buckets=main_buckets,
            predict_relative_position_buckets=predict_buckets,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            cache_position=cache_position,
        )
        hidden_states = layer_outputs[0]
        if output_attentions:
            main_attentions.append(layer_outputs[1])
            ngram_attentions.append(layer_outputs[2])
            if self.config.add_cross_attention:
                cross_attentions.append(layer_outputs[3])
    if output_hidden_states:
        main_states.append(hidden_states[:, :sequence_length])
        ngram_states.append(hidden_states[:, sequence_length:])

    output = sys.modules[type(self).__module__].ProphetNetDecoderModelOutput(
        last_hidden_state=hidden_states[:, :sequence_length],
        last_hidden_state_ngram=hidden_states[:, sequence_length:] if self.config.ngram > 0 else None,
        past_key_values=past_key_values,
        hidden_states=tuple(main_states) if output_hidden_states else None,
        hidden_states_ngram=tuple(ngram_states) if output_hidden_states and self.config.ngram > 0 else None,
        attentions=tuple(main_attentions) if output_attentions else None,
        ngram_attentions=tuple(ngram_attentions) if output_attentions else None,
        cross_attentions=tuple(cross_attentions) if output_attentions and self.config.add_cross_attention else None,
    )
    return output if return_dict else output.to_tuple()


def _xlm_prophetnet_decoder_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    cross_attn_head_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
) -> Any:
    """XLMProphetNetDecoder.forward (transformers 4.57, deprecated models) with
    :func:`_stream_inputs` in place of its branches on `past_key_values is not None`; as upstream,
    each layer gets its own key/value pair and returns its present one."""
    use_cache = use_cache if use_cache is not None else self.config.use_cache
    output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
    output_hidden_states = (
        output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
    )
    return_dict = return_dict if return_dict is not None else self.config.use_return_dict
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `decoder_input_ids` and `decoder_inputs_embeds`.")
    if inputs_embeds is None:
        inputs_embeds = self.word_embeddings(input_ids)
    past_length = 0
    if past_key_values is not None:
        past_length = (
            past_key_values.get_seq_length()
            if hasattr(past_key_values, "get_seq_length")
            else past_key_values[0][0].shape[2]
        )
    sequence_length = inputs_embeds.shape[1]

    hidden_states, main_mask, predict_mask, main_buckets, predict_buckets, position_ids = _stream_inputs(
        self, inputs_embeds, attention_mask, past_length
    )
    extended_encoder_attention_mask = None
    if encoder_attention_mask is not None:
        extended_encoder_attention_mask = (
            1.0 - encoder_attention_mask[:, None, None, :].repeat(1, self.config.num_decoder_attention_heads, 1, 1)
        ) * torch.finfo(self.dtype).min
        extended_encoder_attention_mask = extended_encoder_attention_mask.to(inputs_embeds.dtype)
    if self.embeddings_layer_norm:
        hidden_states = self.embeddings_layer_norm(hidden_states)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

    main_states, ngram_states, presents = [], [], []
    main_attentions, ngram_attentions, cross_attentions = [], [], []
    for index, decoder_layer in enumerate(self.layers):
        if output_hidden_states:
            main_states.append(hidden_states[:, :sequence_length])
            ngram_states.append(hidden_states[:, sequence_length:])
        layer_outputs = decoder_layer(
            hidden_states,
            attention_mask=main_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attn_mask=extended_encoder_attention_mask,
            layer_head_mask=head_mask[index] if head_mask is not None else None,
            cross_attn_layer_head_mask=cross_attn_head_mask[index] if cross_attn_head_mask is not None else None,
            extended_predict_attention_mask=predict_mask,
            main_relative_position_buckets=main_buckets,
            predict_relative_position_buckets=predict_buckets,
            position_ids=position_ids,
            past_key_values=past_key_values[index] if past_key_values is not None else None,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        hidden_states = layer_outputs[0]
        if use_cache:
            presents.append(layer_outputs[4 if output_attentions else 1])
        if output_attentions:
            main_attentions.append(layer_outputs[1])
            ngram_attentions.append(layer_outputs[2])
            if self.config.add_cross_attention:
                cross_attentions.append(layer_outputs[3])
    if output_hidden_states:
        main_states.append(hidden_states[:, :sequence_length])
        ngram_states.append(hidden_states[:, sequence_length:])

    output = sys.modules[type(self).__module__].XLMProphetNetDecoderModelOutput(
        last_hidden_state=hidden_states[:, :sequence_length],
        last_hidden_state_ngram=hidden_states[:, sequence_length:] if self.config.ngram > 0 else None,
        past_key_values=tuple(presents) if use_cache else None,
        hidden_states=tuple(main_states) if output_hidden_states else None,
        hidden_states_ngram=tuple(ngram_states) if output_hidden_states and self.config.ngram > 0 else None,
        attentions=tuple(main_attentions) if output_attentions else None,
        ngram_attentions=tuple(ngram_attentions) if output_attentions else None,
        cross_attentions=tuple(cross_attentions) if output_attentions and self.config.add_cross_attention else None,
    )
    return output if return_dict else output.to_tuple()


_PROPHETNET_BRANCHES = (
    "AssertionError: At the moment `use_cache` is only supported for `decoder_input_ids` of length 1 "
    "(the decoder picks positions, relative buckets and masks with `if past_key_values_length != 0`; "
    "its cached branch takes one token, builds positions with int(), which fixes the past length, and "
    "its prompt branch fills a view's diagonal in place: `ngram_attention_bias`)"
)

PATCHES = (
    Patch(
        name="prophetnet_decoder_without_cache_branches",
        target="transformers.models.prophetnet.modeling_prophetnet:ProphetNetDecoder.forward",
        replacement=_prophetnet_decoder_forward,
        fixes=_PROPHETNET_BRANCHES,
    ),
    Patch(
        name="xlm_prophetnet_decoder_without_cache_branches",
        target="transformers.models.deprecated.xlm_prophetnet.modeling_xlm_prophetnet:XLMProphetNetDecoder.forward",
        replacement=_xlm_prophetnet_decoder_forward,
        fixes=_PROPHETNET_BRANCHES,
    ),
)
