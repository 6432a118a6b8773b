"""Signals during an export: SIGTERM cleans up, SIGKILL's leftovers are cleaned by the next
export into the same OUT, and the command line leaves no temporary directory (issue 13, item 4).

Kills inside the publishing step itself: test_publish.py."""

from __future__ import annotations

import pytest

from optimum_observer import Stage, packaging
from reliability_helpers import leftovers, run_script

SIGTERM_STATUS = 128 + 15


def test_cli_sigterm_during_capture_exits_143_and_leaves_no_temporary_directory(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = run_script(
        "stage_harness.py", "capture", "TERM", str(tmp_path / "out"), "--demo", env={"TMPDIR": str(temporary)}
    )
    assert done.returncode == SIGTERM_STATUS, done.stderr[-2000:]
    assert "interrupted by SIGTERM" in done.stderr
    assert "Traceback" not in done.stderr
    # Directories only: a library of the stack keeps a small session file in TMPDIR.
    assert [p.name for p in temporary.iterdir() if p.is_dir()] == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_sigterm_at_each_stage_leaves_nothing(tiny_llama, tmp_path, stage):
    done = run_script("stage_harness.py", stage, "TERM", str(tmp_path / "out"), str(tiny_llama))
    assert done.returncode == SIGTERM_STATUS, done.stderr[-2000:]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_sigkill_at_each_stage_is_cleaned_by_the_next_export(tiny_llama, tmp_path, stage):
    done = run_script("stage_harness.py", stage, "KILL", str(tmp_path / "out"), str(tiny_llama))
    assert done.returncode == -9
    assert not (tmp_path / "out").exists()
    packaging.check_destination(tmp_path / "out", "llama")  # what the next export does first
    assert leftovers(tmp_path) == []
