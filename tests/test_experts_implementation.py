"""optimum_observer.experts_implementation: pluggable experts found, switched and restored.

On transformers 4.57 no model has pluggable experts and every function is a no-op; on
transformers 5 a tiny mixtral (real shapes: grouped-query attention, explicit head_dim) has one
experts module per layer, run "batched_mm" inside the block.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
import transformers
from packaging.version import Version

from optimum_observer import experts_implementation as experts
from optimum_observer.patches import PATCHES
from tiny_models import save_causal_lm

TRANSFORMERS_5 = Version(transformers.__version__).major >= 5


class TestPluggableExperts(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as scratch:
            directory = save_causal_lm("mixtral", Path(scratch) / "mixtral", with_tokenizer=False)
            cls.model = transformers.AutoModelForCausalLM.from_pretrained(directory)

    def test_found_on_transformers_5_only(self):
        found = experts.pluggable_experts(self.model)
        self.assertEqual(len(found), self.model.config.num_hidden_layers if TRANSFORMERS_5 else 0)

    def test_the_dense_block_patch_is_superseded_on_transformers_5_only(self):
        names = [patch.name for patch in experts.superseded_patches(PATCHES, self.model)]
        self.assertEqual(names, ["dense_mixtral_moe"] if TRANSFORMERS_5 else [])

    def test_batched_inside_the_block_and_restored_after(self):
        before = self.model.get_experts_implementation() if TRANSFORMERS_5 else None
        with experts.batched_experts(self.model) as switched:
            self.assertEqual(switched, TRANSFORMERS_5)
            if TRANSFORMERS_5:
                self.assertEqual(set(self.model.get_experts_implementation().values()), {"batched_mm"})
        if TRANSFORMERS_5:
            self.assertEqual(self.model.get_experts_implementation(), before)

    def test_restored_when_the_block_raises(self):
        before = self.model.get_experts_implementation() if TRANSFORMERS_5 else None
        with self.assertRaises(RuntimeError), experts.batched_experts(self.model):
            raise RuntimeError("export failed")
        if TRANSFORMERS_5:
            self.assertEqual(self.model.get_experts_implementation(), before)

    def test_batched_gives_the_same_logits(self):
        ids = torch.tensor([[5, 9, 3, 17, 2, 11]])
        with torch.no_grad():
            expected = self.model(ids).logits
            with experts.batched_experts(self.model):
                actual = self.model(ids).logits
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
