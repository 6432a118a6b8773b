"""Packaging: external data for large weights, and publishing into the output directory."""

from __future__ import annotations

import tempfile
import unittest
from unittest import mock
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from optimum_observer import packaging


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.linear(x)


def _program() -> torch.onnx.ONNXProgram:
    torch.manual_seed(0)
    return torch.onnx.export(Affine().eval(), (torch.randn(2, 64),), dynamo=True, verbose=False)


class TestWriteModel(unittest.TestCase):
    def test_weights_past_the_threshold_go_to_model_onnx_data(self):
        program = _program()
        with tempfile.TemporaryDirectory() as scratch:
            with mock.patch.object(packaging, "EXTERNAL_DATA_THRESHOLD_BYTES", 1):
                files = packaging.write_model(program, Path(scratch))
            self.assertEqual(files, ["model.onnx", "model.onnx_data"])
            self.assertGreaterEqual((Path(scratch) / "model.onnx_data").stat().st_size, 64 * 32 * 4)
            session = ort.InferenceSession(str(Path(scratch) / "model.onnx"))
            x = np.ones((2, 64), dtype=np.float32)
            expected = program(torch.from_numpy(x))[0].numpy()
            np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected, atol=1e-6)

    def test_small_weights_stay_inside_model_onnx(self):
        with tempfile.TemporaryDirectory() as scratch:
            self.assertEqual(packaging.write_model(_program(), Path(scratch)), ["model.onnx"])
            self.assertFalse((Path(scratch) / "model.onnx_data").exists())


class TestStagedOutput(unittest.TestCase):
    def test_a_new_directory_appears_only_when_the_block_succeeds(self):
        with tempfile.TemporaryDirectory() as scratch:
            destination = Path(scratch) / "out"
            with self.assertRaises(RuntimeError):
                with packaging.staged_output(destination) as staging:
                    (staging / "model.onnx").write_text("half")
                    raise RuntimeError("validation failed")
            self.assertEqual(list(Path(scratch).iterdir()), [])
            with packaging.staged_output(destination) as staging:
                (staging / "model.onnx").write_text("whole")
            self.assertEqual((destination / "model.onnx").read_text(), "whole")

    def test_an_existing_directory_keeps_its_other_files(self):
        with tempfile.TemporaryDirectory() as scratch:
            destination = Path(scratch) / "out"
            destination.mkdir()
            (destination / "README.md").write_text("mine")
            (destination / "model.onnx").write_text("old")
            with packaging.staged_output(destination) as staging:
                (staging / "model.onnx").write_text("new")
                (staging / "config.json").write_text("{}")
            self.assertEqual(sorted(p.name for p in destination.iterdir()), ["README.md", "config.json", "model.onnx"])
            self.assertEqual((destination / "model.onnx").read_text(), "new")
            self.assertEqual([p.name for p in Path(scratch).iterdir()], ["out"])
