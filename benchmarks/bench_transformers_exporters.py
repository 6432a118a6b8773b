"""optimum_observer vs transformers' own `transformers.exporters` (ONNX) on transformers 5.x, in one run.

For each tiny real-shaped causal LM (`tiny_configs.build_tiny_model(type, "AutoModelForCausalLM")`,
saved once and loaded from that folder by both exporters):

- (a) observer: `optimum_observer.export(folder, out, task="text-generation-with-past",
  runtime_class=legacy_shim.ORTModelForCausalLM)`, its validation included (replay of every observed
  call and a greedy generation check);
- (b) transformers: `OnnxExporter().export_for_generation(model, generate_kwargs, OnnxConfig(dynamic=True))`
  then `save_pretrained(out)`, as its docstrings show (prefill.onnx + decode.onnx, export.json);

each in its own subprocess, which reports its wall time (model load included, from the same saved folder)
and its peak RSS (`VmHWM` of /proc/self/status; `ru_maxrss` would include the parent's RSS at fork). The two
run one after the other, their order alternating per type.

Greedy parity, 8 new tokens (`min_new_tokens=8`, so no row stops early) against torch's `generate` on the
same model: a batch of 2 left-padded prompts of lengths 4 and 7, and the longer prompt alone (batch 1).
The observer's files run through `legacy_shim.ORTModelForCausalLM.generate`; transformers' files through
`ExportedModel.from_pretrained(out).runners` (its ONNX Runtime runner), driven by torch's own `generate`:
the model's `forward` is replaced by one that calls the prefill runner on an empty cache and the decode runner
otherwise, with the kwargs the runner was traced with (what `ExportedModel.__call__` does for one graph;
transformers ships no generate loop for an export). `generate` may drop an all-ones attention mask (batch 1) and
the position ids the graphs take: the harness rebuilds them as `generate` computes them from the mask, as
`legacy_shim.ORTModelForCausalLM` does for the observer's files.

Prints one Markdown table and writes a JSON file with everything measured.

    OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 10 /work/venv5/bin/python benchmarks/bench_transformers_exporters.py
    ... --only llama qwen3 --json /tmp/x.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
import transformers

from measure import PEAK_RSS_CODE

TASK = "text-generation-with-past"
NEW_TOKENS = 8
MODEL_TYPES = [
    "llama",  # grouped-query attention
    "qwen2",
    "qwen3",
    "mistral",
    "starcoder2",
    "gemma2",  # sliding window
    "gemma3_text",  # sliding window
    "gemma3_text:sliding_window=4",  # a window shorter than the prompts, so generation slides it
    "phi3",
    "gpt2",
    "mixtral",  # mixture of experts
    "qwen2_moe",  # mixture of experts, shared expert
    "deepseek_v3",  # multi-head latent attention, MoE
    "falcon_h1",  # hybrid state-space
    "mamba",  # state-space
]

_EXPORT_SCRIPT = """
import json, sys, time
exporter, source, output, task = sys.argv[1:5]
result = {}
try:
    start = time.perf_counter()
    if exporter == "observer":
        import legacy_shim, optimum_observer
        optimum_observer.export(source, output, task=task, runtime_class=legacy_shim.ORTModelForCausalLM)
    else:
        import torch, transformers
        from transformers.exporters import OnnxConfig, OnnxExporter
        model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        with open(sys.argv[5]) as f:
            sample = {name: torch.tensor(value) for name, value in json.load(f).items()}
        exported = OnnxExporter().export_for_generation(model, sample, OnnxConfig(dynamic=True))
        exported.save_pretrained(output)
    result = {"ok": True, "seconds": time.perf_counter() - start}
except Exception as error:
    chain = []
    while error is not None and len(chain) < 4:
        chain.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}")
        error = error.__cause__ or error.__context__
    result = {"ok": False, "error": chain[0], "cause": chain[-1] if len(chain) > 1 else None}
