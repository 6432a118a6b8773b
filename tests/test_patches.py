"""Each export patch: the failure it names happens without it, and it is always restored."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from transformers.cache_utils import DynamicLayer
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from optimum_observer import conversion
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES, applied
from stages import CONTRACT, capture_and_synthesize, load_tiny


def _without(name: str):
    assert any(p.name == name for p in PATCHES), name
    return [p for p in PATCHES if p.name != name]


def _export_error(model_type: str, patches) -> ObserverExportError:
    with tempfile.TemporaryDirectory() as scratch:
        loaded = load_tiny(model_type, Path(scratch), with_tokenizer=False)
    _, example = capture_and_synthesize(loaded)
    with registered_caches():
        try:
            conversion.convert(loaded.model, CONTRACT.graphs[0], example, model_type, patches=patches)
        except ObserverExportError as error:
            return error
    raise AssertionError(f"{model_type} exported without the patch")


class TestPatchesFixTheirFailure(unittest.TestCase):
    def test_lazy_initialization_patch(self):
        error = _export_error("llama", _without("dynamic_layer_lazy_initialization"))
        self.assertEqual(error.stage, Stage.EXPORT)
        self.assertIn("is not in the constants dictionary", str(error.__cause__))

    def test_dense_moe_patch(self):
        error = _export_error("mixtral", _without("dense_mixtral_moe"))
        self.assertEqual(error.stage, Stage.EXPORT)
        self.assertIn("data-dependent", str(error.__cause__))


class TestPatchesAreScoped(unittest.TestCase):
    def test_restored_after_the_block_and_after_an_exception(self):
        originals = {p.name: p.owner.__dict__.get(p.attribute) for p in PATCHES}
        with applied(PATCHES):
            self.assertIsNot(DynamicLayer.__dict__["lazy_initialization"], originals["dynamic_layer_lazy_initialization"])
            self.assertIsNot(MixtralSparseMoeBlock.__dict__["forward"], originals["dense_mixtral_moe"])
        with self.assertRaises(KeyError):
            with applied(PATCHES):
                raise KeyError("boom")
        self.assertEqual({p.name: p.owner.__dict__.get(p.attribute) for p in PATCHES}, originals)

    def test_every_patch_names_the_failure_it_fixes(self):
        for patch in PATCHES:
            self.assertTrue(patch.fixes.strip(), patch.name)
            self.assertTrue(callable(patch.owner.__dict__.get(patch.attribute)), patch.name)
