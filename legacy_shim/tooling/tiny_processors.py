"""Tiny processors (tokenizer and image processor) for tiny image-text-to-text models, built locally.

Takes: a tiny config (:mod:`legacy_shim.tooling.tiny_configs`) of a type whose images only its
processor lays out right: the default run of `optimum_observer.vision_language` makes llava-style,
tiled and grid images itself, but an image split in tiles by its size or cut by its size into
patches needs `image_sizes` and a placeholder count by size, which only the processor knows
(llava_next, llava_next_video's images, mistral3).
Gives: :func:`tiny_processor`, the processor class transformers' `PROCESSOR_MAPPING` names for
the type, with its image processor (`IMAGE_PROCESSOR_MAPPING`) set to the tiny tower's sizes and a
byte-level BPE tokenizer trained on the fly whose special tokens (the processor's `image_token`,
`video_token`, `image_break_token`...) sit at the ids the config states for them
(`image_token_id` / `image_token_index`...), as a checkpoint's tokenizer and config agree.

Everything is data: the settings of each processor class (:data:`PROCESSORS`) and image
processor class (:data:`IMAGE_PROCESSORS`), values or functions of the config. A type gets a
processor when its processor class has an entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import transformers
from tokenizers import AddedToken

from optimum_observer.demo import trained_bpe

Setting = Any  # a value, or a function of the config


def _vision(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    return config.vision_config


def _image_size(config: transformers.PretrainedConfig) -> int:
    size = _vision(config).image_size
    return size if isinstance(size, int) else size[0]


def _patch_size(config: transformers.PretrainedConfig) -> int:
    return _vision(config).patch_size


#: Vision towers whose features start with tokens that are not patches (CLIP's class token), by the
#: tower's model type: the processors of llava_next-style models count them
#: (`num_additional_image_tokens`) and the `default` selection strategy drops them again.
EXTRA_VISION_TOKENS: dict[str, int] = {"clip_vision_model": 1}


def _extra_vision_tokens(config: transformers.PretrainedConfig) -> int:
    return EXTRA_VISION_TOKENS.get(_vision(config).model_type, 0)


def _llava_next_style(config: transformers.PretrainedConfig) -> dict[str, Setting]:
    return {
        "patch_size": _patch_size(config),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": _extra_vision_tokens(config),
    }


#: Processor class (transformers' `PROCESSOR_MAPPING_NAMES`) -> its keyword arguments for a tiny
#: config, as its checkpoints' processor_config.json state them for theirs.
PROCESSORS: dict[str, Callable[[transformers.PretrainedConfig], dict[str, Setting]]] = {
    # llava-hf/llava-v1.6-mistral-7b-hf: 14 px patches, "default" strategy, CLIP's class token.
    "LlavaNextProcessor": _llava_next_style,
    # mistralai/Mistral-Small-3.1-24B: the pixtral tower's patches, 2 x 2 merged into one token;
    # a llava with a pixtral tower (mistral-community/pixtral-12b) merges none.
    "PixtralProcessor": lambda config: {
        "patch_size": _patch_size(config),
        "spatial_merge_size": getattr(config, "spatial_merge_size", 1),
    },
    # deepseek-community/deepseek-vl-7b-chat: one token per patch of the low-resolution tower
    # (576 = 24 x 24 of 16 px at 384 px); the high-resolution tower's features are added to them.
    "DeepseekVLHybridProcessor": lambda config: {
        "num_image_tokens": (_image_size(config) // _patch_size(config)) ** 2,
    },
}

#: Processor classes that read their special tokens from the tokenizer (`tokenizer.image_token`,
#: a checkpoint's `extra_special_tokens`) instead of taking them as arguments: attribute -> token.
TOKENIZER_TOKENS: dict[str, dict[str, str]] = {
    "DeepseekVLHybridProcessor": {"image_token": "<image_placeholder>"},
}

#: Processor classes that cannot be built here, and the class that processes their images the same
#: way: LlavaNextVideoProcessor's video processor needs torchvision (not installed; a processor
#: refuses to be built without one), and its images go through LlavaNextProcessor's code.
STAND_INS: dict[str, str] = {"LlavaNextVideoProcessor": "LlavaNextProcessor"}

#: Image processor class (transformers' `IMAGE_PROCESSOR_MAPPING_NAMES`, the slow one: the fast
#: ones need torchvision) -> its keyword arguments for a tiny config: the tower's image size for
#: what checkpoints set to theirs, the config's tile grids.
IMAGE_PROCESSORS: dict[str, Callable[[transformers.PretrainedConfig], dict[str, Setting]]] = {
    "LlavaNextImageProcessor": lambda config: {
        "size": {"shortest_edge": _image_size(config)},
        "crop_size": {"height": _image_size(config), "width": _image_size(config)},
        "image_grid_pinpoints": config.image_grid_pinpoints,
    },
    # Images are resized to fit the tower's image size, then cut in patches by their own size.
    "PixtralImageProcessor": lambda config: {
        "size": {"longest_edge": _image_size(config)},
        "patch_size": _patch_size(config),
    },
    # Each image at the sizes of both towers (384 and 1024 px in checkpoints).
    "DeepseekVLHybridImageProcessor": lambda config: {
        "size": {"height": _image_size(config), "width": _image_size(config)},
        "high_res_size": {
            "height": config.high_res_vision_config.image_size, "width": config.high_res_vision_config.image_size
        },
    },
}

#: Vocabulary the tokenizer is trained to before the reserved and special tokens above it.
TRAINED_VOCAB = 200
_BASE_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def processor_class(model_type: str) -> type | None:
    """The processor class transformers maps `model_type` to, when :data:`PROCESSORS` has its
    settings (or those of its :data:`STAND_INS` entry)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name) if STAND_INS.get(name, name) in PROCESSORS else None


