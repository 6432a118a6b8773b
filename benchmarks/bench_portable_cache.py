"""Does the portable cache input cost anything? The same observer export with and without it.

`optimum_observer.portable_cache` puts a `Reshape(past, [0, heads, 0, head_size])` in front of
every `past_key_values.*` input so that optimum-onnx's config-sized empty first-step cache is
accepted. This script exports the README's ~100M llama (grouped-query attention: 4 key/value
heads of 12) once with the observer, writes a second copy of the graph with that rewrite undone
(the inputs' static head axes back, the Reshape nodes gone), and measures both files in one
process with their runs alternating: one decode step after 128 cached tokens at batch 1 and 4,
and a prefill of 128 tokens. Prints medians and the portable / static ratio.

    python benchmarks/bench_portable_cache.py [--repeat 40] [--only tiny]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort
import torch
import transformers

from bench_export import MODELS, feeds
from measure import export_in_subprocess, paired_latency_ms
from optimum_observer.demo import build_tokenizer

CASES = (("decode batch 1 @128 (ms)", 1, 1, 128), ("decode batch 4 @128 (ms)", 4, 1, 128),
         ("prefill 128 (ms)", 1, 128, 0))


def undo_portable_cache(source: Path, target: Path) -> int:
    """Writes `source`'s graph without the portable-cache Reshapes; returns how many it removed."""
    model = ir.load(source)
    graph = model.graph
    removed = 0
    for value in graph.inputs:
        reshapes = [user for user, _ in value.uses() if user.op_type == "Reshape"]
        if not value.name.startswith("past_key_values.") or len(reshapes) != 1:
            continue
        reshape = reshapes[0]
        layout = reshape.inputs[1].producer()
        value.shape = reshape.outputs[0].shape
        reshape.outputs[0].replace_all_uses_with(value)
        graph.remove([reshape, layout], safe=True)
        removed += 1
    ir.save(model, target)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), default="llama-100M")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        source, output = Path(scratch) / "model", Path(scratch) / "observer"
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS[args.only]))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        model.save_pretrained(source)
        build_tokenizer(source)
        del model
        export_in_subprocess("observer", source, output, "text-generation-with-past")
        paths = {"portable": output / "model.onnx", "static": Path(scratch) / "static.onnx"}
        removed = undo_portable_cache(paths["portable"], paths["static"])
        print(f"\n{args.only} ({params:.1f}M parameters), {removed} cache inputs, {args.repeat} runs each")
        print(f"{'metric':<26} {'static':>10} {'portable':>10} {'portable/static':>16}")
        for label, batch, new, past in CASES:
            feeds_for = functools.partial(feeds, batch=batch, new=new, past=past)
            medians = paired_latency_ms(paths, feeds_for, args.repeat)
            static, portable = medians["static"], medians["portable"]
            print(f"{label:<26} {static:>10.2f} {portable:>10.2f} {portable / static:>16.2f}")


if __name__ == "__main__":
    main()
