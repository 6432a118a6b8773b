"""Greedy generation for models without generate(): the loop gives generate's tokens, and the
decoder family's default run drives such a model through it."""

from __future__ import annotations

import unittest

import torch

from legacy_shim.tooling import tiny_configs
from optimum_observer import greedy
from optimum_observer.families import family_of
from optimum_observer.reference_inputs import generation_inputs
from optimum_observer.tasks import get_task

CONTRACT = get_task("text-generation-with-past")


class TestGreedyLoop(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_configs.build_tiny_model("llama", CONTRACT.auto_model_class).eval()

    def test_it_gives_the_tokens_of_generate_with_and_without_cache(self):
        for use_cache in (True, False):
            for batch in generation_inputs(self.model, None):
                settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=use_cache)
                with torch.no_grad():
                    expected = self.model.generate(**batch, **settings)
                got = greedy.greedy_loop(self.model, batch, **settings)
                self.assertTrue(torch.equal(got, expected), (use_cache, got.tolist(), expected.tolist()))

    def test_without_prepare_inputs_it_feeds_the_runtimes_inputs(self):
        """A model with neither generate nor prepare_inputs_for_generation gets the new token, the
        mask, the runtime's position_ids and its cache: generate's tokens for llama."""
        batch = generation_inputs(self.model, None)[0]
        settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        self.model.prepare_inputs_for_generation = None
        try:
            got = greedy.greedy_loop(self.model, batch, **settings)
        finally:
            del self.model.prepare_inputs_for_generation
        self.assertTrue(torch.equal(got, expected), (got.tolist(), expected.tolist()))

    def test_it_pads_a_row_after_its_end_of_sequence_token(self):
        batch = generation_inputs(self.model, None)[0]
        first = greedy.greedy_loop(self.model, batch, max_new_tokens=1)[:, -1]
        saved, self.model.generation_config.eos_token_id = self.model.generation_config.eos_token_id, int(first[0])
        try:
            got = greedy.greedy_loop(self.model, batch, max_new_tokens=4, pad_token_id=0)
            with torch.no_grad():
                expected = self.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        finally:
            self.model.generation_config.eos_token_id = saved
        self.assertTrue(torch.equal(got, expected), (got.tolist(), expected.tolist()))
        self.assertEqual(got[0, -3:].tolist(), [0, 0, 0])


class TestEncoderDecoderWithoutGenerate(unittest.TestCase):
    def test_the_loop_refuses_it_by_name(self):
        model = tiny_configs.build_tiny_model("xlm-prophetnet", "AutoModelForSeq2SeqLM").eval()
        batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        with self.assertRaisesRegex(NotImplementedError, "XLMProphetNetForConditionalGeneration has no generate"):
            greedy.generate(model, batch, max_new_tokens=2)


class TestDefaultRunWithoutGenerate(unittest.TestCase):
    def test_the_decoder_default_run_loops_over_forward_with_its_cache(self):
        model = tiny_configs.build_tiny_model("open-llama", CONTRACT.auto_model_class).eval()
        self.assertFalse(greedy.has_generate(model))
        calls = []
        handle = model.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(
                (tuple(kwargs["input_ids"].shape), type(kwargs.get("past_key_values")).__name__)
            ),
            with_kwargs=True,
        )
        try:
            results = family_of(CONTRACT).default_run(model, CONTRACT)(model)
        finally:
            handle.remove()
        self.assertEqual([tuple(r.shape) for r in results], [(2, 9), (3, 11)])
        # Per batch: the prompt without a cache, then each new token with the cache forward
        # returned (tuples, fed back as the DynamicCache open-llama's forward reads).
        cached = [(2, 1), "DynamicCache"], [(3, 1), "DynamicCache"]
        self.assertEqual(
            [list(c) for c in calls],
            [[(2, 6), "NoneType"], *[cached[0]] * 2, [(3, 8), "NoneType"], *[cached[1]] * 2],
        )

    def test_a_legacy_cache_is_fed_back_as_a_dynamic_cache(self):
        from transformers import DynamicCache

        pairs = tuple((torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)) for _ in range(2))
        cache = greedy._as_cache(pairs)
        self.assertIsInstance(cache, DynamicCache)
        self.assertEqual(cache.get_seq_length(), 3)
        self.assertTrue(torch.equal(cache.layers[1].values, pairs[1][1]))
        dynamic = DynamicCache()
        self.assertIs(greedy._as_cache(dynamic), dynamic)


if __name__ == "__main__":
    unittest.main()
