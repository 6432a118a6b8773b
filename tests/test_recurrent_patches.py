"""Recurrent language models whose layers loop over time in Python (rwkv, xlstm, recurrent_gemma): with their
patches (optimum_observer/patches/recurrent.py) one graph serves every sequence length; without
them torch.export unrolls the loop and fixes the sequence axis the contract declares dynamic."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import pytest
import torch

import optimum_observer
from legacy_shim.tooling.tiny_configs import build_tiny_model
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES, applied, for_model_runs
from optimum_observer.tasks import get_task
from stages import load, observe, replay_without

#: The task these models are exported for: their forward takes no `past_key_values` (rwkv's
#: `state`), or their own generate fails with its cache in transformers 4.57 (xlstm).
CONTRACT = get_task("text-generation")
PATCH_OF = {"rwkv": "rwkv_scanned_linear_attention", "xlstm": "xlstm_scanned_backend"}


def _observe(model_type: str):
    return observe(load(build_tiny_model(model_type, "AutoModelForCausalLM").eval(), CONTRACT), CONTRACT)


def _replay(observed, *without: str) -> list:
    with tempfile.TemporaryDirectory() as scratch:
        return replay_without(observed, Path(scratch), *without)


def _exported(model: torch.nn.Module, patch_name: str | None) -> torch.export.ExportedProgram:
    """torch.export (step 1 of the conversion) of `model` with a dynamic batch and sequence,
    under the patch `patch_name` (none: unpatched)."""
    ids = torch.randint(3, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    with applied([p for p in PATCHES if p.name == patch_name]), torch.no_grad():
        return torch.export.export(
            model, (), {"input_ids": ids, "use_cache": False}, dynamic_shapes={"input_ids": dims, "use_cache": None},
            strict=False,
        )  # fmt: skip


class TestRwkvScannedAttention(unittest.TestCase):
    def test_one_program_for_every_length_and_none_without_the_patch(self):
        model = build_tiny_model("rwkv", "AutoModelForCausalLM").eval()
        program = _exported(model, "rwkv_scanned_linear_attention").module()
        for length in (1, 4, 9):
            generator = torch.Generator().manual_seed(length)
            ids = torch.randint(3, model.config.vocab_size, (3, length), generator=generator)
            with torch.no_grad():
                expected = model(input_ids=ids, use_cache=False).logits
                got = program(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # the unrolled loop: "You marked L['input_ids'].size()[1] as dynamic but your code
        # specialized it to be a constant (3)"
        with self.assertRaisesRegex(torch._dynamo.exc.UserError, r"size\(\)\[1\] as dynamic but .* constant \(3\)"):
            _exported(model, None)


@pytest.mark.slow  # a full conversion each; the default suite has the tests above and below
class TestLoopOverTime(unittest.TestCase):
    def test_rwkv(self):
        self.assertOneGraphForEveryLengthAndNoneWithoutThePatch("rwkv")

    def test_xlstm(self):
        self.assertOneGraphForEveryLengthAndNoneWithoutThePatch("xlstm")

    def assertOneGraphForEveryLengthAndNoneWithoutThePatch(self, model_type: str) -> None:
        observed = _observe(model_type)
        lengths = {call.inputs["input_ids"].shape[1] for call in observed.captures[0].calls}
        self.assertGreater(len(lengths), 1)
        checks = _replay(observed)
        self.assertTrue(checks and all(c.ok for c in checks), [str(c) for c in checks])
        with self.assertRaises(ObserverExportError) as caught:
            _replay(observed, PATCH_OF[model_type])
        self.assertEqual(caught.exception.stage, Stage.TORCH_EXPORT)
        self.assertIn("inferred a static shape", str(caught.exception.__cause__))


class TestScannedXlstmBackend(unittest.TestCase):
    def test_same_outputs_and_states_as_the_step_loop(self):
        # Below `chunk_size` tokens (the sweep's prompts) transformers runs the step kernel in a
        # loop; the scan must give its outputs and last states, from zero and from given states.
        model = build_tiny_model("xlstm", "AutoModelForCausalLM").eval()
        backend = next(m for m in model.modules() if type(m).__name__ == "xLSTMBackend")
        generator = torch.Generator().manual_seed(0)
        heads, qk, v = 4, model.config.hidden_size * model.config.qk_dim_factor // 4, model.config.hidden_size // 4
        q, k = (torch.randn(2, heads, 7, int(qk), generator=generator) for _ in range(2))
        value = torch.randn(2, heads, 7, v, generator=generator)
        igate, fgate = (torch.randn(2, heads, 7, generator=generator) for _ in range(2))
        with torch.no_grad():
            expected, states = backend(q, k, value, igate, fgate)
            expected_next, next_states = backend(q, k, value, igate, fgate, *states)
            (patch,) = [p for p in PATCHES if p.name == "xlstm_scanned_backend"]
            with applied([patch]):
                got, got_states = backend(q, k, value, igate, fgate)
                got_next, got_next_states = backend(q, k, value, igate, fgate, *states)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_next, expected_next)
        for a, b in zip((*got_states, *got_next_states), (*states, *next_states)):
            torch.testing.assert_close(a, b)


def _recurrent_gemma() -> torch.nn.Module:
    return build_tiny_model("recurrent_gemma", "AutoModelForCausalLM").eval()


def _generate_without_cache(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(batch, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)


class TestRecurrentGemmaWithoutCache(unittest.TestCase):
    """transformers 4.57's RG-LRU reads the state its previous call left on the module, also
    without a cache: the model's own generate(use_cache=False) fails on a batch of another size."""

    def setUp(self):
        generator = torch.Generator().manual_seed(0)
        self.pair, self.triple = (torch.randint(3, 256, (n, 5), generator=generator) for n in (2, 3))

    def test_the_models_own_run_fails_without_the_patch(self):
        model = _recurrent_gemma()
        _generate_without_cache(model, self.pair)
        with self.assertRaisesRegex(RuntimeError, r"size of tensor a \(3\) must match the size of tensor b \(2\)"):
            _generate_without_cache(model, self.triple)

    def test_with_it_every_run_is_a_fresh_models(self):
        model = _recurrent_gemma()
        patches = for_model_runs(PATCHES, model, "recurrent_gemma")
        self.assertEqual([p.name for p in patches], ["recurrent_gemma_no_state_without_cache"])
        with applied(patches):
            _generate_without_cache(model, self.pair)
            got = _generate_without_cache(model, self.triple)
        torch.testing.assert_close(got, _generate_without_cache(_recurrent_gemma(), self.triple))

    def test_the_scanned_rg_lru_computes_upstreams_values(self):
        # Upstream's loop, prefill from zeros and a one-token step from its state, against the scan.
        model = _recurrent_gemma()
        lru = next(m for m in model.modules() if type(m).__name__ == "RecurrentGemmaRglru")
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randn(2, 6, model.config.lru_width, generator=generator)
        token = torch.randn(2, 1, model.config.lru_width, generator=generator)
        positions = torch.tensor([[1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
        results = []
        for patches in ([], [p for p in PATCHES if p.name == "recurrent_gemma_scanned_rg_lru"]):
            with applied(patches), torch.no_grad():
                lru.recurrent_states = None
                results.append((lru(prompt, positions), lru(token, positions[:, -1:] + 1), lru.recurrent_states))
        for got, expected in zip(*reversed(results)):
            torch.testing.assert_close(got, expected)


@pytest.mark.slow
class TestRecurrentGemmaExport(unittest.TestCase):
    def test_exports_and_generates_as_torch_with_and_without_optimum_observer(self):
        from legacy_shim.tooling.without_observer import check_without_observer

        model = _recurrent_gemma()
        with tempfile.TemporaryDirectory() as scratch:
            result = optimum_observer.export(model, Path(scratch) / "onnx", task="text-generation")
            self.assertTrue(result.validation.ok, result.validation.table())
            self.assertIn("recurrent_gemma_no_state_without_cache", result.patches)
            # Its torch reference (two batch sizes without a cache) needs the patch too.
            report = check_without_observer(result.output_dir, model, CONTRACT, Path(scratch) / "plain")
        self.assertTrue(report.generation and all(c.ok for c in report.generation), report.generation)


class TestXlstmChunkwiseKernel(unittest.TestCase):
    """transformers 4.57's native chunkwise mLSTM kernel raises: the model's own run fails from
    `chunk_size` tokens on; the scanned backend, applied around the model's runs, computes them."""

    def test_the_models_own_run_fails_from_chunk_size_tokens_without_the_patch(self):
        model = build_tiny_model("xlstm", "AutoModelForCausalLM").eval()
        ids = torch.randint(3, 256, (2, model.config.chunk_size), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            with self.assertRaisesRegex(TypeError, "'Tensor' object is not callable"):
                model(ids, use_cache=False)
            patches = for_model_runs(PATCHES, model, "xlstm")
            self.assertEqual([p.name for p in patches], ["xlstm_scanned_backend"])
            with applied(patches):
                got = model(ids, use_cache=False).logits
            # upstream's own step loop, which it runs below `chunk_size` tokens
            for backend in (m for m in model.modules() if type(m).__name__ == "xLSTMBackend"):
                backend._inference_fn.keywords["chunk_size"] = ids.shape[1] + 1
            torch.testing.assert_close(got, model(ids, use_cache=False).logits)
