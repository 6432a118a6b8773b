"""Legacy (optimum-onnx `main_export`) vs observer export of encoder-decoder models, in one run.

For each model (a tiny T5, a ~60M-parameter T5 with t5-small's sizes, a Whisper with
whisper-tiny's sizes; random weights): export wall time and peak RSS (each export in its own
subprocess, which reports its own `ru_maxrss`), ONNX size, and ONNX Runtime latency of one
encoder call (128 tokens, or 30 s of mel features) and one decoder step with a self-attention
cache of 32 (median of repeated runs, both sessions in this process, their runs alternating).
The legacy decoder step runs its merged decoder (`use_cache_branch` true) when it wrote one, as
its runtime would. Prints one table per model with observer / legacy ratios.

    python benchmarks/bench_seq2seq.py
    python benchmarks/bench_seq2seq.py --only t5-tiny
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

from measure import EXPORTERS, export_in_subprocess, onnx_size_mb, paired_latency_ms, print_table
from optimum_observer.demo import build_tokenizer

TEXT2TEXT = "text2text-generation-with-past"
SPEECH = "automatic-speech-recognition-with-past"
ENCODER_TOKENS = 128
PAST = 32

_TINY_T5 = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
_T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
_WHISPER_TINY = dict(
    vocab_size=51865,
    num_mel_bins=80,
    d_model=384,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=6,
    decoder_attention_heads=6,
    encoder_ffn_dim=1536,
    decoder_ffn_dim=1536,
    max_source_positions=1500,
    max_target_positions=448,
)
MODELS = {"t5-tiny": ("t5", _TINY_T5), "t5-60M": ("t5", _T5_SMALL), "whisper-tiny": ("whisper", _WHISPER_TINY)}
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)

def save_model(kind: str, sizes: dict, source: Path) -> float:
    torch.manual_seed(0)
    if kind == "whisper":
        model = transformers.WhisperForConditionalGeneration(
            transformers.WhisperConfig(**sizes, **_IDS, begin_suppress_tokens=None, suppress_tokens=None)
        )
        model.generation_config.forced_decoder_ids = None
        transformers.WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]).save_pretrained(source)
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**sizes, **_IDS))
        build_tokenizer(source)
    model.save_pretrained(source)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _dim(value: ort.NodeArg, axis: int, default: int) -> int:
    size = value.shape[axis]
    return size if isinstance(size, int) else default


def _feeds(session: ort.InferenceSession, encoder_length: int, hidden: int, decoder_step: bool) -> dict[str, np.ndarray]:
    """Batch 1: the encoder on `encoder_length` positions, or one decoder token after PAST."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        name = value.name
        if name == "input_ids":
            # A decoder_with_past graph has no encoder_hidden_states input: which graph this is
            # comes from the caller, not from the inputs.
            feeds[name] = rng.integers(3, 200, (1, 1 if decoder_step else encoder_length), dtype=np.int64)
        elif name in ("attention_mask", "encoder_attention_mask"):
            # Whisper's is the (unused) mask generate() makes over the mel bins: its size is static.
            feeds[name] = np.ones((1, _dim(value, 1, encoder_length)), dtype=np.int64)
        elif name == "input_features":
            feeds[name] = rng.standard_normal((1, _dim(value, 1, 80), _dim(value, 2, 3000)), dtype=np.float32)
        elif name == "encoder_hidden_states":
            feeds[name] = rng.standard_normal((1, encoder_length, hidden), dtype=np.float32)
        elif name == "use_cache_branch":
            feeds[name] = np.array([True])
        elif name.startswith("past_key_values"):
            length = encoder_length if ".encoder." in name else PAST
            feeds[name] = rng.standard_normal((1, _dim(value, 1, 1), length, _dim(value, 3, 1)), dtype=np.float32)
        else:
            raise ValueError(f"unexpected graph input {name}")
    return feeds


def _latencies(paths: dict[str, Path], encoder_length: int, hidden: int, runs: int, metric: str) -> dict[str, float]:
    """Paired latencies; when one file does not take these synthetic feeds, the others alone."""
    decoder_step = metric == "decoder_step_ms"
    feeds_for = functools.partial(_feeds, encoder_length=encoder_length, hidden=hidden, decoder_step=decoder_step)
    try:
        return paired_latency_ms(paths, feeds_for, runs)
    except Exception:
        latencies = {}
        for name, path in paths.items():
            try:
                latencies.update(paired_latency_ms({name: path}, feeds_for, runs))
            except Exception as error:
                print(f"  {metric}, {name}: not measured ({str(error).splitlines()[0][:200]})")
                latencies[name] = float("nan")
        return latencies


def _decoder_step_file(directory: Path) -> Path:
    """The file the runtime runs a step with: ORTModelForSeq2SeqLM loads the merged decoder when
    there is one (legacy writes it besides the two it merged)."""
    merged = directory / "decoder_model_merged.onnx"
    return merged if merged.exists() else directory / "decoder_with_past_model.onnx"


def bench(name: str, scratch: Path, repeat: int) -> None:
    kind, sizes = MODELS[name]
    task = SPEECH if kind == "whisper" else TEXT2TEXT
    source = scratch / name
    params = save_model(kind, sizes, source)
    outputs = {exporter: scratch / f"{name}-{exporter}" for exporter in EXPORTERS}
    results = {exporter: export_in_subprocess(exporter, source, output, task) for exporter, output in outputs.items()}
    for exporter, output in outputs.items():
        results[exporter]["size_mb"] = onnx_size_mb(output)
        results[exporter]["files"] = sorted(p.name for p in output.glob("*.onnx"))
    encoder_length = sizes.get("max_source_positions", ENCODER_TOKENS)
    encoders = {e: o / "encoder_model.onnx" for e, o in outputs.items()}
    decoders = {e: _decoder_step_file(o) for e, o in outputs.items()}
    for metric, paths, runs in (("encoder_ms", encoders, repeat), ("decoder_step_ms", decoders, repeat * 4)):
        for exporter, value in _latencies(paths, encoder_length, sizes["d_model"], runs, metric).items():
            results[exporter][metric] = value
    print(f"\n{name} ({params:.1f}M parameters, {task})")
    for exporter in outputs:
        print(f"  {exporter} files: {', '.join(results[exporter]['files'])}")
    print_table(
        results,
        [
            ("seconds", "export wall time (s)"),
            ("peak_rss_mb", "export peak RSS (MB)"),
            ("size_mb", "ONNX size (MB)"),
            ("encoder_ms", "ORT encoder (ms)"),
            ("decoder_step_ms", f"ORT decoder step @{PAST} (ms)"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    print(f"encoder: {ENCODER_TOKENS} tokens (whisper: its fixed mel length); decoder step: batch 1, past {PAST}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or list(MODELS):
            bench(name, Path(scratch), args.repeat)


if __name__ == "__main__":
    main()
