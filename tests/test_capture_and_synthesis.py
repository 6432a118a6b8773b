"""Capture (what the observer records, unchanged results) and example synthesis."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch
import transformers

from optimum_observer import reference_inputs
from optimum_observer.families import family_of
from optimum_observer.tasks import get_task
from stages import capture_and_synthesize, load_tiny


class TinyLlamaCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as scratch:
            cls.loaded = load_tiny("llama", Path(scratch), with_tokenizer=True, num_key_value_heads=2)


class TestCapture(TinyLlamaCase):
    def test_observing_does_not_change_what_the_run_returns(self):
        contract = get_task("text-generation-with-past")
        run = family_of(contract).default_run(self.loaded.model, contract, self.loaded.tokenizer)
        plain = run(self.loaded.model)
        captured, _ = capture_and_synthesize(self.loaded)
        self.assertEqual(len(plain), len(captured.return_value))
        for expected, observed in zip(plain, captured.return_value):
            self.assertTrue(torch.equal(expected, observed))

    def test_default_run_covers_two_batch_sizes_and_two_prompt_lengths(self):
        captured, _ = capture_and_synthesize(self.loaded)
        prefill = [c.inputs["input_ids"].shape for c in captured.calls if c.inputs["input_ids"].shape[1] > 1]
        self.assertEqual(len({shape[0] for shape in prefill}), 2)
        self.assertEqual(len({shape[1] for shape in prefill}), 2)

    def test_calls_are_projected_on_the_task_contract(self):
        captured, _ = capture_and_synthesize(self.loaded)
        prefill, decode = captured.calls[0], captured.calls[1]
        # The prefill call's cache is empty: it counts as absent, as the runtime feeds it.
        self.assertEqual(set(prefill.inputs), {"input_ids", "attention_mask", "position_ids"})
        self.assertEqual(set(decode.inputs), {"input_ids", "attention_mask", "position_ids", "past_key_values"})

    def test_a_custom_run_receives_the_model(self):
        seen = []

        def run(model):
            seen.append(model)
            ids = torch.randint(3, 100, (2, 6))
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)

        captured, example = capture_and_synthesize(self.loaded, run=run)
        self.assertIs(seen[0], self.loaded.model)
        self.assertEqual(len(captured.calls), 2)
        # Batch never varied in this run, and is dynamic all the same.
        self.assertEqual(example.dynamic_shapes["input_ids"][0], "batch_size")


class TestSynthesis(TinyLlamaCase):
    def test_dynamic_dimensions_are_at_least_two_and_distinct(self):
        _, example = capture_and_synthesize(self.loaded)
        self.assertEqual(
            example.sizes,
            {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5, "past_sequence_length + sequence_length": 8},
        )
        self.assertEqual(tuple(example.kwargs["input_ids"].shape), (2, 3))
        self.assertEqual(tuple(example.kwargs["attention_mask"].shape), (2, 8))
        self.assertEqual(example.kwargs["position_ids"][0].tolist(), [5, 6, 7])
        cache = example.kwargs["past_key_values"]
        config = self.loaded.model.config
        self.assertEqual(tuple(cache.layers[0].keys.shape), (2, config.num_key_value_heads, 5, config.head_dim))
        self.assertEqual(example.dynamic_shapes["past_key_values"][0], {0: "batch_size", 2: "past_sequence_length"})
        self.assertEqual(example.dynamic_shapes["attention_mask"][1], "past_sequence_length + sequence_length")

    def test_one_leaf_spec_per_graph_input(self):
        _, example = capture_and_synthesize(self.loaded)
        self.assertEqual(
            [(leaf.input_name, leaf.index) for leaf in example.leaves],
            [("input_ids", 0), ("attention_mask", 0), ("position_ids", 0)] + [("past_key_values", i) for i in range(4)],
        )


class TestPadding(unittest.TestCase):
    def test_an_encoder_batch_is_padded_with_its_config_pad_id(self):
        # RoBERTa-like encoders find padding in the ids (their positions skip the pad id); they
        # have no generation config, so the pad id comes from the model's config (it was 0).
        class Encoder:
            generation_config = None
            config = transformers.RobertaConfig(vocab_size=50, pad_token_id=1)

        batch = reference_inputs.random_token_batch(Encoder(), [2, 5], torch.Generator().manual_seed(0), left_padding=False)
        self.assertEqual(batch["attention_mask"][0].tolist(), [1, 1, 0, 0, 0])
        self.assertEqual(batch["input_ids"][0, 2:].tolist(), [1, 1, 1])
