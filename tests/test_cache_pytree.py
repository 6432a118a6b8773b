"""The scoped cache registration: layout, restoration, lazy cache classes, and the failure it fixes."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import transformers
import torch.utils._pytree as pytree
from transformers import DynamicCache
from packaging.version import Version
from transformers.integrations.executorch import register_dynamic_cache_export_support

from optimum_observer import cache_pytree
from optimum_observer.cache_pytree import is_registered, leaf_name, registered_cache_classes, registered_caches
from tiny_models import save_causal_lm


def _cache(num_layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(num_layers):
        cache.update(torch.full((1, 2, 3, 4), 10.0 * layer), torch.full((1, 2, 3, 4), 10.0 * layer + 1), layer)
    return cache


class TestRegisteredCaches(unittest.TestCase):
    def test_not_registered_outside_the_block(self):
        self.assertFalse(is_registered(DynamicCache))
        with registered_caches():
            self.assertTrue(is_registered(DynamicCache))
        self.assertFalse(is_registered(DynamicCache))

    def test_flattens_keys_and_values_interleaved_per_layer(self):
        with registered_caches():
            leaves, spec = pytree.tree_flatten(_cache())
            rebuilt = pytree.tree_unflatten(leaves, spec)
        self.assertEqual([leaf[0, 0, 0, 0].item() for leaf in leaves], [0.0, 1.0, 10.0, 11.0])
        self.assertEqual([leaf_name("past_key_values", i) for i in range(4)], [
            "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"
        ])
        self.assertTrue(torch.equal(rebuilt.layers[1].values, leaves[3]))

    def test_restored_when_the_block_raises(self):
        with self.assertRaises(ValueError):
            with registered_caches():
                raise ValueError("boom")
        self.assertFalse(is_registered(DynamicCache))

    def test_an_existing_registration_is_restored(self):
        register_dynamic_cache_export_support()
        try:
            with registered_caches():
                self.assertEqual(len(pytree.tree_flatten(_cache())[0]), 4)
            # transformers' own layout (all keys, then all values, under dict keys) is back.
            _, spec = pytree.tree_flatten(_cache())
            self.assertIn("key_cache", str(spec))
        finally:
            pytree._deregister_pytree_node(DynamicCache)
            torch.fx._pytree._deregister_pytree_flatten_spec(DynamicCache)

    def test_observer_fails_on_generate_without_the_registration(self):
        with tempfile.TemporaryDirectory() as scratch:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                save_causal_lm("llama", Path(scratch), with_tokenizer=False)
            )
        observer = torch.onnx.InputObserver()
        ids = torch.randint(3, 100, (1, 4))
        with self.assertRaisesRegex(AttributeError, "has no attribute 'clone'"):
            with observer(model):
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
        with registered_caches(), observer(model):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
        self.assertGreaterEqual(observer.num_obs(), 2)


#: Targets this transformers does not have: a module, and a class in a module that exists.
_MISSING = {
    "transformers.models.no_such_model.modeling_no_such_model:NoSuchCache": cache_pytree.STATE_CACHE,
    "transformers.cache_utils:NoSuchCache": cache_pytree.DYNAMIC_CACHE,
}


class TestLegacyKeyValueCache(unittest.TestCase):
    """The (key, value) tuples deprecated models return (open-llama, xlm-prophetnet) are named as
    the DynamicCache they stand for: pytree flattens both in the same order."""

    def test_named_per_layer_in_dynamic_cache_order(self):
        pairs = tuple((torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)) for _ in range(2))
        self.assertEqual(
            cache_pytree.cache_leaf_names("present", pairs),
            ["present.0.key", "present.0.value", "present.1.key", "present.1.value"],
        )
        with registered_caches():
            dynamic_leaves = pytree.tree_flatten(DynamicCache.from_legacy_cache(pairs))[0]
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(pytree.tree_flatten(pairs)[0], dynamic_leaves)))

    def test_other_tuples_are_not_taken_for_one(self):
        self.assertFalse(cache_pytree.is_legacy_key_value_cache(()))
        self.assertFalse(cache_pytree.is_legacy_key_value_cache(((torch.zeros(1),) * 4,)))


class TestLazyCacheClasses(unittest.TestCase):
    def test_a_missing_class_is_skipped_and_the_registration_restored(self):
        with mock.patch.dict(cache_pytree.CACHE_CODECS, _MISSING):
            with self.assertLogs(cache_pytree.logger, "DEBUG") as logs:
                with registered_caches():
                    self.assertTrue(is_registered(DynamicCache))
                    self.assertEqual(len(pytree.tree_flatten(_cache())[0]), 4)
            self.assertEqual(len(registered_cache_classes()), len(cache_pytree.CACHE_CODECS) - len(_MISSING))
        # The block tries only the missing target whose module is imported (cache_utils's).
        self.assertEqual(sum("NoSuchCache not registered" in line for line in logs.output), 1)
        self.assertEqual([c.__name__ for c in registered_cache_classes() if is_registered(c)], [])

    @unittest.skipIf(Version(transformers.__version__).major >= 5, "transformers 5 moved or removed state caches")
    def test_every_target_resolves_on_the_default_install(self):
        self.assertEqual(len(registered_cache_classes()), len(cache_pytree.CACHE_CODECS))

    def test_importing_the_module_imports_no_model_package(self):
        modules = {target.partition(":")[0] for target in cache_pytree.CACHE_CODECS}
        packages = sorted(m for m in modules if m.startswith("transformers.models."))
        code = (
            "import sys, optimum_observer.cache_pytree\n"
            f"print([m for m in {packages!r} if m in sys.modules])"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout.strip(), "[]")

    def test_the_block_imports_no_model_package_and_registers_the_caches_of_imported_ones(self):
        # A cache object exists only once its class's module is imported, so the block resolves
        # those targets only: entering it for a llama export used to import every state-space
        # package the codec table names (~15).
        modules = {target.partition(":")[0] for target in cache_pytree.CACHE_CODECS}
        packages = sorted(m for m in modules if m.startswith("transformers.models."))
        code = (
            "import sys, transformers.models.llama.modeling_llama, transformers.models.mamba.modeling_mamba\n"
            "from optimum_observer.cache_pytree import is_registered, registered_caches\n"
            "from transformers.models.mamba.modeling_mamba import MambaCache\n"
            "with registered_caches():\n"
            "    print(is_registered(MambaCache))\n"
            f"print([m for m in {packages!r} if m in sys.modules])"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout.split("\n")[:2], ["True", "['transformers.models.mamba.modeling_mamba']"])
