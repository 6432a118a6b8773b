"""Patches for encoder-decoder models: each failure happens without its patch."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import pytest

from optimum_observer.errors import Stage
from optimum_observer.tasks import get_task
from stages import conversion_error, load, observe
from tiny_families import save_seq2seq_lm

CONTRACT = get_task("text2text-generation-with-past")


class Seq2SeqPatchCase(unittest.TestCase):
    """One observed generate run of the class's tiny model serves every conversion of its tests;
    each converts the graphs in turn (as the pipeline does) without one patch."""

    model_type: str

    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as scratch:
            loaded = load(save_seq2seq_lm(cls.model_type, Path(scratch), with_tokenizer=False), CONTRACT)
        cls.observed = observe(loaded, CONTRACT)


class TestSwitchTransformersPatches(Seq2SeqPatchCase):
    model_type = "switch_transformers"

    def test_router_cast_patch(self):
        error = conversion_error(self.observed, "switch_router_cast_if_needed")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("Couldn't swap", str(error.__cause__))

    def test_dense_experts_patch(self):
        error = conversion_error(self.observed, "dense_switch_transformers_experts")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertRegex(str(error.__cause__), "data-dependent|data dependent|GuardOnDataDependent")


class TestPegasusXPatches(Seq2SeqPatchCase):
    model_type = "pegasus_x"

    def test_decoder_mask_patch(self):
        error = conversion_error(self.observed, "pegasus_x_decoder_mask_while_exporting")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        # The causal mask, one position longer than the keys, broadcasts the attention weights.
        self.assertRegex(str(error.__cause__), "Expected size for first two dimensions|must match the size")


@pytest.mark.slow  # the mechanism's default-suite case is TestPegasusXPatches
class TestBigBirdPegasusPatches(Seq2SeqPatchCase):
    model_type = "bigbird_pegasus"

    def test_decoder_mask_patch(self):
        error = conversion_error(self.observed, "bigbird_pegasus_decoder_mask_while_exporting")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("must match the size of tensor b", str(error.__cause__))


class TestFsmtPatches(Seq2SeqPatchCase):
    model_type = "fsmt"

    def test_decoder_config_patch(self):
        error = conversion_error(self.observed, "fsmt_decoder_config")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("has no attribute 'config'", str(error.__cause__))
