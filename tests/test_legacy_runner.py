"""The sweep's legacy column: optimum-onnx's export checked the way optimum-onnx's users run it.

A legacy failure must be optimum-onnx's (its exporter or its runtime class), never the check's:
inputs the runtime class takes from its caller are fed (position_ids of
ORTModelForFeatureExtraction, the same values to torch), an input its class cannot take at all
is optimum-onnx's failure and says so, and an export whose check the torch model itself refuses
is "exported, not validated".
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path
from unittest import mock

import optimum.onnxruntime
import transformers

from legacy_shim.tooling import legacy_runner, tiny_configs
from legacy_shim.tooling.sweep import Status, SweepStage
from shim_helpers import graph_io

TASK = "feature-extraction"


class TestLegacyFeatureExtraction(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._scratch = tempfile.TemporaryDirectory()
        scratch = Path(cls._scratch.name)
        cls.model_dirs, cls.outputs, cls.results = {}, {}, {}
        for model_type in ("gpt2", "bart"):
            model_dir = tiny_configs.save_tiny_model(model_type, "AutoModel", scratch / model_type)
            cls.model_dirs[model_type], cls.outputs[model_type] = model_dir, scratch / f"{model_type}-onnx"
            cls.results[model_type] = legacy_runner.run_legacy_path(model_dir, TASK, cls.outputs[model_type])

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def test_position_ids_the_class_takes_from_its_caller_are_fed(self):
        inputs = [name for name, _ in graph_io(self.outputs["gpt2"] / "model.onnx")[0]]
        self.assertIn("position_ids", inputs)
        self.assertEqual(self.results["gpt2"].status, Status.PASS, self.results["gpt2"].error)

    def test_an_input_the_class_cannot_take_is_optimum_onnx_failure(self):
        bart = self.results["bart"]
        self.assertEqual((bart.status, bart.stage), (Status.FAIL, SweepStage.NUMERICAL_PARITY))
        self.assertTrue(bart.error.startswith("optimum-onnx's runtime (ORTModelForFeatureExtraction)"), bart.error)
        self.assertIn("decoder_input_ids", bart.error)

    def _validate_gpt2(self):
        torch_model = transformers.AutoModel.from_pretrained(self.model_dirs["gpt2"]).eval()
        return legacy_runner.validate_export(self.outputs["gpt2"], torch_model, TASK)

    def test_a_runtime_that_raises_is_named(self):
        failing = mock.patch.object(
            optimum.onnxruntime.ORTModelForFeatureExtraction, "forward", autospec=True, side_effect=RuntimeError("boom")
        )
        with failing:
            result = self._validate_gpt2()
        self.assertEqual(result.status, Status.FAIL)
        self.assertEqual(result.error, "optimum-onnx's runtime (ORTModelForFeatureExtraction): RuntimeError: boom")

    def test_inputs_torch_refuses_leave_the_export_unvalidated_not_failed(self):
        refusing = mock.patch.object(
            transformers.GPT2Model, "forward", autospec=True, side_effect=ValueError("You have to specify pixel_values")
        )
        with refusing:
            result = self._validate_gpt2()
        self.assertEqual(result.status, Status.UNVALIDATED)
        self.assertIn("the sweep's check, not optimum-onnx: ValueError: You have to specify", result.error)