# This process's own peak (measure.PEAK_RSS_CODE): the parent holds the earlier types' sessions.
""" + PEAK_RSS_CODE + """
result["peak_rss_mb"] = peak_rss_mb
print("RESULT " + json.dumps(result))
"""


def export_in_subprocess(exporter: str, source: Path, output: Path, sample: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, exporter, str(source), str(output), TASK, str(sample)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:  # the process died (a crash in native code, say)
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"exit code {done.returncode}: {tail[:200]}", "cause": None}
    return json.loads(lines[-1][len("RESULT ") :])


def prompts(vocab_size: int, pad: int, seed: int, lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A left-padded batch of random token ids, one row per length (no pad id among the tokens)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(3, vocab_size, (length,), generator=generator)
        tokens[tokens == pad] = 3 if pad != 3 else 4
        input_ids[row, width - length :] = tokens
        attention_mask[row, width - length :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def through_runners(model: Any, exported: Any) -> Any:
    """`model` whose forward runs transformers' exported prefill/decode graphs through its runners."""
    prefill, decode = exported.runners["prefill"], exported.runners["decode"]
    original = model.forward
    state = {"cache": None, "seen": 0}  # the cache the last call returned, and the tokens it holds

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # Decode continues from the cache the previous call returned; anything else (generate's fresh cache) is a
        # prefill. (get_seq_length() cannot tell: the runner's gemma2 cache reports 0 after the prefill.)
        first = cache is None or cache is not state["cache"]
        runner = prefill if first else decode
        batch, length = kwargs["input_ids"].shape
        past = 0 if first else state["seen"]
        if kwargs.get("attention_mask") is None:
            # generate drops an all-ones mask; a hand-written loop passes it (legacy_shim rebuilds it too)
            kwargs["attention_mask"] = torch.ones(batch, past + length, dtype=torch.long)
        if kwargs.get("position_ids") is None:
            # generate leaves the positions to the model unless the batch is padded; the graphs take them
            positions = kwargs["attention_mask"].cumsum(-1) - 1
            kwargs["position_ids"] = positions.masked_fill(kwargs["attention_mask"] == 0, 1)[:, -length:]
        traced = runner.metadata.kwargs
        outputs = runner(**{name: value for name, value in kwargs.items() if name in traced})
        state["cache"] = getattr(outputs, "cache", None)
        if state["cache"] is None:
            state["cache"] = getattr(outputs, "past_key_values", None)
        state["seen"] = past + length
        return outputs

    model.forward = forward
    return model


def parity(reference: torch.Tensor, produced: torch.Tensor | str) -> str:
    if isinstance(produced, str):
        return produced
    return "yes" if torch.equal(reference, produced) else f"no ({int((reference != produced).sum())} tokens differ)"


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def check_parity(exporter: str, source: Path, output: Path, cases: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Greedy tokens of the exported files against torch's, per case ("batch2-padded", "batch1")."""
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    references = {name: greedy(model, inputs) for name, inputs in cases.items()}
    try:
        if exporter == "observer":
            import legacy_shim

            runtime = legacy_shim.ORTModelForCausalLM.from_pretrained(output)
        else:
            from transformers.exporters import ExportedModel

            runtime = through_runners(model, ExportedModel.from_pretrained(output))
    except Exception as error:
        return dict.fromkeys(cases, f"load failed: {first_line(error)}")
    results = {}
    for name, inputs in cases.items():
        try:
            produced: torch.Tensor | str = greedy(runtime, inputs)
        except Exception as error:
            produced = f"error: {first_line(error)}"
        results[name] = parity(references[name], produced)
    return results


def files_and_names(output: Path) -> dict[str, Any]:
    """Every file written (bytes) and, per ONNX graph, its input and output names."""
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir()) if p.is_file()}
    graphs = {}
    for path in sorted(output.glob("*.onnx")):
        proto = onnx.load(str(path), load_external_data=False)
        initializers = {i.name for i in proto.graph.initializer}
        graphs[path.name] = {
            "inputs": [i.name for i in proto.graph.input if i.name not in initializers],
            "outputs": [o.name for o in proto.graph.output],
        }
    return {"files": files, "graphs": graphs}


def summarize_names(names: list[str]) -> str:
    shown = [n for n in names if not any(c.isdigit() for c in n)][:3]
    cache = [n for n in names if any(c.isdigit() for c in n)]
    text = ", ".join(f"`{n}`" for n in shown)
    if cache:
        text += f" + {len(cache)} like `{cache[0]}`"
    return f"{len(names)}: {text}"


def parse_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """"type" or "type:key=value,...": config overrides given to build_tiny_model (integers only)."""
    model_type, _, rest = entry.partition(":")
    overrides = dict(item.split("=", 1) for item in rest.split(",") if item)
    return model_type, {key: int(value) for key, value in overrides.items()}


def run_type(model_type: str, root: Path, order: tuple[str, str]) -> dict[str, Any]:
    from legacy_shim.tooling.tiny_configs import build_tiny_model
    from optimum_observer.demo import build_tokenizer

    label, model_type, overrides = model_type, *parse_entry(model_type)
    source = root / "models" / label
    try:
        model = build_tiny_model(model_type, "AutoModelForCausalLM", **overrides)
    except Exception as error:
        return {"type": label, "build_error": first_line(error)}
    model.save_pretrained(source)
    build_tokenizer(source)  # the observer's default run tokenizes its prompts
    config = model.config.get_text_config()
    pad = model.generation_config.pad_token_id
    vocab = min(config.vocab_size, 200)  # the tokenizer's ids, for both exporters alike
    # What a user hands transformers' exporter: generate kwargs, a padded batch (not the parity prompts).
    capture = prompts(vocab, pad, seed=1, lengths=(3, 5))
    sample = root / f"{label}-sample.json"
    sample.write_text(json.dumps({k: v.tolist() for k, v in capture.items()}))
    batch = prompts(vocab, pad, seed=2, lengths=(4, 7))
    cases = {
        "batch2-padded": batch,
        "batch1": {k: v[1:] for k, v in batch.items()},
    }
    record: dict[str, Any] = {"type": label, "parameters": sum(p.numel() for p in model.parameters())}
    del model
    for exporter in order:
        output = root / exporter / label
        print(f"[{label}] {exporter} export ...", file=sys.stderr, flush=True)
        result = export_in_subprocess(exporter, source, output, sample)
        if result["ok"]:
            result.update(files_and_names(output))
            result["parity"] = check_parity(exporter, source, output, cases)
        record[exporter] = result
        print(f"[{label}] {exporter}: {json.dumps({k: result.get(k) for k in ('ok', 'seconds', 'error', 'parity')})}",
              file=sys.stderr, flush=True)  # fmt: skip
    return record


