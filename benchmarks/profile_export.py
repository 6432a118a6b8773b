"""Where an observer export's time goes, phase by phase inside `torch.onnx.export`.

Wraps torch's and onnxscript's functions of each phase with timers (wall and CPU seconds: on a
shared machine the CPU time of this process is the steadier figure) and counts Python's garbage
collections, then runs `optimum_observer.export` once (validation off unless `--validate`):

- torch.export (`torch.export.export`, the exporter's capture strategy),
- the decompositions (`ExportedProgram.run_decompositions`: AOT autograd's metadata pass, then its
  trace to the ATen opset),
- torch.onnx's type-promotion pass, the translation to ONNX, onnxscript's optimisation,

and, within them, torch.export's grad-mode / autocast higher-order-op passes and onnxscript's
rewrite passes.

`--layers N` exports a random SmolLM2-135M-shaped llama (the checkpoint's config with N layers:
GQA 9 / 3 heads, head_dim 64, tied embeddings) instead of the checkpoint, for the scaling check
(a phase linear in N costs per layer; superlinear growth is a hotspot). `--cprofile FILE` also
writes a cProfile of `torch.onnx.export` (read it with `pstats`).

    OMP_NUM_THREADS=1 python benchmarks/profile_export.py                # SmolLM2-135M-Instruct
    OMP_NUM_THREADS=1 python benchmarks/profile_export.py --layers 8
    OMP_NUM_THREADS=1 python benchmarks/profile_export.py --cprofile export.prof
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import gc
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

import optimum_observer
from optimum_observer import conversion

#: (owner, attribute, label) of the functions timed, in the order they run.
PHASES: list[tuple[str, str, str]] = [
    ("torch.onnx", "export", "torch.onnx.export"),
    ("torch.export", "export", "  torch.export"),
    ("torch._export.passes.replace_set_grad_with_hop_pass", "replace_set_grad_with_hop_pass",
     "    grad / autocast op passes"),
    ("torch._export.passes.replace_autocast_with_hop_pass", "replace_autocast_with_hop_pass",
     "    grad / autocast op passes"),
    ("torch.export:ExportedProgram", "run_decompositions", "  run_decompositions"),
    ("torch.onnx._internal.exporter._fx_passes", "insert_type_promotion_nodes", "  type promotion"),
    ("torch.onnx._internal.exporter._core", "_exported_program_to_onnx_program", "  translation"),
    ("torch.onnx._internal.exporter._onnx_program:ONNXProgram", "optimize", "  onnxscript optimisation"),
    ("onnxscript.rewriter:RewritePass", "call", "    rewrite passes"),
]


def _owner(path: str) -> Any:
    module, _, attribute = path.partition(":")
    owner = __import__(module, fromlist=["_"])
    return getattr(owner, attribute) if attribute else owner


@contextlib.contextmanager
def timed_phases(wall: dict[str, float], cpu: dict[str, float]) -> Iterator[None]:
    """Times every call of the functions of :data:`PHASES`; restores them on exit."""
    saved = []
    try:
        for path, attribute, label in PHASES:
            owner = _owner(path)
            original = getattr(owner, attribute)
            saved.append((owner, attribute, original))

            def timer(original: Callable[..., Any] = original, label: str = label) -> Callable[..., Any]:
                @functools.wraps(original)
                def run(*args: Any, **kwargs: Any) -> Any:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        wall[label] += time.perf_counter() - start
                        cpu[label] += time.process_time() - start_cpu

                return run

            setattr(owner, attribute, timer())
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


@contextlib.contextmanager
def counted_collections(counts: collections.Counter) -> Iterator[None]:
    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            counts[info["generation"]] += 1

    gc.callbacks.append(count)
    try:
        yield
    finally:
        gc.callbacks.remove(count)


@contextlib.contextmanager
def profiled_conversion(path: str | None) -> Iterator[None]:
    """cProfile of `conversion.convert` (the `torch.onnx.export` call) into `path`."""
    if path is None:
        yield
        return
    convert = conversion.convert

    def profiled(*args: Any, **kwargs: Any) -> Any:
        profile = cProfile.Profile()
        try:
            return profile.runcall(convert, *args, **kwargs)
        finally:
            profile.dump_stats(path)

    conversion.convert = profiled
    try:
        yield
    finally:
        conversion.convert = convert


def write_source(scratch: Path, layers: int | None) -> Path:
    from bench_inference import load_smollm2

    source = scratch / "smollm2"
    model, tokenizer = load_smollm2(source)
    if layers is None:
        return source
    config = model.config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    shaped = scratch / f"smollm2-shaped-{layers}-layers"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(shaped)
    tokenizer.save_pretrained(shaped)
    return shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="a random SmolLM2-shaped llama with this many layers")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--cprofile", help="write a cProfile of torch.onnx.export to this file")
    args = parser.parse_args()
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    collections_started: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as scratch:
        source = write_source(Path(scratch), args.layers)
        measured = contextlib.ExitStack()
        measured.enter_context(timed_phases(wall, cpu))
        measured.enter_context(counted_collections(collections_started))
        measured.enter_context(profiled_conversion(args.cprofile))
        with measured:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = optimum_observer.export(source, Path(scratch) / "onnx", validate=args.validate)
            total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {result.model_type}, "
          f"{args.layers or 'checkpoint'} layers; patches {', '.join(result.patches)}")
    print(f"{'export':28s} wall {total:8.2f} s  cpu {total_cpu:8.2f} s")
    for name, seconds in result.timings.items():
        print(f"  stage {name:30s} wall {seconds:8.2f} s")
    for label in dict.fromkeys(label for _, _, label in PHASES):
        print(f"{label:28s} wall {wall[label]:8.2f} s  cpu {cpu[label]:8.2f} s")
    print(f"garbage collections by generation: {dict(sorted(collections_started.items()))}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
