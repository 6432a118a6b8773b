"""Load: the model, its tokenizer and its model type, from a path, a hub id or an object.

Takes: what the user passed to :func:`optimum_observer.export`.
Gives: a :class:`LoadedModel` in eval mode on the requested device and dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import transformers

from .errors import ObserverExportError, Stage
from .families import family_of
from .tasks import TaskContract

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    model: Any
    model_type: str
    tokenizer: Any | None
    feature_extractor: Any | None = None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or a torch.dtype.")
    return DTYPES[dtype]


def _local_config(source: str, subfolder: str = "") -> dict[str, Any] | None:
    """The checkpoint's config.json read as plain JSON (no code runs), when it is local."""
    path = os.path.join(source, subfolder, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


@dataclasses.dataclass(frozen=True)
class SubConfigHome:
    """Where transformers registers a model type only as a sub-config of another (`emu3_text_model`
    as `Emu3Config.text_config`, `mllama_text_model` as `MllamaConfig.text_config`)."""

    composite_class: type
    key: str
    sub_config_class: type


def sub_config_home(model_type: str | None) -> SubConfigHome | None:
    """The composite config that registers `model_type` as one of its sub-configs, when
    `CONFIG_MAPPING` (what AutoConfig reads) lacks `model_type` itself; None otherwise."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type is None or model_type in CONFIG_MAPPING:
        return None
    for config_class in CONFIG_MAPPING.values():
        sub_configs = config_class.__dict__.get("sub_configs")
        for key, sub_config in sub_configs.items() if isinstance(sub_configs, dict) else ():
            if getattr(sub_config, "model_type", None) == model_type:
                return SubConfigHome(config_class, key, sub_config)
    return None


def unregistered_config(directory: str | os.PathLike[str], subfolder: str = "") -> Any | None:
    """The config saved in `directory` when AutoConfig cannot read it because transformers
    registers its model type only as a sub-config of another (:func:`sub_config_home`: the
    text model a text-generation export of emu3 or mllama saved before its config.json held the
    composite config); None when AutoConfig reads it, or when the directory holds no such config.

    Runtime classes take it as `from_pretrained(directory, config=...)`."""
    home = sub_config_home((_local_config(os.fspath(directory), subfolder) or {}).get("model_type"))
    if home is None:
        return None
    return home.sub_config_class.from_pretrained(os.path.join(directory, subfolder))


def _ships_code(source: str, subfolder: str, error: BaseException | None = None) -> bool:
    """Whether the checkpoint brings its own modelling code (`auto_map` in its config)."""
    config = _local_config(source, subfolder)
    if config is not None:
        return "auto_map" in config
    return error is not None and "trust_remote_code" in str(error)


def _config_remedy(source: str, subfolder: str, trust_remote_code: bool, error: BaseException) -> str:
    """What to do when AutoConfig cannot read the checkpoint's config, true for that case."""
    if _ships_code(source, subfolder, error) and not trust_remote_code:
        return (
            "the checkpoint ships its own modelling code (auto_map in its config.json): pass "
            "trust_remote_code=True (--trust-remote-code) if you trust that code."
        )
    config = _local_config(source, subfolder)
    if config is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            return (
                f"transformers {transformers.__version__} does not know model_type {model_type!r}: "
                "upgrade transformers (pip install -U transformers), or pass trust_remote_code=True "
                "if the checkpoint ships its own code."
            )
        return "check the config.json of the checkpoint: transformers could not read it."
    if os.path.isdir(source):
        return f"{source} holds no config.json: pass the directory that holds config.json and the weights."
    return (
        "pass the path of a directory holding config.json and the weights, or a hub model id "
        "reachable from this machine."
    )


def _model_type_of(source: str, hub_kwargs: dict[str, Any], trust_remote_code: bool) -> str:
    try:
        return transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, **hub_kwargs
        ).model_type
    except Exception as error:
        exists = os.path.isdir(source)
        raise ObserverExportError(
            source,
            Stage.LOAD,
            f"could not read a model config from {source!r}"
            + ("" if exists else " (no such local directory, and it could not be fetched as a hub id)")
            + f": {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            _config_remedy(source, hub_kwargs.get("subfolder", ""), trust_remote_code, error),
        ) from error


def _load_remedy(source: str, subfolder: str, trust_remote_code: bool, error: BaseException) -> str:
    """What to do when from_pretrained fails after the config was read."""
    message = str(error)
    if "no file named" in message or "does not appear to have a file named" in message:
        return (
            "the checkpoint's weights file is missing: put model.safetensors (or pytorch_model.bin) "
            "beside config.json, or pass a hub model id."
        )
    if _ships_code(source, subfolder, error) and not trust_remote_code:
        return (
            "the checkpoint ships its own modelling code (auto_map in its config.json): pass "
            "trust_remote_code=True (--trust-remote-code) if you trust that code."
        )
    return "check the checkpoint files (config.json and the weights must belong together)."


