"""Arguments and output paths are checked before any work, with a remedy true for the case
(issue 13, items 5, 6, 8, 11)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from unittest import mock

import pytest

import optimum_observer
import optimum_observer.packaging
from optimum_observer import ObserverExportError, Stage
from reliability_helpers import leftovers, tmpfs

#: An export that reaches the model at all takes seconds; a check before any work, far less.
BEFORE_ANY_WORK_SECONDS = 1.0


@pytest.fixture
def scratch(tmp_path) -> Path:
    return tmp_path


def _export_error(model, output, **kwargs) -> tuple[ObserverExportError, float]:
    start = time.perf_counter()
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(model, output, **kwargs)
    return caught.value, time.perf_counter() - start


def test_output_that_is_an_existing_file_fails_before_any_work(tiny_llama, scratch):
    output = scratch / "out"
    output.write_text("not a directory")
    error, seconds = _export_error(tiny_llama, output, validate=False)
    assert (error.model_type, error.stage) == (str(tiny_llama), Stage.PACKAGING)
    assert "is an existing file" in str(error) and "pass a directory path" in error.remedy
    assert seconds < BEFORE_ANY_WORK_SECONDS
    assert output.read_text() == "not a directory"


def test_user_directory_named_like_an_output_file_fails_before_any_work_and_is_kept(tiny_llama, scratch):
    output = scratch / "out"
    (output / "config.json").mkdir(parents=True)
    (output / "config.json" / "notes.txt").write_text("mine")
    error, seconds = _export_error(tiny_llama, output, validate=False)
    assert error.stage is Stage.PACKAGING and "is a directory" in str(error)
    assert seconds < BEFORE_ANY_WORK_SECONDS
    assert (output / "config.json" / "notes.txt").read_text() == "mine"


@pytest.fixture
def read_only_directory(scratch):
    """A read-only filesystem (a tmpfs mounted read-only when this process may mount, as root
    in CI), else a directory whose mkdir fails with EROFS as a read-only mount's does."""
    mount_point = scratch / "ro"
    mount_point.mkdir()
    with tmpfs(mount_point, "ro,size=64k") as mounted:
        if mounted:
            yield mount_point
            return
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == mount_point:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    with mock.patch("os.mkdir", mkdir):
        yield mount_point


def test_read_only_parent_fails_before_any_work_naming_the_remedy(tiny_llama, read_only_directory):
    error, seconds = _export_error(tiny_llama, read_only_directory / "out", validate=False)
    assert error.stage is Stage.PACKAGING
    assert "Read-only file system" in str(error)
    assert "directory you can write to" in error.remedy
    assert seconds < BEFORE_ANY_WORK_SECONDS


@pytest.mark.parametrize("opset", [9, 17, 24, 999])
def test_opset_outside_what_the_exporter_produces_is_refused_before_any_work(tiny_llama, scratch, opset):
    error, seconds = _export_error(tiny_llama, scratch / "out", opset=opset, validate=False)
    assert error.stage is Stage.ONNX_CONVERSION
    assert f"opset {opset} is outside" in str(error) and "18 to 23" in str(error)
    assert seconds < BEFORE_ANY_WORK_SECONDS
    assert not (scratch / "out").exists()


def test_requested_opset_is_the_opset_of_the_file(llama_export):
    import onnx

    from reliability_helpers import SHARED_EXPORT_OPSET

    model = onnx.load(str(llama_export / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == SHARED_EXPORT_OPSET


def test_cli_opset_999_exits_1_with_one_message(scratch):
    done = subprocess.run(
        [sys.executable, "-m", "optimum_observer", "export", "--demo", str(scratch / "out"), "--opset=999"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "opset 999 is outside" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (scratch / "out").exists()
    assert leftovers(scratch) == []


def _checkpoint_copy(tiny_llama: Path, scratch: Path, name: str) -> Path:
    copy = scratch / name
    shutil.copytree(tiny_llama, copy)
    return copy


def test_unknown_model_type_says_transformers_does_not_know_it(tiny_llama, scratch):
    source = _checkpoint_copy(tiny_llama, scratch, "unknown")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    error, _ = _export_error(source, scratch / "out", validate=False)
    assert error.stage is Stage.LOAD
    assert "does not know model_type 'no_such_type'" in error.remedy
    assert "upgrade transformers" in error.remedy
    assert "holding config.json" not in error.remedy


def test_missing_weights_say_the_weights_file_is_missing(tiny_llama, scratch):
    source = _checkpoint_copy(tiny_llama, scratch, "no-weights")
    for weights in source.glob("*.safetensors"):
        weights.unlink()
    error, _ = _export_error(source, scratch / "out", validate=False)
    assert (error.model_type, error.stage) == ("llama", Stage.LOAD)
    assert "weights file is missing" in error.remedy
    assert "trust_remote_code" not in error.remedy


class TestWriteErrors(unittest.TestCase):
    def test_an_oserror_while_writing_names_stage_and_a_remedy_for_that_errno(self):
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / "out"
            with self.assertRaises(ObserverExportError) as caught:
                with optimum_observer.packaging.staged_output(output, "llama") as staging:
                    with optimum_observer.packaging.writing("llama", output):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "model.onnx"))
            self.assertEqual(caught.exception.stage, Stage.PACKAGING)
            self.assertIn("No space left on device", str(caught.exception))
            self.assertIn("free space", caught.exception.remedy)
            self.assertEqual(list(Path(scratch).iterdir()), [])

