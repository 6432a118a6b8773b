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
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from measure import EXPORTERS, cache_layout, export_in_subprocess, onnx_size_mb, paired_latency_ms, print_table
from optimum_observer.demo import DECODER_SIZES, build_tokenizer

TASK = "text-generation-with-past"
METRICS = [
    ("seconds", "export wall time (s)"),
    ("peak_rss_mb", "export peak RSS (MB)"),
    ("size_mb", "ONNX size (MB)"),
    ("prefill_ms", "ORT prefill 128 (ms)"),
    ("decode_ms", "ORT decode @128 (ms)"),
]

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

def feeds(session: ort.InferenceSession, batch: int, new: int, past: int) -> dict[str, np.ndarray]:
    """Inputs of one step: `new` tokens after `past` cached ones, for every row of the batch."""
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.random.randint(3, 200, (batch, new), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past + new), dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))
        elif value.name.startswith("past_key_values"):
            heads, head_dim = cache_layout(session, value.name)
            feeds[value.name] = np.random.rand(batch, heads, past, head_dim).astype(np.float32)
        else:
            raise ValueError(f"unexpected graph input {value.name}")
    return feeds


def bench(name: str, sizes: dict, scratch: Path, repeat: int) -> None:
    source = scratch / name
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(source)
    build_tokenizer(source)
    del model
    results: dict[str, dict[str, float]] = {}
    outputs = {exporter: scratch / f"{name}-{exporter}" for exporter in EXPORTERS}
    for exporter, output in outputs.items():
        results[exporter] = export_in_subprocess(exporter, source, output, TASK)
        results[exporter]["size_mb"] = onnx_size_mb(output)
    paths = {exporter: output / "model.onnx" for exporter, output in outputs.items()}
    for metric, new, past, runs in (("prefill_ms", 128, 0, repeat), ("decode_ms", 1, 128, repeat * 4)):
        feeds_for = functools.partial(feeds, batch=1, new=new, past=past)
        for exporter, value in paired_latency_ms(paths, feeds_for, runs).items():
            results[exporter][metric] = value
    print(f"\n{name} ({params:.1f}M parameters)")
    print_table(results, METRICS)


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
