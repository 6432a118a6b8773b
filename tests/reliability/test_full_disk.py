"""A full disk while the export writes its files: an ObserverExportError naming the model type,
the stage and a remedy, and nothing left on the disk (issue 13, item 5)."""

from __future__ import annotations

import errno
import os
from unittest import mock

import pytest

import optimum_observer
from optimum_observer import ObserverExportError, Stage, packaging
from reliability_helpers import tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A 128 kB tmpfs when this process may mount (root in CI), else a directory where writing
    the ONNX file fails with ENOSPC as on a full disk."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    with tmpfs(mount_point, "size=128k") as mounted:
        if mounted:
            yield mount_point
            return

    def full(program, directory, file_name=packaging.ONNX_FILE):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / file_name))

    with mock.patch.object(packaging, "write_model", full):
        yield mount_point


def test_a_full_disk_while_writing_fails_at_packaging_and_leaves_nothing(tiny_llama, small_disk):
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(tiny_llama, small_disk / "out", validate=False)
    error = caught.value
    assert (error.model_type, error.stage) == ("llama", Stage.PACKAGING)
    assert "No space left on device" in str(error)
    assert "free space" in error.remedy
    assert list(small_disk.iterdir()) == []
