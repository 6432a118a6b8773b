"""The scoped DynamicCache registration: layout, restoration, and the failure it fixes."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
import transformers
import torch.utils._pytree as pytree
from transformers import DynamicCache
from transformers.integrations.executorch import register_dynamic_cache_export_support

from optimum_observer.cache_pytree import is_registered, leaf_name, registered_caches
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