@contextlib.contextmanager
def caller_model_restored(model: Any) -> Iterator[None]:
    """A loaded model the caller passed gets back the training mode of each of its modules and
    its `config.use_cache` after the export (loading sets eval mode and the task's use_cache).
    A path or id: nothing to restore."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = {module: module.training for module in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        if use_cache is not None:
            config.use_cache = use_cache


def load(
    model: str | os.PathLike | Any,
    contract: TaskContract,
    *,
    tokenizer: Any | None,
    dtype: str | torch.dtype | None,
    feature_extractor: Any | None = None,
    device: str,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any] | None,
    hub_kwargs: dict[str, Any],
) -> LoadedModel:
    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model_type = _model_type_of(source, hub_kwargs, trust_remote_code)
        auto_class = getattr(transformers, contract.auto_model_class)
        try:
            loaded = auto_class.from_pretrained(
                source,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                **hub_kwargs,
                **(model_kwargs or {}),
            )
        except ValueError as error:
            if "Unrecognized configuration class" in str(error):
                raise ObserverExportError(
                    model_type,
                    Stage.LOAD,
                    f"model type {model_type!r} has no {contract.auto_model_class} head, so it "
                    f"cannot be exported for {contract.name!r}",
                    "pick a task this architecture supports (for example feature-extraction for "
                    "an encoder), or a checkpoint of a generative architecture.",
                ) from error
            raise ObserverExportError(
                model_type,
                Stage.LOAD,
                f"{type(error).__name__}: {error}",
                _load_remedy(source, hub_kwargs.get("subfolder", ""), trust_remote_code, error),
            ) from error
        except Exception as error:
            raise ObserverExportError(
                model_type,
                Stage.LOAD,
                f"from_pretrained failed: {type(error).__name__}: {error}",
                _load_remedy(source, hub_kwargs.get("subfolder", ""), trust_remote_code, error),
            ) from error
        if tokenizer is None:
            tokenizer = _try_tokenizer(source, hub_kwargs, trust_remote_code)
        family = family_of(contract)
        if feature_extractor is None and family.uses_feature_extractor:
            feature_extractor = _try_feature_extractor(source, hub_kwargs, trust_remote_code, family.preprocessor_class)
    else:
        loaded = model.to(torch_dtype)
        model_type = loaded.config.model_type
    _check_architecture(loaded, model_type, contract)
    try:
        loaded = loaded.to(device).eval()
    except (RuntimeError, AssertionError) as error:  # torch asserts when it was built without CUDA
        raise ObserverExportError(
            model_type,
            Stage.LOAD,
            f"the model cannot be moved to device {device!r}: {type(error).__name__}: {error}",
            "pass a device this machine has: device='cpu', or a CUDA device when torch was built with "
            "CUDA and one is visible (torch.cuda.is_available()).",
        ) from error
    loaded.config.use_cache = contract.with_past
    return LoadedModel(model=loaded, model_type=model_type, tokenizer=tokenizer, feature_extractor=feature_extractor)


def _check_architecture(model: Any, model_type: str, contract: TaskContract) -> None:
    """An encoder-decoder model for an encoder-decoder task, and a decoder-only one otherwise."""
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    wants_encoder_decoder = family_of(contract).encoder_decoder
    if wants_encoder_decoder is None or is_encoder_decoder == wants_encoder_decoder:
        return
    kind = "an encoder-decoder" if is_encoder_decoder else "a decoder-only"
    tasks = "text2text-generation-with-past or automatic-speech-recognition-with-past"
    raise ObserverExportError(
        model_type,
        Stage.LOAD,
        f"{kind} model cannot be exported for {contract.name!r}, which needs "
        + ("an encoder-decoder model" if wants_encoder_decoder else "a decoder-only model"),
        f"export it for {tasks if is_encoder_decoder else 'text-generation-with-past'} instead.",
    )


def _try_feature_extractor(
    source: str, hub_kwargs: dict[str, Any], trust_remote_code: bool, auto_class: str = "AutoFeatureExtractor"
) -> Any | None:
    try:
        return getattr(transformers, auto_class).from_pretrained(
            source, trust_remote_code=trust_remote_code, **hub_kwargs
        )
    except Exception as error:
        logger.info("no feature extractor loaded from %s (%s); capture uses random features", source, error)
        return None


def _try_tokenizer(source: str, hub_kwargs: dict[str, Any], trust_remote_code: bool) -> Any | None:
    try:
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
    except Exception as error:
        logger.info("no tokenizer loaded from %s (%s); capture uses random token ids", source, error)
        return None
