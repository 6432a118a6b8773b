"""`legacy_shim.main_export` on types optimum-onnx supports: identical to calling optimum-onnx."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized

from legacy_shim import main_export
from legacy_shim.router import Exporter
from legacy_shim.routes import upstream_main_export
from shim_helpers import assert_same_export, save_causal_lm, save_encoder

WITH_PAST = "text-generation-with-past"
SUPPORTED = [
    ("gpt2", WITH_PAST, save_causal_lm),
    ("llama", WITH_PAST, save_causal_lm),
    ("bert", "feature-extraction", save_encoder),
]


class TestLegacyParity(unittest.TestCase):
    @parameterized.expand(SUPPORTED)
    def test_legacy_and_auto_match_optimum_onnx(self, model_type, task, save):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            model = save(model_type, scratch / "model")
            upstream_main_export()(str(model), scratch / "upstream", task=task)
            for exporter in ("legacy", "auto"):
                with self.subTest(exporter=exporter):
                    result = main_export(str(model), scratch / exporter, task=task, exporter=exporter)
                    self.assertEqual(result.route, Exporter.LEGACY)
                    self.assertIsNone(result.observer_result)
                    assert_same_export(self, scratch / "upstream", scratch / exporter)
