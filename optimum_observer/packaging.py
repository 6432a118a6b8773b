"""Packaging: write the output directory atomically.

Takes: the named `torch.onnx.ONNXProgram`, the model (for its configs) and the tokenizer.
Gives: a staging directory next to the destination holding the task's ONNX files (`model.onnx`,
or `encoder_model.onnx` / `decoder_model.onnx` / `decoder_with_past_model.onnx`; each with
`<file>_data` when its weights pass 2 GB, as optimum writes them), `config.json`,
`generation_config.json`, and the tokenizer or feature extractor files. :func:`staged_output` moves the files into
the destination only when the whole block (validation included) succeeds, and removes the
staging directory otherwise: a failure never leaves a finished-looking export behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
#: protobuf cannot hold a model of 2 GB or more in one file.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike) -> Iterator[Path]:
    destination = Path(output_dir).resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, destination)


def _publish(staging: Path, destination: Path) -> None:
    if not destination.exists():
        os.replace(staging, destination)
        return
    # An existing directory keeps its other files, as optimum's exporter does; ours replace
    # theirs, the ONNX files last so a reader never sees a new graph beside old weights.
    files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx")
    for path in files:
        target = destination / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def write_model(program: torch.onnx.ONNXProgram, directory: Path, file_name: str = ONNX_FILE) -> list[str]:
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value)
    if weights >= EXTERNAL_DATA_THRESHOLD_BYTES:
        external = f"{file_name}_data"
        ir.save(program.model, directory / file_name, external_data=external)
        return [file_name, external]
    ir.save(program.model, directory / file_name)
    return [file_name]


def write_configs(model: Any, tokenizer: Any | None, directory: Path, feature_extractor: Any | None = None) -> None:
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    for preprocessor in (tokenizer, feature_extractor):
        if preprocessor is not None:
            preprocessor.save_pretrained(directory)