def _image_processor_class(model_type: str, processor: type) -> type:
    """The image processor class `processor` declares (its first, slow one), else the one
    transformers maps `model_type` to."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    declared = processor.image_processor_class
    declared = declared[0] if isinstance(declared, tuple) else declared
    if declared.startswith("Auto"):
        declared = IMAGE_PROCESSOR_MAPPING_NAMES[model_type][0]
    return getattr(transformers, declared)


def _config_id(config: transformers.PretrainedConfig, name: str) -> int | None:
    ids = (getattr(config, f"{name}_id", None), getattr(config, f"{name}_index", None))
    return next((i for i in ids if isinstance(i, int)), None)


def _special_tokens(processor: type, config: transformers.PretrainedConfig) -> dict[str, int | None]:
    """The processor's special tokens (its `*_token` keyword defaults: `image_token`, ..., and its
    :data:`TOKENIZER_TOKENS`) -> the id the config states for each (`image_token_id` or
    `image_token_index`), or None."""
    named = {
        name: parameter.default
        for name, parameter in inspect.signature(processor.__init__).parameters.items()
        if name.endswith("_token") and isinstance(parameter.default, str)
    }
    named.update(TOKENIZER_TOKENS.get(processor.__name__, {}))
    return {token: _config_id(config, name) for name, token in named.items()}


def tiny_tokenizer(
    placed: dict[str, int | None], extra_special_tokens: dict[str, str] | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with each of `placed`'s tokens at its
    id (a token without one gets the next free id above the vocabulary); the ids between are
    reserved tokens, as checkpoints' tokenizers have. Pads on the left, returns no token types.
    `extra_special_tokens` name some of them as attributes (`tokenizer.image_token`)."""
    fixed = {token: i for token, i in placed.items() if i is not None}
    clash = [t for t, i in fixed.items() if i < len(_BASE_TOKENS)]
    if clash:
        raise ValueError(f"{clash} would take the ids of {_BASE_TOKENS}")
    by_id = {i: token for token, i in fixed.items()}
    # Tokens below the trained vocabulary are the trainer's special tokens, in id order.
    low = max([i for i in by_id if i < TRAINED_VOCAB], default=len(_BASE_TOKENS) - 1) + 1
    specials = [_BASE_TOKENS[i] if i < len(_BASE_TOKENS) else by_id.get(i, f"<reserved_{i}>") for i in range(low)]
    backend = trained_bpe(TRAINED_VOCAB, specials)
    # Above it: the tokens at their ids, those without one in the first reserved slots (inside the
    # config's vocabulary where there is room), the other slots reserved.
    unplaced = [token for token, i in placed.items() if i is None]
    top = max([i for i in by_id if i >= TRAINED_VOCAB], default=-1)
    above = []
    for i in range(backend.get_vocab_size(), top + 1):
        above.append(by_id.get(i) or (unplaced.pop(0) if unplaced else f"<reserved_{i}>"))
    above += unplaced
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in above])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=list(placed),
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t, i in fixed.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        raise ValueError(f"tokens not at their config's ids: {wrong} (wanted {fixed})")
    return tokenizer


def needs_processor(model: Any) -> bool:
    """Whether the default run cannot build `model`'s images without its processor: its
    `get_image_features` requires what only the processor makes (`image_sizes`...). A llava with a
    tower that takes other images (the `pixtral` type's llava) builds its own and gets none."""
    from optimum_observer import vision_language

    try:
        return bool(vision_language.unbuilt_vision_inputs(model))
    except AttributeError:  # no inner model with get_image_features: not this layout
        return False


def tiny_processor(model_type: str, config: transformers.PretrainedConfig) -> Any | None:
    """The processor of `model_type` for the tiny `config` (see the module docstring), or None for a
    type whose processor class has no entry in :data:`PROCESSORS`."""
    processor = processor_class(model_type)
    if processor is None:
        return None
    image_processor_class = _image_processor_class(model_type, processor)
    processor = getattr(transformers, STAND_INS.get(processor.__name__, processor.__name__))
    image_processor = image_processor_class(**IMAGE_PROCESSORS[image_processor_class.__name__](config))
    parts: dict[str, Any] = {
        "image_processor": image_processor,
        "tokenizer": tiny_tokenizer(_special_tokens(processor, config), TOKENIZER_TOKENS.get(processor.__name__)),
    }
    return processor(**parts, **PROCESSORS[processor.__name__](config))
