"""Tiny random models of any transformers model type, for coverage sweeps and tests.

Takes: a `model_type` (a key of transformers' `CONFIG_MAPPING`) and an auto-model class name.
Gives: :func:`tiny_config`, the type's default config shrunk so that the model has a few
hundred thousand parameters, and :func:`save_tiny_model`, that model with random weights
saved to a directory (with the feature extractor its checkpoints ship, :func:`tiny_feature_extractor`).

The shrink is generic: every size attribute that appears in the config (at any depth, so nested
`text_config` / `vision_config` / `decoder` configs shrink too) is set by the tables below, and
every per-layer list (`layer_types`, `layers_block_type`, ...) is cut to the new layer count.
Per-type overrides exist only where the generic shrink cannot work; each says why.

Shapes (`shapes=`): real checkpoints use grouped-query attention, an explicit head size,
MLA and sliding-window layers, and a test model without them hides the bugs they trigger.
"real" (the default) gives every config that has the key `KV_HEADS` key/value heads of `HEADS`
(multi-query types keep their single head), an explicit head size `REAL_HEAD_DIM` that differs
from `hidden_size // num_attention_heads`, DeepSeek-style MLA with key head size
(`qk_nope_head_dim + qk_rope_head_dim`) different from the value head size, and per-layer
lists cut so that every kind of layer (sliding and full attention, mamba and attention...) the
default config has is kept. "mha" gives the older shape: as many key/value heads as heads and
`head_dim == hidden_size // num_attention_heads`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

LAYERS = 2
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
KV_HEADS = 2
REAL_HEAD_DIM = 2 * HEAD_DIM
INTERMEDIATE = 128
VOCAB = 256
POSITIONS = 512

#: Size attributes and their tiny value, wherever they appear in a config.
SIZES: dict[str, int] = {
    **dict.fromkeys(
        (
            "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
            "num_decoder_layers", "num_encoder_layers", "num_blocks", "encoder_num_hidden_layers",
            "decoder_num_hidden_layers",
        ),
        LAYERS,
    ),
    **dict.fromkeys(
        (
            "hidden_size", "n_embd", "d_model", "embedding_dim", "embedding_size", "word_embed_proj_dim",
            "emb_dim", "d_embed", "attention_hidden_size", "lru_width", "hidden_size_global",
            "input_embedding_size", "output_embedding_size",
        ),
        HIDDEN,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads", "n_head", "n_heads", "num_heads", "num_key_value_heads",
            "decoder_attention_heads", "encoder_attention_heads", "attention_heads",
            "num_decoder_attention_heads", "num_encoder_attention_heads", "linear_num_key_heads",
            "linear_num_value_heads", "kv_n_heads", "encoder_num_attention_heads", "decoder_num_attention_heads",
            "encoder_num_key_value_heads", "decoder_num_key_value_heads",
        ),
        HEADS,
    ),
    **dict.fromkeys(
        (
            "head_dim", "d_kv", "attention_head_size", "d_head", "kv_channels", "attention_head_dim",
            "linear_key_head_dim", "linear_value_head_dim", "qk_rope_head_dim", "qk_nope_head_dim",
            "v_head_dim",
        ),
        HEAD_DIM,
    ),
    # Rotary dims must fit in a head (codegen, gptj default to 64).
    "rotary_dim": HEAD_DIM // 2,
    # qk_nope_head_dim + qk_rope_head_dim; configs that store it pass it back explicitly.
    "qk_head_dim": 2 * HEAD_DIM,
    **dict.fromkeys(
        (
            "intermediate_size", "d_ff", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "ffn_hidden_size",
            "feed_forward_size", "d_inner", "intermediate_size_mlp", "expert_ffn_hidden_size", "nffn_hidden_size",
            "dim_ff",
        ),
        INTERMEDIATE,
    ),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), INTERMEDIATE // 4),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk"), 2),
    # DeepSeek group-limited routing: groups must divide the (now 4) experts.
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    # dots1 leaves it unset by default, yet multiplies by it.
    "n_shared_experts": 1,
    **dict.fromkeys(("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "max_target_positions", "max_seq_len", "context_length"),
        POSITIONS,
    ),
    # MoE from the first layer on, so the tiny model has experts at all.
    "first_k_dense_replace": 1,
    "num_kv_shared_layers": 0,
    # State-space blocks: expand 1 and heads x head size == hidden size keep the SSM shapes consistent.
    **dict.fromkeys(("expand", "mamba_expand"), 1),
    "mamba_n_heads": HEADS,
    "mamba_d_head": HEAD_DIM,
    "mamba_d_ssm": HIDDEN,
    **dict.fromkeys(("state_size", "mamba_d_state"), 16),
    # SSM head groups must divide the (now 4) SSM heads.
    **dict.fromkeys(("n_groups", "mamba_n_groups", "mamba_ngroups"), 1),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 16),
}

#: Key/value head counts: `KV_HEADS` with real shapes, `HEADS` (listed in SIZES) with "mha".
#: Moonshine's `encoder_/decoder_num_key_value_heads` are not among them: its checkpoints
#: (moonshine-tiny, -base) have as many key/value heads as heads, and its attention (4.57.6)
#: views the queries with the key/value head count, so fewer key/value heads cannot run at all.
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "kv_n_heads", "num_query_groups")
#: Explicit attention head sizes: `REAL_HEAD_DIM` with real shapes, `HEAD_DIM` with "mha".
_HEAD_SIZE_KEYS = ("head_dim", "d_kv", "attention_head_size", "d_head", "kv_channels", "attention_head_dim")

#: What "real" changes over SIZES. MLA (deepseek_v2/v3, longcat_flash): keys of
#: 32 + 16 = 48 per head, values of 32 (DeepSeek-V3: 128 + 64 and 128); `head_dim` is the
#: rotary part there, so it follows `qk_rope_head_dim` (see _mla_head_dim).
REAL_SHAPES: dict[str, int] = {
    **dict.fromkeys(_KV_HEAD_KEYS, KV_HEADS),
    **dict.fromkeys(_HEAD_SIZE_KEYS, REAL_HEAD_DIM),
    "qk_nope_head_dim": 2 * HEAD_DIM,
    "qk_rope_head_dim": HEAD_DIM,
    "v_head_dim": 2 * HEAD_DIM,
    "qk_head_dim": 3 * HEAD_DIM,
}
SHAPES = ("real", "mha")

#: Vision towers of image-text-to-text models (`AutoModelForImageTextToText` heads only: the other
#: tasks' tables were measured with their vision models' own image sizes): 32 px images of 8 px
#: patches, 4 x 4 = 16 patches per image, so that `get_image_features` runs in milliseconds and a
#: prompt holds a few image tokens. The image-token counts a config states beside the tower
#: follow: `mm_tokens_per_image` 4 (gemma3 pools its 4 x 4 patches to 2 x 2: 64 x 64 to 16 x 16 in
#: its checkpoints), `image_seq_length` / `num_image_tokens` the 16 patches (the count processors
#: put in the prompt); the projector and merger sizes that must meet the text model's hidden size
#: are that size. Integer pairs ([448, 448]) become pairs of the tiny value.
IMAGE = 32
PATCH = 8
VISION_SIZES: dict[str, int] = {
    "image_size": IMAGE,
    "patch_size": PATCH,
    "mm_tokens_per_image": 4,
    **dict.fromkeys(("image_seq_length", "num_image_tokens"), (IMAGE // PATCH) ** 2),
    # Layers and widths of towers that name them otherwise (qwen2_vl's vision `depth`, `embed_dim`).
    "depth": LAYERS,
    "embed_dim": HIDDEN,
    # What the tower or its projector hands the text model: its hidden size.
    **dict.fromkeys(
        ("out_hidden_size", "projection_dim", "projector_input_dim", "projector_output_dim", "vision_output_dim"),
        HIDDEN,
    ),
    **dict.fromkeys(("alignment_intermediate_size", "mlp_dim"), INTERMEDIATE),
}
_VISION_HEADS = frozenset({"AutoModelForImageTextToText"})

#: Attributes capped at a tiny value (kept when already smaller).
CAPS: dict[str, int] = {"sliding_window": POSITIONS, "attention_window_size": POSITIONS}

#: Switches set wherever they appear: the fused Mamba kernels exist only for CUDA, and a
#: config asking for them refuses to run on CPU; a few default configs (mpt) turn the cache off,
#: which checkpoints turn on.
SWITCHES: dict[str, Any] = {"use_mamba_kernels": False, "use_cache": True}

#: Size attributes left as they are when unset (None): None switches the feature off.
_NONE_MEANS_OFF = frozenset({"q_lora_rank", "sliding_window", "attention_window_size"})

#: Per-type config values, only where the shrink alone cannot work. They are applied to the
#: default config before the shrink (some defaults cannot even be built) and win over it after,
#: except an empty dict, which asks for a sub-config's defaults so that the shrink makes them tiny.
OVERRIDES: dict[str, dict[str, Any]] = {
    # attention_layers is derived from attention_types (24 layers by default), so cutting the
    # per-layer list is undone when the config is rebuilt.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": LAYERS},
    # The adaptive softmax cutoffs (20000, 40000, 200000) must lie inside the vocabulary.
    "transfo-xl": {"cutoffs": [64, 128], "div_val": 1},
    # The default leaves the vision and audio configs unset, but the model always builds both
    # towers; an empty dict gives their defaults, which the shrink then makes tiny.
    "phi4_multimodal": {"vision_config": {}, "audio_config": {}},
    # The default leaves layers_block_type unset, but every decoder layer indexes it. (Per-layer
    # lists come with their layer count: transformers 5 validates that they agree at build.)
    "granitemoehybrid": {"layers_block_type": ["mamba", "attention"], "num_hidden_layers": LAYERS},
    # The default has no attention layer (attn_layer_indices unset), and then the hybrid cache
    # cannot tell a sequence length (IndexError in get_seq_length); checkpoints have some.
    "bamba": {"attn_layer_indices": [1]},
    # Attention every 8 layers from layer 4 by default: none among the tiny model's layers.
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2},
    # Likewise the first hybrid (mamba + shared attention) layer is layer 6 (zamba2); zamba's
    # layout always starts mamba, mamba, hybrid.
    # Its sizes derived from hidden_size are stored beside it, and transformers 5 sets the stored
    # (default-sized) ones back after deriving them: given here as derived from the tiny hidden
    # size (shared attention over [hidden, embeddings], 8 SSM heads).
    "zamba2": {"hybrid_layer_ids": [1], "layers_block_type": ["mamba", "hybrid"], "num_hidden_layers": LAYERS,
               "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS,
               "mamba_headdim": HIDDEN // 8},
    # Attention layers are listed by index (full_attn_idxs): the tiny model keeps one of each kind.
    "lfm2": {"full_attn_idxs": [1], "layer_types": ["conv", "full_attention"], "num_hidden_layers": LAYERS},
    # The default leaves layer_types unset (checkpoints list them) and makes the first 2 layers
    # dense: one convolution and one attention layer, the second with experts as checkpoints'.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": LAYERS, "num_dense_layers": 1},
    # One full-attention layer every 4 (full_attention_interval): none among the tiny layers.
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": LAYERS},
    # Its shared attention block reads [hidden, embeddings]: attention sizes derive from 2 x hidden.
    # Two hybrid layers, as checkpoints have many: transformers 5 ties every hybrid layer's shared
    # block to the first one's and refuses a model with one ("We found [...] to tie into []").
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "mamba", "hybrid", "hybrid"],
              "attention_hidden_size": None, "attention_head_dim": None},
    # The default text config leaves rope_scaling unset, but the rotary embedding indexes it.
    "mllama": {"rope_scaling": {"rope_type": "default"}},
    # Mixture of attention heads: the config derives num_attention_heads as num_key_value_heads x
    # num_experts_per_tok, and hidden_size is num_key_value_heads x kv_channels (JetMoE-8B: 16 x
    # 128 = 2048, top-2): top-2 of 2 key/value heads of 32 gives the 4 heads of the tiny models.
    "jetmoe": {"num_experts_per_tok": 2},
    # X-MOD picks a language adapter per batch row and refuses to run without a default language;
    # checkpoints have many languages (xmod-base: 81), the default config one.
    "xmod": {"languages": ["de_DE", "en_XX"], "default_language": "en_XX"},
    # Axial position embeddings: the factors must multiply to the positions and sum to hidden.
    "reformer": {"axial_pos_shape": [16, 32], "axial_pos_embds_dim": [32, 32]},
    # The default init_std is 1.0 (weights drawn from N(0, 1)): logits near 30, where float32
    # rounding alone differs between torch and ONNX Runtime by more than the 1e-4 tolerance.
    "cpmant": {"init_std": 0.02},
}

#: Image codes of the tiny VQ image tokenizers (chameleon, emu3): the top ids of the tiny vocabulary,
#: as their checkpoints give their 8192 / 32768 codes the last ids of theirs.
VQ_CODES = 64
_FIRST_CODE_ID = VOCAB - VQ_CODES


def _chameleon_code_name(code: int) -> str:
    # facebook/chameleon-7b's tokenizer names code 123 "IMGIMGBCDZ": digits as letters from A.
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


#: Per-type values of image-text-to-text heads (`AutoModelForImageTextToText`), only where the
#: vision shrink alone cannot work; merged into the shrunk config, sub-config by sub-config.
#: Types of OVERRIDES that transformers 4.57.6 does not have (added in transformers 5).
TRANSFORMERS_5_TYPES = frozenset({"lfm2_moe"})

VISION_OVERRIDES: dict[str, dict[str, Any]] = {
    # Multimodal rotary sections (temporal, height, width) of each head's rotary half: checkpoints
    # state them ("type": "mrope", [16, 24, 24] for 128-wide heads); the default config has none
    # and the text attention then fails ("'NoneType' object is not subscriptable"). The tiny
    # heads are 16 wide: sections of 8 (glm4v_moe rotates half of each head: 4).
    **dict.fromkeys(
        ("qwen2_vl", "qwen2_5_vl", "glm4v"),
        {"text_config": {"rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}}},
    ),
    "glm4v_moe": {"text_config": {"rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2]}}},
    # Its projector maps a patch count to a query count ({1225: 128, 4900: 256} for 35 x 35 and
    # 70 x 70 patches) and refuses any other count: the tiny tower's 16 patches get 4 queries.
    "aria": {"projector_patch_to_query_dict": {(IMAGE // PATCH) ** 2: 4}},
    # Features of five layers of a 24-layer tower ([-2, -5, -8, -11, 6]) are concatenated; the
    # tiny tower has 2 layers and 3 hidden states, so it concatenates all three.
    "vipllava": {"vision_feature_layers": [-1, -2, -3]},
    # The text model's rotary embedding indexes rope_scaling, which the default text config leaves
    # unset (the causal-LM override above sets it on the text config, the head class's config there).
    "mllama": {"text_config": {"rope_scaling": {"rope_type": "default"}}},
    # Images become VQ codes, which the model maps to text tokens through the checkpoint's tokenizer
    # vocabulary (`vocabulary_map`, unset by default: the model cannot be built without it): the tiny
    # map names the tiny codebook's codes and the image token as the checkpoints' tokenizers do. The
    # VQ model's per-stage channel list and codebook are beyond the generic shrink.
    "chameleon": {
        "vocabulary_map": {"<image>": _FIRST_CODE_ID - 1, **{_chameleon_code_name(code): _FIRST_CODE_ID + code for code in range(VQ_CODES)}},
        "vq_config": {
            "num_embeddings": VQ_CODES, "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1,
            "resolution": IMAGE, "latent_channels": HIDDEN,
        },
    },  # fmt: skip
    "emu3": {
        "vocabulary_map": {
            "<image>": _FIRST_CODE_ID - 1, "<|extra_200|>": _FIRST_CODE_ID - 2,
            **{f"<|visual token {code:06d}|>": _FIRST_CODE_ID + code for code in range(VQ_CODES)},
        },
        "vq_config": {
            "codebook_size": VQ_CODES, "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1,
            "attn_resolutions": [], "embed_dim": 4, "latent_channels": 4, "hidden_size": HIDDEN,
        },
    },  # fmt: skip
    # Its high-resolution SAM-style tower: the projector widens `output_channels` (256) to 2x and 4x
    # in convolutions (7.3M parameters at 256; got_ocr2's tower of the same kind has no such
    # projector), and the features are read at its global-attention layers ([2, 5, 8, 11] of 12),
    # which must be among the tiny tower's 2 layers.
    "deepseek_vl_hybrid": {"high_res_vision_config": {"output_channels": HIDDEN, "global_attn_indexes": [1]}},
    # Its image-generation VQ model (not on the image-to-text path) has per-stage channel lists the
    # shrink does not cut: 128 base channels up to x4 over 5 stages, a 16384-code book (75M parameters).
    "janus": {"vq_config": {"base_channels": 32, "channel_multiplier": [1, 2], "num_embeddings": 256}},
    # Its DaViT tower lists widths, depths and heads per stage (4 stages up to 1024 wide, 91M
    # parameters); the tiny tower keeps two stages.
    "florence2": {
        "vision_config": {
            "depths": [1, 1], "embed_dim": [32, HIDDEN], "num_heads": [2, HEADS], "num_groups": [2, HEADS],
            "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1], "patch_prenorm": [False, True],
        }
    },  # fmt: skip
    # 3-D (temporal, height, width) rotary sections must fill the rotary half of a head: checkpoints
    # have [24, 20, 20] for head_dim 128, the tiny head_dim 32 takes [6, 5, 5]; the default text
    # config leaves rope_scaling unset, which the rotary embedding reads.
    **dict.fromkeys(
        ("qwen3_vl", "qwen3_vl_moe"),
        {"text_config": {"rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}}},
    ),
}

#: Per-type values of the "mha" shape only: jetmoe keeps as many heads as key/value heads (4)
#: with top-1 attention experts.
MHA_OVERRIDES: dict[str, dict[str, Any]] = {"jetmoe": {"num_experts_per_tok": 1}}

#: Values a type's default config cannot even be built without, applied before the shrink only
#: (so the shrink makes them tiny): the generic encoder-decoder composite needs its two halves.
BUILD_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder-decoder": {
        "encoder": {"model_type": "bert"},
        "decoder": {"model_type": "bert", "is_decoder": True, "add_cross_attention": True},
    },
    # Its checkpoints pair a wav2vec2-style encoder with a text decoder (facebook/s2t-wav2vec2-large-en-de).
    "speech-encoder-decoder": {
        "encoder": {"model_type": "wav2vec2"},
        "decoder": {"model_type": "bert", "is_decoder": True, "add_cross_attention": True},
    },
    # Its checkpoints pair an image encoder with a text decoder (microsoft/trocr-base-handwritten:
    # vit + trocr; nlpconnect/vit-gpt2-image-captioning: vit + gpt2).
    "vision-encoder-decoder": {
        "encoder": {"model_type": "vit"},
        "decoder": {"model_type": "gpt2", "is_decoder": True, "add_cross_attention": True},
    },
}

#: Head-size keys that are not free for a type, kept at hidden // heads with real shapes too:
#: mamba2's head_dim is its SSM head size (num_heads x head_dim must equal hidden_size x expand),
#: xlnet's config refuses a d_head other than d_model // n_head (and its checkpoints have none),
#: helium's output projection is hidden x hidden whatever head_dim says (Helium-1 2B: 2048 / 16 = 128),
#: BLT's rotary embedding is sized hidden // heads in each of its four sub-configs.
DERIVED_HEAD_SIZES: dict[str, tuple[str, ...]] = {
    "mamba2": ("head_dim",),
    "xlnet": ("d_head",),
    "helium": ("head_dim",),
    "blt": ("head_dim",),
}

#: The feature extractor settings a type's checkpoints ship (their preprocessor_config.json), as
#: keyword -> value or function of the config, for the types whose inputs only their feature
#: extractor makes right: the tiny model is run as its users run it, on audio through it. The
#: class is the one transformers' AutoFeatureExtractor maps the type to.
FEATURE_EXTRACTORS: dict[str, dict[str, Any]] = {
    # facebook/s2t-small-librispeech-asr: 80 filter banks per channel, with attention mask.
    "speech_to_text": {
        "feature_size": lambda config: config.input_feat_per_channel * config.input_channels,
        "num_mel_bins": lambda config: config.input_feat_per_channel,
    },
    # UsefulSensors/moonshine-tiny: the raw waveform, not normalised, with attention mask.
    "moonshine": {"feature_size": 1, "do_normalize": False, "return_attention_mask": True},
}

#: What a causal-LM head needs whatever the type: encoder architectures (bert, roberta,
#: reformer...) behave as causal LMs only as decoders, as their LM-head classes warn or assert.
_CAUSAL_LM = {"is_decoder": True}

_SPECIAL_TOKEN_SUFFIXES = ("_token_id", "_token_index")


def _layer_count(config: dict[str, Any]) -> int | None:
    for key in SIZES:
        if SIZES[key] == LAYERS and isinstance(config.get(key), int):
            return config[key]
    return None


def _layers_kept(layer_kinds: list[Any] | tuple[Any, ...], shapes: str) -> list[int]:
    """Which layers of a per-layer list the tiny model keeps: the first `LAYERS`, or, with real
    shapes, the first layer of each kind (then the first others) so that a model with sliding
    and full attention layers (gemma3: five sliding, then one full) keeps both."""
    if shapes == "mha":
        return list(range(LAYERS))
    firsts = [index for index, kind in enumerate(layer_kinds) if kind not in layer_kinds[:index]]
    others = [index for index in range(len(layer_kinds)) if index not in firsts]
    return sorted((firsts + others)[:LAYERS])


def _is_per_layer_dict(value: Any, layers: int | None) -> bool:
    """A dict of settings keyed by layer index (ints below the config's layer count), when the
    tiny model cuts the layers."""
    return (
        isinstance(value, dict)
        and bool(value)
        and bool(layers)
        and layers > LAYERS
        and all(_layer_index(k) is not None and _layer_index(k) < layers and isinstance(v, dict) for k, v in value.items())
    )


def _layer_index(key: Any) -> int | None:
    """A layer index written as an int or as digits (`to_dict()` writes gemma4's as "05")."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _scaled_like(settings: dict[str, Any], config: dict[str, Any], shrunk: dict[str, Any]) -> dict[str, Any]:
    """One layer's overrides, each size in the same ratio to the shrunk config's value as to the
    original's (512 where the config says 256 -> twice the tiny head_dim); other values as they are."""
    scaled = {}
    for key, value in settings.items():
        before, after = config.get(key), shrunk.get(key)
        sizes = (value, before, after)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in sizes) and before > 0:
            value = max(1, round(value * after / before))
        scaled[key] = value
    return scaled


def _layer_kinds(config: dict[str, Any], layers: int) -> list[Any]:
    """The config's per-layer list of layer kinds (`layer_types`...), or one kind for every layer:
    what :func:`_layers_kept` chooses the kept layers by, so per-layer dicts keep the same layers."""
    for value in config.values():
        if isinstance(value, (list, tuple)) and len(value) == layers and all(isinstance(v, str) for v in value):
            return list(value)
    return [None] * layers


def _shrink(
    config: dict[str, Any],
    nested: bool = False,
    shapes: str = "real",
    derived: tuple[str, ...] = (),
    vision: bool = False,
) -> dict[str, Any]:
    """A shrunk copy of one level of a config dict, and of every nested config in it.

    A nested config keeps only what differs from `PretrainedConfig`'s defaults: some sub-config
    classes (dbrx's attn_config...) reject the common attributes as unknown keyword arguments.
    """
    real = {key: value for key, value in REAL_SHAPES.items() if key not in derived}
    sizes = {**SIZES, **(VISION_SIZES if vision else {}), **(real if shapes == "real" else {})}
    original_layers = _layer_count(config)
    common = _common_defaults() if nested else {}
    shrunk: dict[str, Any] = {}
    per_layer: dict[str, dict[int, dict[str, Any]]] = {}
    for key, value in config.items():
        if key in common and common[key] == value:
            continue
        if _is_per_layer_dict(value, original_layers):
            # Settings by layer index (transformers 5's `per_layer_config`: gemma4's full-attention
            # layers have twice the sliding layers' head_dim): the kept layers' entries at their new
            # indices; sizes keep their ratio to the config's own (shrunk below, at the end).
            kept = _layers_kept(_layer_kinds(config, original_layers), shapes)
            by_index = {_layer_index(k): v for k, v in value.items()}
            per_layer[key] = {new: by_index[old] for new, old in enumerate(kept) if old in by_index}
            continue
        if isinstance(value, dict) and key not in ("id2label", "label2id", "pruned_heads", "rope_scaling"):
            value = _shrink(value, nested=True, shapes=shapes, derived=derived, vision=vision)
        elif vision and key in VISION_SIZES and _is_int_pair(value):
            value = type(value)((VISION_SIZES[key],) * 2)
        elif vision and key == "image_grid_pinpoints" and value:
            value = _tiny_pinpoints(value)
        elif key in sizes and (
            (isinstance(value, int) and not isinstance(value, bool)) or (value is None and key not in _NONE_MEANS_OFF)
        ):
            value = sizes[key]
        elif key in SWITCHES:
            value = SWITCHES[key]
        elif key in CAPS and isinstance(value, int):
            value = min(value, CAPS[key])
        elif isinstance(value, (list, tuple)) and original_layers and len(value) == original_layers > LAYERS:
            # A per-layer list (layer_types, layers_block_type, ...).
            value = type(value)(value[index] for index in _layers_kept(value, shapes))
        shrunk[key] = value
    for key, layers in per_layer.items():
        shrunk[key] = {index: _scaled_like(settings, config, shrunk) for index, settings in layers.items()}
    if "qk_rope_head_dim" in shrunk:
        # MLA: head_dim is the rotary part of a key head (DeepSeek-V3: both 64), and every head
        # has its own keys and values, decompressed from the shared latent (DeepSeek-V3: 128
        # key/value heads of 128).
        if "head_dim" in shrunk:
            shrunk["head_dim"] = shrunk["qk_rope_head_dim"]
        if "num_key_value_heads" in shrunk:
            shrunk["num_key_value_heads"] = shrunk.get("num_attention_heads", HEADS)
    if "stage_names" in shrunk:
        # A backbone config (swin, beit, convnext...) derives its stage names from `depths`, which
        # may be cut above; its default output stage (the last) is derived again, not kept.
        del shrunk["stage_names"]
        shrunk["out_features"] = shrunk["out_indices"] = None
    vocab, taken = shrunk.get("vocab_size"), set()
    text = shrunk.get("text_config")
    if vision and not isinstance(vocab, int) and isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        # A composite config (llava, gemma3...) states its image token ids beside its text config,
        # whose vocabulary they index; they must not take the text config's own special ids.
        vocab = text["vocab_size"]
        taken = {token for key, token in text.items() if key.endswith(_SPECIAL_TOKEN_SUFFIXES) and isinstance(token, int)}
    if isinstance(vocab, int):
        _bring_special_tokens_into_vocab(shrunk, vocab, taken)
    return shrunk


def _tiny_pinpoints(pinpoints: list[list[int]]) -> list[list[int]]:
    """Tile grids (llava_next's `image_grid_pinpoints`, [[336, 672], [672, 336], ...] for 336 px
    tiles) in tiles of the tiny tower's `IMAGE` px: the checkpoint's tile is its smallest side."""
    tile = min(side for pinpoint in pinpoints for side in pinpoint)
    return [[side * IMAGE // tile for side in pinpoint] for pinpoint in pinpoints]


def _merged(values: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`values` with `override` set in; sub-configs (`text_config`...) merged key by key, not replaced."""
    merged = dict(values)
    for key, value in override.items():
        is_config = key.endswith("_config") and isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if is_config else value
    return merged


def _is_int_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)


def _common_defaults() -> dict[str, Any]:
    return transformers.PretrainedConfig().to_dict()


def _bring_special_tokens_into_vocab(config: dict[str, Any], vocab: int, taken: set[int] = frozenset()) -> None:
    # Ids past the tiny vocabulary (gpt2's eos 50256, image tokens...) would index out of range;
    # they move to distinct ids at the top of the vocabulary (other than the `taken` ones).
    spare = iter(i for i in range(vocab - 1, 2, -1) if i not in taken)
    remapped: dict[int, int] = {}

    def remap(token: Any) -> Any:
        if isinstance(token, int) and token >= vocab:
            if token not in remapped:
                remapped[token] = next(spare)
            return remapped[token]
        if isinstance(token, list):
            return [remap(t) for t in token]
        return token

    for key in sorted(config):
        if key.endswith(_SPECIAL_TOKEN_SUFFIXES):
            config[key] = remap(config[key])


def model_class(model_type: str, auto_model_class: str) -> type:
    """The class `auto_model_class` maps `model_type` to."""
    mapping = getattr(transformers, auto_model_class)._model_mapping
    return mapping[transformers.CONFIG_MAPPING[model_type]]


def tiny_config(
    model_type: str, auto_model_class: str, shapes: str = "real", **overrides: Any
) -> transformers.PretrainedConfig:
    """The default config of `model_type`'s `auto_model_class` head, shrunk; `overrides` win.

    `shapes` is "real" or "mha" (see the module docstring). The config class is the head
    class's own: a few heads (emu3, llama4, mllama, musicgen...) take only the text part of
    their type's composite config.
    """
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {SHAPES}, not {shapes!r}")
    config_class = model_class(model_type, auto_model_class).config_class
    type_overrides = {**OVERRIDES.get(model_type, {}), **(MHA_OVERRIDES.get(model_type, {}) if shapes == "mha" else {})}
    defaults = {
        **BUILD_DEFAULTS.get(model_type, {}),
        **type_overrides,
        **(_CAUSAL_LM if auto_model_class == "AutoModelForCausalLM" else {}),
    }
    values = _shrink(
        config_class(**defaults).to_dict(),
        shapes=shapes,
        derived=DERIVED_HEAD_SIZES.get(model_type, ()),
        vision=auto_model_class in _VISION_HEADS,
    )
    values.update({k: v for k, v in type_overrides.items() if v != {}})
    if auto_model_class in _VISION_HEADS:
        values = _merged(values, VISION_OVERRIDES.get(model_type, {}))
    values.update(overrides)
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    config = config_class(**values)
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        # generate() needs it; checkpoints set it (t5's is its pad token), default configs don't.
        config.decoder_start_token_id = _pad_token_id(config)
    if auto_model_class == "AutoModelForSequenceClassification" and getattr(config, "pad_token_id", None) is None:
        # A decoder's classifier pools each row's last token before its padding, found by the pad
        # id, and refuses batches without one; checkpoints fine-tuned for it set it (GPT-2's: eos).
        config.pad_token_id = _pad_token_id(config)
    return config


def build_tiny_model(
    model_type: str, auto_model_class: str, seed: int = 0, shapes: str = "real", **overrides: Any
) -> Any:
    """A tiny random model of `model_type` under `auto_model_class` (e.g. "AutoModelForCausalLM")."""
    config = tiny_config(model_type, auto_model_class, shapes, **overrides)
    torch.manual_seed(seed)
    model = model_class(model_type, auto_model_class)(config)
    if model.can_generate() and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = _pad_token_id(config)
    logger.info("tiny %s: %d parameters", model_type, sum(p.numel() for p in model.parameters()))
    return model


def tiny_feature_extractor(
    model_type: str, config: transformers.PretrainedConfig, model: Any = None
) -> Any | None:
    """The feature extractor of :data:`FEATURE_EXTRACTORS` for `config`; for an image-text-to-text
    `model` whose images need it (:func:`legacy_shim.tooling.tiny_processors.needs_processor`), the
    processor of :func:`legacy_shim.tooling.tiny_processors.tiny_processor`; else None."""
    from .tiny_processors import needs_processor, tiny_processor

    if model is not None and needs_processor(model):
        return tiny_processor(model_type, config)
    settings = FEATURE_EXTRACTORS.get(model_type)
    if settings is None:
        return None
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    extractor_class = getattr(transformers, FEATURE_EXTRACTOR_MAPPING_NAMES[model_type])
    return extractor_class(**{k: v(config) if callable(v) else v for k, v in settings.items()})


def _pad_token_id(config: transformers.PretrainedConfig) -> int:
    text_config = config.get_text_config()
    # transformers 5 configs define only the token ids their model has (CodeGenConfig: no pad_token_id).
    for candidate in (getattr(text_config, "pad_token_id", None), getattr(text_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, list) and candidate:
            return candidate[0]
    return 0


def save_tiny_model(
    model_type: str, auto_model_class: str, directory: Path, seed: int = 0, shapes: str = "real", **overrides: Any
) -> Path:
    """Builds :func:`build_tiny_model` and saves it (config, generation config, weights, and its
    feature extractor or processor when the type has one, :func:`tiny_feature_extractor`) to `directory`."""
    model = build_tiny_model(model_type, auto_model_class, seed, shapes, **overrides)
    model.save_pretrained(directory)
    feature_extractor = tiny_feature_extractor(model_type, model.config, model)
    if feature_extractor is not None:
        feature_extractor.save_pretrained(directory)
    return Path(directory)
