"""Sends this process a signal as an export enters one stage.

Usage: stage_harness.py STAGE SIGNAL OUT MODEL   (the Python API on checkpoint MODEL)
       stage_harness.py STAGE SIGNAL OUT --demo  (the command line's --demo export)

STAGE is a `Stage` value ("load", "capture", ..., "validation"); SIGNAL "TERM" or "KILL". Exits
with what the export or the command line gave (or is killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from optimum_observer import Stage, cli, pipeline


def main() -> int:
    stage, signum, output, model = sys.argv[1], getattr(signal, f"SIG{sys.argv[2]}"), sys.argv[3], sys.argv[4]
    original = pipeline._Progress.stage

    @contextlib.contextmanager
    def stage_then_signal(self, *entered):
        # torch.export and the ONNX conversion are entered together (one exporter call).
        with original(self, *entered):
            if stage in [s.value for s in entered]:
                os.kill(os.getpid(), signum)
            yield

    pipeline._Progress.stage = stage_then_signal
    if model == "--demo":
        return cli.main(["export", "--demo", output])
    # The optional stage runs only when asked for.
    pipeline.export(model, output, optimize=stage == Stage.OPTIMIZATION.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
