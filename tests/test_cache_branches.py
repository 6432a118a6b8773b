"""ProphetNet's and XLM-ProphetNet's decoder without branches on its cache: it computes what
upstream does, and the export fails without it."""

from __future__ import annotations

import copy
import tempfile
import unittest

import pytest
import torch
from parameterized import parameterized

from legacy_shim.tooling.tiny_configs import build_tiny_model
from optimum_observer import greedy
from optimum_observer.errors import Stage
from optimum_observer.patches import applied, cache_branches
from optimum_observer.tasks import get_task
from stages import conversion_error, load, observe, replay_without

CONTRACT = get_task("text-generation-with-past")


def _model(model_type: str, ngram: int) -> torch.nn.Module:
    model = build_tiny_model(model_type, CONTRACT.auto_model_class)
    config = copy.deepcopy(model.config)
    config.ngram = ngram
    torch.manual_seed(0)
    return type(model)(config).eval()


def _prompt_then_three_steps(model: torch.nn.Module) -> list[torch.Tensor]:
    """Logits of a left-padded prompt on an empty cache, then of 3 greedy tokens one at a time, as
    generate feeds the decoder."""
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    outputs = []
    with torch.no_grad():
        step = model(input_ids=ids, attention_mask=mask, use_cache=True)
        for _ in range(3):
            outputs += [step.logits, step.logits_ngram]
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], -1)
            cache = greedy._as_cache(step.past_key_values)  # XLM-ProphetNet returns tuples, reads a Cache
            step = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
    return [o for o in outputs if o is not None]


class TestProphetNetDecoderWithoutCacheBranches(unittest.TestCase):
    @parameterized.expand([(t, n) for t in ("prophetnet", "xlm-prophetnet") for n in (1, 2, 3)])
    def test_it_computes_what_upstream_computes(self, model_type, ngram):
        model = _model(model_type, ngram)
        expected = _prompt_then_three_steps(model)
        with applied(cache_branches.PATCHES):
            got = _prompt_then_three_steps(model)
        self.assertEqual(len(got), len(expected))
        for want, have in zip(expected, got):
            torch.testing.assert_close(have, want, rtol=0, atol=0)

    def test_the_export_fails_without_it(self):
        error = conversion_error(
            observe(load(build_tiny_model("prophetnet", CONTRACT.auto_model_class))),
            "prophetnet_decoder_without_cache_branches",
        )
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("only supported for `decoder_input_ids` of length 1", str(error.__cause__))

    @pytest.mark.slow
    def test_xlm_prophetnet_export_fails_without_it(self):
        error = conversion_error(
            observe(load(build_tiny_model("xlm-prophetnet", CONTRACT.auto_model_class))),
            "xlm_prophetnet_decoder_without_cache_branches",
        )
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("only supported for `decoder_input_ids` of length 1", str(error.__cause__))

    @parameterized.expand([("prophetnet",), ("xlm-prophetnet",)])
    @pytest.mark.slow
    def test_one_graph_serves_the_prompt_and_the_cached_steps(self, model_type):
        observed = observe(load(build_tiny_model(model_type, CONTRACT.auto_model_class)))
        with tempfile.TemporaryDirectory() as scratch:
            checks = replay_without(observed, scratch)
        self.assertTrue(len(checks) >= 3 and all(c.ok for c in checks), checks)


if __name__ == "__main__":
    unittest.main()
