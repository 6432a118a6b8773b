"""Does the portable cache input cost anything? The same observer export with and without it.

`optimum_observer.portable_cache` puts a `Reshape(past, [0, heads, 0, head_size])` in front of
every `past_key_values.*` input so that optimum-onnx's config-sized empty first-step cache is
accepted. This script exports the README's ~100M llama (grouped-query attention: 4 key/value
heads of 12) once with the observer, writes a second copy of the graph with that rewrite undone
(the inputs' static head axes back, the Reshape nodes gone), and measures both files in one
process with their runs alternating: one decode step after 128 cached tokens at batch 1 and 4,
and a prefill of 128 tokens. Prints medians and the portable / static ratio.

`--only mamba2-100M` measures the state caches instead (`portable_cache.carry_states_as_values`:
every state fed through a value slot, `Reshape`, `Pad`, `Reshape` in front, its output reshaped
to 4-D): a Mamba2 of ~100M parameters exported once, a copy with those nodes removed and the
states at their own shapes, one decode step at batch 1 and 4 (a state model's step costs the
same after any number of tokens).

    python benchmarks/bench_portable_cache.py [--repeat 40] [--only tiny|llama-100M|mamba2-100M]

2026-12-04, 2 cores shared with other jobs (load average ~9), `--only mamba2-100M --repeat 40`
(79.3M parameters: 8 layers, hidden 768, 24 heads of 64, state 128; 16 state inputs), decode
step static / portable: first run 116.71 / 114.55 ms at batch 1 (0.98x), 241.71 / 291.76 ms at
batch 4 (1.21x); second run 120.16 / 128.95 ms (1.07x), 239.60 / 243.63 ms (1.02x). The runs
disagree by more than the effect: not measurable under that load (README, "Real checkpoint
shapes", the cost paragraphs).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import torch
import transformers

from bench_export import MODELS, feeds
from measure import export_in_subprocess, paired_latency_ms
from optimum_observer import portable_cache
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


#: A Mamba2 of the 130M checkpoint's widths, 8 layers (~100M parameters with its embeddings).
STATE_MODELS = {
    "mamba2-100M": dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=8, state_size=128, num_heads=24,
        head_dim=64, expand=2, n_groups=1, conv_kernel=4, chunk_size=64,
    ),  # fmt: skip
}
STATE_CASES = (("decode batch 1 (ms)", 1), ("decode batch 4 (ms)", 4))


def undo_carried_states(source: Path, target: Path) -> int:
    """Writes `source`'s graph with its states at their own shapes under their own names
    (`past_key_values.0.conv_state`, no value slot, no Reshape/Pad/Reshape in front, no Reshape
    behind); returns how many inputs it changed."""
    model = ir.load(source)
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    removed = 0
    for position, value in enumerate(list(graph.inputs)):
        if not portable_cache.is_carried_state(value.name):
            continue
        original = value.name.replace(f".{portable_cache.STATE_SLOT}.", ".")
        state = values[f"{original}_state"]
        plain = ir.Value(name=original, type=value.type, shape=state.shape)
        state.replace_all_uses_with(plain)
        graph.inputs[position] = plain
        removed += 1
    for position, value in enumerate(list(graph.outputs)):
        if not portable_cache.is_carried_state(value.name):
            continue
        original = value.name.replace(f".{portable_cache.STATE_SLOT}.", ".")
        producer = value.producer()
        if producer.op_type == "Reshape" and producer.inputs[0].name == f"{original}_state":
            graph.outputs[position] = producer.inputs[0]
        graph.outputs[position].name = original
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.save(model, target)
    return removed


def state_feeds(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """One decode step: one new token per row, every state random at the layout the graph
    returns it in (the shape it is fed back at)."""
    outputs = {o.name: o.shape for o in session.get_outputs()}
    feeds = {}
    for value in session.get_inputs():
        if value.name == "input_ids":
            feeds[value.name] = np.random.randint(3, 200, (batch, 1), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, 1), dtype=np.int64)
        else:
            shape = outputs["present" + value.name[len("past_key_values") :]]
            feeds[value.name] = np.random.rand(batch, *shape[1:]).astype(np.float32)
    return feeds


def bench_states(name: str, scratch: Path, repeat: int) -> None:
    source, output = scratch / "model", scratch / "observer"
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**STATE_MODELS[name]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    model.save_pretrained(source)
    build_tokenizer(source)
    del model
    export_in_subprocess("observer", source, output, "text-generation-with-past")
    paths = {"portable": output / "model.onnx", "static": scratch / "static.onnx"}
    removed = undo_carried_states(paths["portable"], paths["static"])
    print(f"\n{name} ({params:.1f}M parameters), {removed} state inputs, {repeat} runs each")
    print(f"{'metric':<26} {'static':>10} {'portable':>10} {'portable/static':>16}")
    for label, batch in STATE_CASES:
        medians = paired_latency_ms(paths, functools.partial(state_feeds, batch=batch), repeat)
        static, portable = medians["static"], medians["portable"]
        print(f"{label:<26} {static:>10.2f} {portable:>10.2f} {portable / static:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted({*MODELS, *STATE_MODELS}), default="llama-100M")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}")
    if args.only in STATE_MODELS:
        with tempfile.TemporaryDirectory() as scratch:
            bench_states(args.only, Path(scratch), args.repeat)
        return
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
