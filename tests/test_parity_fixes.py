"""Parity fixes: exports that ran but did not compute what torch computed, and what fixed them."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import torch

import optimum_observer
from legacy_shim.tooling import sweep
from optimum_observer import capture, loading, validation
from optimum_observer.capture import ObservedCall, position_offset
from optimum_observer.reference_inputs import random_token_batch
from optimum_observer.errors import RUN_FAILS_WITHOUT_OBSERVER, ObserverExportError, Stage
from optimum_observer.tasks import get_task
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.result import CallCheck
from legacy_shim.tooling.tiny_configs import build_tiny_model
from stages import CONTRACT, Observed, convert_without, load, observe, replay_without


def _load_tiny(model_type: str) -> loading.LoadedModel:
    return load(build_tiny_model(model_type, "AutoModelForCausalLM"))


def _replayed_calls(observed: Observed, *without: str) -> list[CallCheck]:
    """Every observed call of the tiny model replayed through its export (without validation's
    generation check)."""
    with tempfile.TemporaryDirectory() as scratch:
        return replay_without(observed, Path(scratch), *without)


class TestGitFirstStepMask(unittest.TestCase):
    """GIT branches on the cache length in Python: the exported first step must still be causal and padded."""

    @classmethod
    def setUpClass(cls):
        cls.observed = observe(_load_tiny("git"))

    def test_every_observed_call_matches_torch(self):
        checks = _replayed_calls(self.observed)
        self.assertTrue(all(c.ok for c in checks), [(c.index, c.max_abs_diff) for c in checks])

    def test_first_steps_do_not_match_without_the_patches(self):
        checks = _replayed_calls(
            self.observed, "git_attention_mask_without_cache_branch", "git_padding_in_attention_mask"
        )
        # Calls 0 and 3 are generate's first steps (batch 2, then 3): empty cache, several tokens.
        self.assertEqual([c.index for c in checks if not c.ok], [0, 3])
        self.assertGreater(min(c.max_abs_diff for c in checks if not c.ok), 1e-3)


def _call(position_ids: list[list[int]], attention_mask: list[list[int]]) -> ObservedCall:
    inputs = {"position_ids": torch.tensor(position_ids), "attention_mask": torch.tensor(attention_mask)}
    return ObservedCall(inputs, None)


class TestPositionOffset(unittest.TestCase):
    """Positions counted from another origin than the runtime's are found and added back in the graph."""

    def test_roberta_style_positions_are_the_runtime_positions_plus_padding_idx_plus_one(self):
        # padding_idx 1: unpadded positions count from 2; padding holds padding_idx.
        prefill = _call([[1, 1, 2, 3], [2, 3, 4, 5]], [[0, 0, 1, 1], [1, 1, 1, 1]])
        step = _call([[4], [6]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        self.assertEqual(position_offset([prefill, step]), 2)

    def test_runtime_positions_have_no_offset(self):
        prefill = _call([[1, 1, 0, 1], [0, 1, 2, 3]], [[0, 0, 1, 1], [1, 1, 1, 1]])
        self.assertEqual(position_offset([prefill]), 0)

    def test_positions_that_ignore_the_padding_have_no_single_offset(self):
        prefill = _call([[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 0, 1, 1], [1, 1, 1, 1]])
        self.assertEqual(position_offset([prefill]), 0)

    def test_random_prompts_are_padded_with_the_pad_id(self):
        model = build_tiny_model("xlm-roberta-xl", "AutoModelForCausalLM")
        batch = random_token_batch(model, [2, 4], torch.Generator().manual_seed(0), left_padding=True)
        self.assertEqual(batch["input_ids"][0, :2].tolist(), [model.generation_config.pad_token_id] * 2)
        prompt_ids = batch["input_ids"][batch["attention_mask"] == 1].tolist()
        self.assertNotIn(model.generation_config.pad_token_id, prompt_ids)

    def test_xlm_roberta_xl_generates_the_torch_tokens_through_the_runtime(self):
        # Its generate passes RoBERTa positions (padding_idx + 1 + count); the runtime feeds the
        # mask counted from 0.
        with tempfile.TemporaryDirectory() as scratch:
            result = optimum_observer.export(
                build_tiny_model("xlm-roberta-xl", "AutoModelForCausalLM"), Path(scratch) / "onnx", show_progress=False
            )
        self.assertTrue(result.validation.ok, result.validation.table())
        self.assertTrue(result.validation.generation)


_GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


def _caveat(model_type: str, inputs: dict[str, torch.Tensor]) -> str:
    model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
    with torch.no_grad():
        expected = model.generate(**inputs, **_GREEDY)
    return validation.torch_reference_caveat(model, inputs, _GREEDY, expected)


def _prompt(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TestTorchReferenceCaveats(unittest.TestCase):
    """A failed generation check says when torch's own tokens are out of the runtime's reach."""

    def test_a_generate_that_rewrites_the_prompt_is_named(self):
        # XLM's prepare_inputs_for_generation appends a mask token and predicts it.
        self.assertIn("rewrites the prompt", _caveat("xlm", _prompt(5)))

    def test_a_generate_that_changes_without_its_cache_is_named(self):
        # Doge under sdpa: no causal mask for an unpadded prompt, its dynamic mask drops causality.
        # (Whether greedy tokens differ depends on the random weights and the prompt: with the
        # real-shaped tiny doge they do for 4 tokens.)
        self.assertIn("other tokens without its cache", _caveat("doge", _prompt(4)))

    def test_a_consistent_model_has_no_caveat(self):
        self.assertEqual(_caveat("llama", _prompt(5)), "")

    def test_tensors_the_runtime_does_not_feed_are_recorded_per_call(self):
        # XLNet's generate feeds a permutation mask and target mapping over a dummy token.
        model = build_tiny_model("xlnet", "AutoModelForCausalLM").eval()
        (captured,) = capture.capture(model, get_task("text-generation"), "xlnet")
        self.assertEqual({c.unfed for c in captured.calls}, {("perm_mask", "target_mapping")})

    def test_ordinary_calls_have_no_unfed_tensors(self):
        model = build_tiny_model("llama", "AutoModelForCausalLM").eval()
        with registered_caches():
            (captured,) = capture.capture(model, CONTRACT, "llama")
        self.assertEqual({c.unfed for c in captured.calls}, {()})


class TestCpmAnt(unittest.TestCase):
    """CPM-Ant's generate with a cache fails in plain torch; without one it exports and validates."""

    def test_sequence_axis_is_specialised_without_the_patch(self):
        observed = observe(_load_tiny("cpmant"), get_task("text-generation"))
        with self.assertRaises(ObserverExportError) as raised:
            convert_without(observed, "cpmant_attention_mask_from_arange")
        self.assertIn("static shape", str(sweep.root_cause(raised.exception)))

    def test_the_sweep_exports_it_without_past(self):
        with tempfile.TemporaryDirectory() as scratch:
            result = sweep.run_observer_path("cpmant", "text-generation-with-past", Path(scratch))
        self.assertEqual((result.status, result.task), (sweep.Status.PASS, "text-generation"), result.error)


class TestRunThatFailsWithoutTheObserver(unittest.TestCase):
    def test_cpmant_generate_with_cache_fails_in_plain_torch_and_the_sweep_says_so(self):
        # CPM-Ant's forward re-embeds the whole sequence and slices the cached part off; generate
        # feeds only the new tokens once there is a cache.
        model = build_tiny_model("cpmant", "AutoModelForCausalLM").eval()
        with registered_caches(), self.assertRaises(ObserverExportError) as raised:
            capture.capture(model, CONTRACT, "cpmant")
        error = raised.exception
        self.assertEqual(error.stage, Stage.CAPTURE)
        self.assertTrue(error.reason.startswith(RUN_FAILS_WITHOUT_OBSERVER), error.reason)
        described = sweep._describe(error)
        self.assertIn("must match the size of tensor b", described)
        self.assertIn("cpmant", sweep.known_reason(described))

    def test_a_run_that_fails_only_under_the_observer_is_not_blamed_on_the_model(self):
        model = build_tiny_model("llama", "AutoModelForCausalLM").eval()
        runs = []

        def run(model):
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("only the first time")

        with registered_caches(), self.assertRaises(ObserverExportError) as raised:
            capture.capture(model, CONTRACT, "llama", run=run)
        self.assertIn("under the observer raised RuntimeError: only the first time", raised.exception.reason)


class TestTextGenerationWithoutPast(unittest.TestCase):
    def test_a_model_with_a_cache_exported_without_past_replays_every_call(self):
        # The runtime recomputes the whole prefix at each step: so must the observed run, or the
        # decoding steps are observed with a cache the graph never gets.
        with tempfile.TemporaryDirectory() as scratch:
            result = optimum_observer.export(
                build_tiny_model("llama", "AutoModelForCausalLM"), Path(scratch) / "onnx",
                task="text-generation", show_progress=False,
            )  # fmt: skip
        self.assertTrue(result.validation.ok, result.validation.table())
        self.assertGreater(len(result.validation.calls), 2)


if __name__ == "__main__":
    unittest.main()


class TestDogeCausalDynamicMask(unittest.TestCase):
    """Doge under sdpa: for an unpadded prompt transformers skips the causal mask (None, for sdpa's
    is_causal) and then hands sdpa its dynamic mask built without it, so the prompt's tokens see
    later ones; with `doge_causal_dynamic_mask` torch generates the same tokens with and without
    its cache, and the same as eager attention (whose mask is always built)."""

    def test_torch_generates_alike_with_and_without_cache_only_with_the_patch(self):
        from optimum_observer.patches import PATCHES, applied, for_model_runs

        model = build_tiny_model("doge", "AutoModelForCausalLM").eval()
        self.assertEqual(model.config._attn_implementation, "sdpa")
        prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))

        def tokens(use_cache: bool) -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)
            return out[:, prompt.shape[1] :].tolist()

        self.assertNotEqual(tokens(True), tokens(False))
        patches = for_model_runs(PATCHES, model, "doge")
        self.assertEqual([p.name for p in patches], ["doge_causal_dynamic_mask"])
        with applied(patches):
            with_cache, without_cache = tokens(True), tokens(False)
        model.config._attn_implementation = "eager"
        self.assertEqual(with_cache, without_cache)
        self.assertEqual(with_cache, tokens(True))
