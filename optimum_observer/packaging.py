"""Packaging: write the output directory atomically.

Takes: the named `torch.onnx.ONNXProgram`, the model (for its configs) and the tokenizer.
Gives: a staging directory next to the destination holding `model.onnx` (and
`model.onnx_data` when the weights pass 2 GB, as optimum writes them), `config.json`,
`generation_config.json` and the tokenizer files. :func:`staged_output` moves the files into
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
EXTERNAL_DATA_FILE = "model.onnx_data"
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
    # theirs, the ONNX file last so a reader never sees a new graph beside old weights.
    files = sorted(staging.iterdir(), key=lambda p: p.name == ONNX_FILE)
    for path in files:
        target = destination / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def write_model(program: torch.onnx.ONNXProgram, directory: Path) -> list[str]:
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value)
    if weights >= EXTERNAL_DATA_THRESHOLD_BYTES:
        ir.save(program.model, directory / ONNX_FILE, external_data=EXTERNAL_DATA_FILE)
        return [ONNX_FILE, EXTERNAL_DATA_FILE]
    ir.save(program.model, directory / ONNX_FILE)
    return [ONNX_FILE]


def write_configs(model: Any, tokenizer: Any | None, directory: Path) -> None:
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
