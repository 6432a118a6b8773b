"""Parity fixes: exports that ran but did not compute what torch computed, and what fixed them."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from optimum_observer import conversion, loading, naming, validation
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.patches import PATCHES
from optimum_observer.result import CallCheck
from optimum_observer.tiny_configs import build_tiny_model
from stages import CONTRACT, capture_and_synthesize


def _load_tiny(model_type: str) -> loading.LoadedModel:
    return loading.load(
        build_tiny_model(model_type, "AutoModelForCausalLM"), CONTRACT, tokenizer=None, dtype=None,
        device="cpu", trust_remote_code=False, model_kwargs=None, hub_kwargs={},
    )  # fmt: skip


def _replayed_calls(model_type: str, patches=PATCHES) -> list[CallCheck]:
    """Every observed call of the tiny model replayed through its export (without validation's
    generation check)."""
    loaded = _load_tiny(model_type)
    captured, example = capture_and_synthesize(loaded)
    with tempfile.TemporaryDirectory() as scratch, registered_caches():
        program = conversion.convert(loaded.model, CONTRACT.graphs[0], example, model_type, patches=patches)
        naming.apply_names(program, captured, example, model_type)
        path = Path(scratch) / "model.onnx"
        program.save(str(path))
        return validation.replay_calls(path, captured, example, naming.input_names(example), atol=1e-4)


class TestGitFirstStepMask(unittest.TestCase):
    """GIT branches on the cache length in Python: the exported first step must still be causal and padded."""

    def test_every_observed_call_matches_torch(self):
        checks = _replayed_calls("git")
        self.assertTrue(all(c.ok for c in checks), [(c.index, c.max_abs_diff) for c in checks])

    def test_first_steps_do_not_match_without_the_patches(self):
        names = {"git_attention_mask_without_cache_branch", "git_padding_in_attention_mask"}
        self.assertTrue(names <= {p.name for p in PATCHES})
        checks = _replayed_calls("git", [p for p in PATCHES if p.name not in names])
        # Calls 0 and 3 are generate's first steps (batch 2, then 3): empty cache, several tokens.
        self.assertEqual([c.index for c in checks if not c.ok], [0, 3])
        self.assertGreater(min(c.max_abs_diff for c in checks if not c.ok), 1e-3)


if __name__ == "__main__":
    unittest.main()
