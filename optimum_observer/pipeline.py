"""The observer export, stage by stage: load, capture, synthesize, export, name, package, validate."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .result import ExportResult


def export(
    model: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    *,
    task: str = "text-generation-with-past",
    run: Callable[[Any], Any] | None = None,
    tokenizer: Any = None,
    opset: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: bool | str | None = None,
    subfolder: str = "",
    show_progress: bool | None = None,
) -> ExportResult:
    """Exports `model` to ONNX in `output_dir` by observing a typical run of it.

    Args:
        model: a model id or local directory, or an already loaded `PreTrainedModel`.
        output_dir: directory to write; written atomically (a failure leaves no finished-looking
            directory behind).
        task: one of :func:`optimum_observer.supported_tasks`.
        run: optional callable receiving the loaded model (or a pipeline when a tokenizer is
            available) and running it the way a user would; by default `generate` is called over
            prompts of two lengths and two batch sizes.
        tokenizer: tokenizer to use and save; loaded from `model` when it is a path holding one.
        opset: ONNX opset; the exporter's default when None.
        dtype: "fp32" (default), "fp16", "bf16" or a torch dtype.
        device: device the model runs on during capture and export.
        trust_remote_code, model_kwargs, local_files_only, cache_dir, revision, token, subfolder:
            forwarded to `from_pretrained`.
        validate: replay the observed calls through ONNX Runtime and check greedy generation
            through the unchanged `optimum.onnxruntime` class; a mismatch raises.
        atol: absolute tolerance of the replay.
        show_progress: progress bar over the stages; defaults to "stderr is a terminal".

    Raises:
        ObserverExportError: naming the model type, the stage and what to try next.
    """
    raise NotImplementedError
