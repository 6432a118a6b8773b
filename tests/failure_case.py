"""The checks every failed export must pass, shared by the bad-input tests."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path
from typing import Any

import optimum_observer
from optimum_observer import ObserverExportError, Stage
from optimum_observer.cache_pytree import is_registered, registered_cache_classes
from optimum_observer.patches import PATCHES


def patched_attributes() -> dict[str, Any]:
    # A patch of another transformers version's code has no target here (Patch.transformers).
    return {p.name: p.resolve().own_value for p in PATCHES if p.for_this_transformers}


class ExportFailureCase(unittest.TestCase):
    """A scratch directory per test, and :meth:`assertFailsCleanly` for what a failure leaves."""

    #: keyword arguments every export of the test case takes.
    export_kwargs: dict[str, Any] = {}

    def setUp(self):
        self._scratch = tempfile.TemporaryDirectory()
        self.scratch = Path(self._scratch.name)
        self.output = self.scratch / "out"
        self.originals = patched_attributes()

    def tearDown(self):
        self._scratch.cleanup()

    def export_error(self, model: Any, **kwargs: Any) -> ObserverExportError:
        with self.assertRaises(ObserverExportError) as caught:
            optimum_observer.export(model, self.output, **{**self.export_kwargs, **kwargs})
        return caught.exception

    def assertFailsCleanly(self, error: ObserverExportError, model_type: str, stage: Stage) -> None:
        """Names the model type, the stage and a remedy; leaves no output, no staging directory,
        no pytree registration and no patch behind."""
        self.assertEqual((error.model_type, error.stage), (model_type, stage))
        for part in (model_type, stage.value, "Next steps:"):
            self.assertIn(part, str(error))
        self.assertTrue(error.remedy.strip())
        self.assertFalse(self.output.exists())
        self.assertEqual([p.name for p in self.scratch.iterdir() if ".partial" in p.name], [])
        self.assertEqual([c.__name__ for c in registered_cache_classes() if is_registered(c)], [])
        self.assertEqual(patched_attributes(), self.originals)
