"""Helpers of the reliability suite: sizes, subprocess runs of its scripts, directory states."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: Sizes of the suite's tiny llama beside tiny_models' defaults.
TINY_LLAMA = dict(head_dim=16, num_hidden_layers=1)
#: The opset of the shared export: not the exporter's default, to show it is honoured.
SHARED_EXPORT_OPSET = 19
HERE = Path(__file__).parent


def run_script(script: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None):
    """One of this directory's helper scripts in a fresh interpreter of this environment."""
    return subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})},
    )


def leftovers(directory: Path) -> list[str]:
    """Hidden staging or aside directories an export keeps beside its output."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.name.startswith(".") and ("partial" in p.name or "previous" in p.name)
    )


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted at `mount_point` with `options` for the block, when this process may
    mount (root in CI); yields False when it may not, for the caller to simulate it instead."""
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)
