"""What the benchmark scripts share: exports in subprocesses, paired ONNX Runtime latency, the table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

EXPORTERS = ("legacy", "observer")

#: Code for a child process: its own peak RSS in MB as `peak_rss_mb`. VmHWM of /proc/self/status,
#: not `ru_maxrss`: Linux carries the forked memory's high-water mark over exec, so a child's
#: ru_maxrss starts at its parent's RSS (a child using 11 MB reported 412 MB).
PEAK_RSS_CODE = """
with open("/proc/self/status") as status:
    peak_rss_mb = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
"""

_EXPORT_SCRIPT = """
import json, sys, time
exporter, source, output, task, validate = sys.argv[1:6]
validate = validate == "validate"
start = time.perf_counter()
if exporter == "legacy":
    from optimum.exporters.onnx import main_export
    main_export(source, output, task=task, library_name="transformers", do_validation=validate)
else:
    import optimum_observer
    optimum_observer.export(source, output, task=task, validate=validate)
seconds = time.perf_counter() - start
""" + PEAK_RSS_CODE + """
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb}))
"""


def export_in_subprocess(
    exporter: str, source: Path, output: Path, task: str, validate: bool = False
) -> dict[str, float]:
    """Exports in a fresh process, which reports its own wall time and peak RSS; `validate`: each
    exporter's own validation (optimum-onnx's `do_validation`, the observer's `validate`) runs
    and is timed with the export."""
    # The legacy figure is optimum-onnx alone: legacy_shim's import hook stays out of it.
    env = {**os.environ, "OPTIMUM_OBSERVER_DISABLE": "1"} if exporter == "legacy" else None
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT_SCRIPT, exporter, str(source), str(output), task,
         "validate" if validate else "no-validate"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{exporter} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def onnx_size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.onnx*")) / 1e6


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cache_layout(session: ort.InferenceSession, input_name: str) -> tuple[int, int]:
    """(heads, head size) of a `past_key_values.*` input, read from its `present.*` output: an
    observer export leaves those input axes symbolic (optimum_observer.portable_cache)."""
    present = {o.name: o.shape for o in session.get_outputs()}["present" + input_name[len("past_key_values"):]]
    return present[1], present[3]


def paired_latency_ms(
    paths: dict[str, Path], feeds_for: Callable[[ort.InferenceSession], dict[str, np.ndarray]], repeat: int
) -> dict[str, float]:
    """Median latency per file; the runs alternate between the files so that a change in the
    machine's load during the measurement falls on all of them alike."""
    sessions = {name: session(path) for name, path in paths.items()}
    feeds = {name: feeds_for(s) for name, s in sessions.items()}
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        s.run(None, feeds[name])
    for _ in range(repeat):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            timings[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in timings.items()}


def print_table(results: dict[str, dict[str, float]], metrics: list[tuple[str, str]]) -> None:
    print(f"{'metric':<26} {'legacy':>10} {'observer':>10} {'observer/legacy':>16}")
    for metric, label in metrics:
        legacy, observer = results["legacy"][metric], results["observer"][metric]
        print(f"{label:<26} {legacy:>10.2f} {observer:>10.2f} {observer / legacy:>16.2f}")
