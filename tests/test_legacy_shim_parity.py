"""`legacy_shim.main_export` on types optimum-onnx supports: identical to calling optimum-onnx."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized

from legacy_shim import main_export
from legacy_shim.router import Exporter
from legacy_shim.routes import upstream_main_export
from shim_helpers import assert_same_export, save_encoder

WITH_PAST = "text-generation-with-past"


class TestLegacyParity(unittest.TestCase):
    def assertLegacyAndAutoMatch(self, model: Path, reference: Path, task: str, scratch: Path) -> None:
        for exporter in ("legacy", "auto"):
            with self.subTest(exporter=exporter):
                result = main_export(str(model), scratch / exporter, task=task, exporter=exporter)
                self.assertEqual(result.route, Exporter.LEGACY)
                self.assertIsNone(result.observer_result)
                assert_same_export(self, reference, scratch / exporter)

    @parameterized.expand([("gpt2",), ("llama",)])
    def test_causal_lm_legacy_and_auto_match_optimum_onnx(self, model_type):
        # optimum-onnx's own export of the same tiny model is the session's.
        with tempfile.TemporaryDirectory() as scratch:
            model, reference = self.artifacts.causal_lm(model_type), self.artifacts.legacy_export(model_type)
            self.assertLegacyAndAutoMatch(model, reference, WITH_PAST, Path(scratch))

    def test_encoder_legacy_and_auto_match_optimum_onnx(self):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            model = save_encoder("bert", scratch / "model")
            upstream_main_export()(str(model), scratch / "upstream", task="feature-extraction")
            self.assertLegacyAndAutoMatch(model, scratch / "upstream", "feature-extraction", scratch)