def table(records: list[dict[str, Any]]) -> str:
    header = (
        "| type | exporter | export | greedy parity, batch 2 padded / batch 1 | export s | peak RSS MB "
        "| files (MB) | graph inputs | graph outputs |"
    )
    lines = [header, "|" + "---|" * 9]
    for record in records:
        if "build_error" in record:
            lines.append(f"| {record['type']} | - | tiny model not built: {record['build_error']} |" + " |" * 6)
            continue
        for exporter in ("observer", "transformers"):
            r = record[exporter]
            if not r["ok"]:
                cause = f" (cause: {r['cause']})" if r.get("cause") and r["cause"] != r["error"] else ""
                error = re.sub(r"\x1b\[[0-9;]*m", "", r["error"] + cause).replace("|", "\\|")
                rss = f"{r['peak_rss_mb']:.0f}"
                lines.append(f"| {record['type']} | {exporter} | error: {error} | - | - | {rss} | - | - | - |")
                continue
            files = ", ".join(
                f"{name} {size / 1e6:.2f}" for name, size in r["files"].items() if ".onnx" in name
            )
            graphs = r["graphs"]
            inputs = "; ".join(f"{g}: {summarize_names(v['inputs'])}" for g, v in graphs.items())
            outputs = "; ".join(f"{g}: {summarize_names(v['outputs'])}" for g, v in graphs.items())
            par = " / ".join(r["parity"][case] for case in ("batch2-padded", "batch1"))
            lines.append(
                f"| {record['type']} | {exporter} | ok | {par} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {files} | {inputs} | {outputs} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types (default: all of MODEL_TYPES)")
    parser.add_argument("--json", default="bench_transformers_exporters.json", help="where to write the results")
    parser.add_argument("--render", metavar="JSON", help="print the table of an earlier run's JSON file and exit")
    args = parser.parse_args()
    if args.render:
        print_summary(json.loads(Path(args.render).read_text())["records"])
        return
    types = args.only or MODEL_TYPES
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        file=sys.stderr,
    )
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, model_type in enumerate(types):
            order = ("observer", "transformers") if index % 2 == 0 else ("transformers", "observer")
            records.append(run_type(model_type, Path(scratch), order))
            Path(args.json).write_text(json.dumps({"versions": versions(), "records": records}, indent=2) + "\n")
    print_summary(records)


def compact_table(records: list[dict[str, Any]]) -> str:
    """One row per type: each exporter's outcome, greedy parity (batch 2 padded / batch 1), seconds, peak RSS,
    ONNX bytes on disk."""
    lines = [
        "| type | observer parity | s | RSS MB | ONNX MB | transformers parity | s | RSS MB | ONNX MB |",
        "|" + "---|" * 9,
    ]
    for record in records:
        if "build_error" in record:
            continue
        row = [record["type"]]
        for exporter in ("observer", "transformers"):
            r = record[exporter]
            if r["ok"]:
                size = sum(size for name, size in r["files"].items() if ".onnx" in name) / 1e6
                parity = " / ".join(r["parity"][case].split(" (")[0][:70] for case in ("batch2-padded", "batch1"))
                row += [parity, f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{size:.2f}"]
            else:
                error = re.sub(r"\x1b\[[0-9;]*m", "", r.get("cause") or r["error"])
                row += ["error: " + error[:100].replace("|", "\\|"), "-", f"{r['peak_rss_mb']:.0f}", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def print_summary(records: list[dict[str, Any]]) -> None:
    print(compact_table(records))
    print()
    print(table(records))
    for exporter in ("observer", "transformers"):
        both = sum(
            1
            for r in records
            if r.get(exporter, {}).get("ok") and all(v == "yes" for v in r[exporter]["parity"].values())
        )
        print(f"\n{exporter}: {both} of {len(records)} types exported with greedy parity in both cases")


def versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
    }


if __name__ == "__main__":
    main()
