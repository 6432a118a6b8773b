"""Recurrent language models whose layers loop over time in Python (rwkv, xlstm): with their
patches (optimum_observer/patches/recurrent.py) one graph serves every sequence length; without
them torch.export unrolls the loop and fixes the sequence axis the contract declares dynamic."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import pytest
import torch

from legacy_shim.tooling.tiny_configs import build_tiny_model
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES, applied
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
            ids = torch.randint(3, model.config.vocab_size, (3, length), generator=torch.Generator().manual_seed(length))
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
