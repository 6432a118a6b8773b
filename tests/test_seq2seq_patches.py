"""Patches for encoder-decoder models: each failure happens without its patch."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from optimum_observer import capture, conversion, synthesis
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES
from optimum_observer.tasks import get_task
from stages import load
from tiny_families import save_seq2seq_lm

CONTRACT = get_task("text2text-generation-with-past")


def _export_error(model_type: str, without: str) -> ObserverExportError:
    """Exports every graph of the task in turn (as the pipeline does) without one patch."""
    assert any(p.name == without for p in PATCHES), without
    with tempfile.TemporaryDirectory() as scratch:
        loaded = load(save_seq2seq_lm(model_type, Path(scratch), with_tokenizer=False), CONTRACT)
    patches = [p for p in PATCHES if p.name != without]
    with registered_caches():
        for graph_capture in capture.capture(loaded.model, CONTRACT, model_type):
            example = synthesis.synthesize(graph_capture, model_type)
            try:
                conversion.convert(loaded.model, graph_capture.graph, example, model_type, patches=patches)
            except ObserverExportError as error:
                return error
    raise AssertionError(f"{model_type} exported without {without}")


class TestSwitchTransformersPatches(unittest.TestCase):
    def test_router_cast_patch(self):
        error = _export_error("switch_transformers", "switch_router_cast_if_needed")
        self.assertEqual(error.stage, Stage.EXPORT)
        self.assertIn("Couldn't swap", str(error.__cause__))

    def test_dense_experts_patch(self):
        error = _export_error("switch_transformers", "dense_switch_transformers_experts")
        self.assertEqual(error.stage, Stage.EXPORT)
        self.assertRegex(str(error.__cause__), "data-dependent|data dependent|GuardOnDataDependent")


class TestPegasusXPatches(unittest.TestCase):
    def test_decoder_mask_patch(self):
        error = _export_error("pegasus_x", "pegasus_x_decoder_mask_while_exporting")
        self.assertEqual(error.stage, Stage.EXPORT)
        # The causal mask, one position longer than the keys, broadcasts the attention weights.
        self.assertRegex(str(error.__cause__), "Expected size for first two dimensions|must match the size")


class TestFsmtPatches(unittest.TestCase):
    def test_decoder_config_patch(self):
        error = _export_error("fsmt", "fsmt_decoder_config")
        self.assertEqual(error.stage, Stage.EXPORT)
        self.assertIn("has no attribute 'config'", str(error.__cause__))
