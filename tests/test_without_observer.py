"""Checks through optimum-onnx's unchanged class where optimum-observer is not installed.

The interpreter of :func:`legacy_shim.tooling.without_observer.run_without_observer` has
site-packages but neither package nor the hook; the checks it serves are the validation's own,
recorded then replayed with what that interpreter's runtime class returned. (The sweep sample in
test_sweep.py runs the whole path: gpt2 passes there, mamba fails there with optimum-onnx's error.)
"""

from __future__ import annotations

import subprocess
import sys
import unittest
from pathlib import Path

import numpy as np
import torch

from legacy_shim.tooling import tiny_configs, without_observer
from optimum_observer.families import family_of
from optimum_observer.tasks import get_task
from optimum_observer.validation import ValidationInputs

TASK = get_task("feature-extraction")


class TestInterpreterWithoutObserver(unittest.TestCase):
    def test_site_packages_without_either_package_or_the_hook(self):
        code = (
            "import importlib.util\n"
            "print(importlib.util.find_spec('transformers') is not None,"
            " importlib.util.find_spec('optimum_observer'), importlib.util.find_spec('legacy_shim'),"
            " [type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'PostImportFinder'])\n"
        )
        done = without_observer.run_without_observer(code, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["True", "None", "None", "[]"])

    def test_the_guard_refuses_an_interpreter_where_the_packages_are_importable(self):
        # The same prologue in this environment's ordinary interpreter (its .pth files processed).
        prologue = without_observer._PROLOGUE.format(site_packages=[])
        done = subprocess.run([sys.executable, "-c", prologue], capture_output=True, text=True, timeout=300)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("is importable", done.stderr)


class TestRecordAndReplay(unittest.TestCase):
    """The encoder checks recorded then replayed (no subprocess, no ONNX file: the replaying
    stand-in answers from the arrays given, as it does with the other interpreter's)."""

    @classmethod
    def setUpClass(cls):
        cls.model = tiny_configs.build_tiny_model("bert", TASK.auto_model_class).eval()
        cls.recording = without_observer._Recording(cls.model)
        family_of(TASK).check_runtime(ValidationInputs(Path("unused"), cls.model, TASK, cls.recording))

    def _replayed(self, shift: float):
        outputs = {}
        for index, call in enumerate(self.recording.calls):
            with torch.no_grad():
                hidden = self.model(**call.tensors).last_hidden_state.numpy()
            outputs[f"{index}.last_hidden_state"] = hidden + np.float32(shift)
        replaying = without_observer._Replaying(self.recording.calls, outputs)
        return family_of(TASK).check_runtime(ValidationInputs(Path("unused"), self.model, TASK, replaying)).outputs

    def test_every_call_the_checks_make_is_recorded(self):
        self.assertEqual([c.method for c in self.recording.calls], ["__call__", "__call__"])
        self.assertEqual([c.tensors["input_ids"].shape[0] for c in self.recording.calls], [2, 3])

    def test_the_outputs_of_the_other_interpreter_decide(self):
        self.assertTrue(all(check.ok for check in self._replayed(0.0)))
        self.assertFalse(any(check.ok for check in self._replayed(0.5)))

    def test_calls_that_differ_from_the_recorded_ones_are_refused(self):
        replaying = without_observer._Replaying(self.recording.calls, {})
        with self.assertRaisesRegex(RuntimeError, "other calls"):
            replaying.generate(input_ids=torch.zeros(1, 1, dtype=torch.long))
