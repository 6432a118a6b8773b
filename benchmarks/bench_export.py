"""Legacy (optimum-onnx `main_export`) vs observer export of the same causal LMs, in one run.

For each model: export wall time and peak RSS (each export in its own subprocess, which reports
its own `ru_maxrss`), ONNX file size, and ONNX Runtime latency of one prefill of 128 tokens and
one decode step after 128 tokens (median of repeated runs, both sessions in this process, their
runs alternating).
Prints one table with observer / legacy ratios.

    python benchmarks/bench_export.py            # tiny llama and a ~100M-parameter llama
    python benchmarks/bench_export.py --only tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from optimum_observer.demo import DECODER_SIZES, build_tokenizer

MODELS = {
    "tiny": dict(DECODER_SIZES, num_key_value_heads=2),
    "llama-100M": dict(
        DECODER_SIZES,
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
    ),
}

EXPORT_SCRIPT = """
import json, resource, sys, time
exporter, source, output = sys.argv[1:4]
start = time.perf_counter()
if exporter == "legacy":
    from optimum.exporters.onnx import main_export
    main_export(source, output, task="text-generation-with-past", do_validation=False)
else:
    import optimum_observer
    optimum_observer.export(source, output, task="text-generation-with-past", validate=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def export_in_subprocess(exporter: str, source: Path, output: Path) -> dict[str, float]:
    # The legacy figure is optimum-onnx alone: legacy_shim's import hook stays out of it.
    env = {**os.environ, "OPTIMUM_OBSERVER_DISABLE": "1"} if exporter == "legacy" else None
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, exporter, str(source), str(output)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{exporter} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def onnx_size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("model.onnx*")) / 1e6


def _feeds(session: ort.InferenceSession, batch: int, new: int, past: int) -> dict[str, np.ndarray]:
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.random.randint(3, 200, (batch, new), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past + new), dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))
        elif value.name.startswith("past_key_values"):
            heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = np.random.rand(batch, heads, past, head_dim).astype(np.float32)
        else:
            raise ValueError(f"unexpected graph input {value.name}")
    return feeds


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_latency_ms(paths: dict[str, Path], new: int, past: int, repeat: int) -> dict[str, float]:
    """Median latency per model; the runs alternate between the models so that a change in the
    machine's load during the measurement falls on both alike."""
    sessions = {name: _session(path) for name, path in paths.items()}
    feeds = {name: _feeds(session, 1, new, past) for name, session in sessions.items()}
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():
        session.run(None, feeds[name])
    for _ in range(repeat):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            timings[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in timings.items()}


def bench(name: str, sizes: dict, scratch: Path, repeat: int) -> list[tuple[str, float, float]]:
    source = scratch / name
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(source)
    build_tokenizer(source)
    del model
    rows = []
    results: dict[str, dict[str, float]] = {}
    outputs = {exporter: scratch / f"{name}-{exporter}" for exporter in ("legacy", "observer")}
    for exporter, output in outputs.items():
        results[exporter] = export_in_subprocess(exporter, source, output)
        results[exporter]["size_mb"] = onnx_size_mb(output)
    paths = {exporter: output / "model.onnx" for exporter, output in outputs.items()}
    for metric, new, past, runs in (("prefill_ms", 128, 0, repeat), ("decode_ms", 1, 128, repeat * 4)):
        for exporter, value in paired_latency_ms(paths, new, past, runs).items():
            results[exporter][metric] = value
    print(f"\n{name} ({params:.1f}M parameters)")
    print(f"{'metric':<22} {'legacy':>10} {'observer':>10} {'observer/legacy':>16}")
    for metric, label in [
        ("seconds", "export wall time (s)"),
        ("peak_rss_mb", "export peak RSS (MB)"),
        ("size_mb", "ONNX size (MB)"),
        ("prefill_ms", "ORT prefill 128 (ms)"),
        ("decode_ms", "ORT decode @128 (ms)"),
    ]:
        legacy, observer = results["legacy"][metric], results["observer"][metric]
        print(f"{label:<22} {legacy:>10.2f} {observer:>10.2f} {observer / legacy:>16.2f}")
        rows.append((label, legacy, observer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or list(MODELS):
            bench(name, MODELS[name], Path(scratch), args.repeat)


if __name__ == "__main__":
    main()
