"""Helpers for the legacy_shim tests: tiny legacy-supported models, ONNX inspection, subprocess runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from tiny_models import build_tokenizer, save_causal_lm

__all__ = [
    "UNSUPPORTED_TYPE",
    "export_saved_vision_language",
    "graph_io",
    "run_cli",
    "run_onnx",
    "run_python",
    "run_without_observer",
    "save_causal_lm",
    "save_encoder",
    "save_seq2seq",
    "torch_greedy",
]

#: A causal-LM type optimum-onnx 0.1.0 has no OnnxConfig for (see test_observer_export.py).
UNSUPPORTED_TYPE = "starcoder2"

PROMPT = "The capital of France is"


def save_encoder(model_type: str, directory: Path) -> Path:
    """A tiny random `AutoModel` encoder (feature-extraction) with a tokenizer."""
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(directory)
    build_tokenizer(directory)
    return Path(directory)


def save_seq2seq(directory: Path, **overrides) -> Path:
    """A tiny random t5 (`AutoModelForSeq2SeqLM`) with a tokenizer."""
    sizes = dict(vocab_size=256, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    config = transformers.AutoConfig.for_model(
        "t5", **{**sizes, **overrides}, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2
    )
    torch.manual_seed(0)
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(directory)
    build_tokenizer(directory)
    return Path(directory)


def graph_io(path: Path) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """(name, dims) of every graph input and output; dims are ints or dim_param names."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return [(v.name, dims(v)) for v in graph.input], [(v.name, dims(v)) for v in graph.output]


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def torch_greedy(model_dir: Path, prompt: str = PROMPT, new_tokens: int = 8) -> list[int]:
    """Greedy tokens of the torch model, the reference for every ONNX generation."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0].tolist()


def ort_greedy(model, model_dir: Path, prompt: str = PROMPT, new_tokens: int = 8) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0].tolist()


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPTIMUM_OBSERVER_DISABLE", "OPTIMUM_OBSERVER_EXPORTER")
    }
    env.update(extra, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter of this environment (so its .pth files apply)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def run_without_observer(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `code` in an interpreter of this environment as it is without optimum-observer (no
    hook, package not importable): the sweep's :func:`legacy_shim.tooling.without_observer.run_without_observer`."""
    from legacy_shim.tooling.without_observer import run_without_observer as run

    return run(code, cwd=cwd, env=_env(), timeout=600)


@contextlib.contextmanager
def runtime_hook_removed() -> Iterator[None]:
    """optimum.onnxruntime's classes as optimum-onnx ships them, for the block: the hook's
    legacy_shim.runtime_cache and legacy_shim.runtime_hooks patches undone, then put back."""
    from optimum.onnxruntime import base, modeling_decoder, modeling_seq2seq

    from legacy_shim import runtime_cache

    classes = (modeling_decoder.ORTModelForCausalLM, modeling_seq2seq.ORTDecoderForSeq2Seq)
    saved = {cls: {name: vars(cls)[name] for name in ("__init__", "forward") if name in vars(cls)} for cls in classes}
    for cls in classes:
        runtime_cache.unpatch(cls)
    axis_inference = vars(base.ORTSessionMixin)["_dynamic_axis_inference"]
    base.ORTSessionMixin._dynamic_axis_inference = getattr(
        axis_inference, "__optimum_observer_original__", axis_inference
    )
    try:
        yield
    finally:
        base.ORTSessionMixin._dynamic_axis_inference = axis_inference
        for cls, functions in saved.items():
            for name, function in functions.items():
                setattr(cls, name, function)


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`optimum-cli ...` in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


#: Sizes of every symbolic dimension when feeding an exported graph in a parity check.
FEED_DIMS = {"batch_size": 2, "sequence_length": 5, "past_sequence_length": 3}


def feeds_for(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for every graph input of `path`, symbolic dims sized by FEED_DIMS."""
    from legacy_shim.runtime_fixes import evaluate_axis_expression

    rng = np.random.default_rng(seed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else evaluate_axis_expression(d, FEED_DIMS) for d in value.shape]
        if value.type == "tensor(int64)":
            if value.name == "input_ids":
                feeds[value.name] = rng.integers(3, 200, size=shape, dtype=np.int64)
            elif value.name == "position_ids":
                start = FEED_DIMS["past_sequence_length"]
                feeds[value.name] = np.broadcast_to(np.arange(start, start + shape[1]), shape).copy()
            elif value.name == "attention_mask":
                feeds[value.name] = np.ones(shape, dtype=np.int64)
            else:
                feeds[value.name] = np.zeros(shape, dtype=np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_same_export(test, expected_dir: Path, actual_dir: Path, atol: float = 1e-5) -> None:
    """Same files, same graph inputs/outputs (names and dims), same outputs on the same inputs."""
    test.assertEqual(
        sorted(p.name for p in expected_dir.iterdir()), sorted(p.name for p in actual_dir.iterdir())
    )
    expected_model, actual_model = expected_dir / "model.onnx", actual_dir / "model.onnx"
    test.assertEqual(graph_io(expected_model), graph_io(actual_model))
    feeds = feeds_for(expected_model)
    for expected, actual in zip(run_onnx(expected_model, feeds), run_onnx(actual_model, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def export_saved_vision_language(cls: type, name: str) -> None:
    """For a test class's `setUpClass`: saves `cls.model` and `cls.processor` into a temporary
    directory (`cls.tmp`, `cls.source`) and exports them for image-text-to-text through Optimum's
    entry point `legacy_shim.main_export` into `cls.output`; `cls.route` and `cls.result` (the
    observer's result) hold what it gave. The directory is removed after the class (a class cleanup)."""
    from legacy_shim import main_export

    cls.tmp = tempfile.TemporaryDirectory()
    cls.addClassCleanup(cls.tmp.cleanup)
    cls.source, cls.output = Path(cls.tmp.name) / name, Path(cls.tmp.name) / f"{name}-onnx"
    cls.model.save_pretrained(cls.source)
    cls.processor.save_pretrained(cls.source)
    cls.route = main_export(str(cls.source), str(cls.output), task="image-text-to-text")
    cls.result = cls.route.observer_result


def random_images(sizes: Sequence[tuple[int, int]], channels: int = 3) -> list[np.ndarray]:
    """Random uint8 images of the given (height, width) sizes, as image processors take them
    (the same pixels on every call)."""
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in sizes]
