"""The unchanged-code hook: scripts that import only from `optimum` get the router once installed.

These tests need the package installed (`pip install -e .` or `pip install .`): the hook is the
`optimum_observer_hook.pth` file that installation puts in site-packages.
"""

from __future__ import annotations

import inspect
import re
import site
import tempfile
import unittest
from pathlib import Path

import legacy_shim
from legacy_shim._hook import DISABLE_ENV_VAR
from legacy_shim.routes import upstream_main_export
from shim_helpers import UNSUPPORTED_TYPE, assert_same_export, run_python, torch_greedy

WITH_PAST = "text-generation-with-past"
PTH_NAME = "optimum_observer_hook.pth"

SCRIPT = """
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

main_export({model!r}, {output!r}, task="text-generation-with-past")
model = ORTModelForCausalLM.from_pretrained({output!r})
inputs = AutoTokenizer.from_pretrained({output!r})("The capital of France is", return_tensors="pt",
                                                    return_token_type_ids=False)
print("TOKENS", model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0].tolist())
"""


class TestInstallation(unittest.TestCase):
    def test_pth_file_is_installed_in_site_packages(self):
        installed = [Path(d) / PTH_NAME for d in site.getsitepackages() if (Path(d) / PTH_NAME).is_file()]
        self.assertEqual(len(installed), 1, "install the package (pip install -e . / pip install .)")
        packaged = Path(legacy_shim.__file__).with_name(PTH_NAME)
        self.assertEqual(installed[0].read_text(), packaged.read_text())

    def test_interpreter_start_imports_nothing_heavy_and_stays_under_10_ms(self):
        with tempfile.TemporaryDirectory() as scratch:
            heavy = "{'torch', 'optimum', 'transformers', 'numpy', 'legacy_shim'}"
            probe = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
            done = run_python(probe, Path(scratch))
            self.assertEqual(done.stdout.strip(), "['legacy_shim', 'legacy_shim._hook']")
            # The fastest of three starts: a busy machine (a sweep beside the tests) can stall any
            # one start by more than the budget; a heavy import (torch: ~1 s) fails every time.
            starts = []
            for _ in range(3):
                timed = run_python("pass", Path(scratch), PYTHONPROFILEIMPORTTIME="1")
                # "import time: self [us] | cumulative | name": the outermost legacy_shim line includes the rest.
                cumulative = [
                    int(m.group(1))
                    for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|\s+legacy_shim", timed.stderr)
                ]
                self.assertTrue(cumulative, timed.stderr[-2000:])
                starts.append(max(cumulative))
        self.assertLess(min(starts), 10_000, starts)

    def test_off_switch_keeps_the_hook_out(self):
        with tempfile.TemporaryDirectory() as scratch:
            done = run_python(
                "import sys; print([type(f).__name__ for f in sys.meta_path])",
                Path(scratch),
                **{DISABLE_ENV_VAR: "1"},
            )
        self.assertNotIn("PostImportFinder", done.stdout)


class TestHookInProcess(unittest.TestCase):
    def test_optimum_main_export_keeps_its_signature_and_docstring(self):
        from optimum.exporters import onnx as onnx_exporters

        wrapper, original = onnx_exporters.main_export, upstream_main_export()
        self.assertIsNot(wrapper, original, "the hook is not active in this interpreter")
        self.assertEqual(inspect.signature(wrapper), inspect.signature(original))
        self.assertEqual(wrapper.__doc__, original.__doc__)


class TestUnchangedScript(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory()
        cls.root = Path(cls.scratch.name)
        cls.model = cls.artifacts.causal_lm(UNSUPPORTED_TYPE)

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_script_importing_only_optimum_exports_an_unsupported_type(self):
        output = self.root / "hooked"
        done = run_python(SCRIPT.format(model=str(self.model), output=str(output)), self.root)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        tokens = [line for line in done.stdout.splitlines() if line.startswith("TOKENS")]
        self.assertEqual(tokens, [f"TOKENS {torch_greedy(self.model)}"])

    def test_with_the_off_switch_it_fails_as_upstream(self):
        output = self.root / "disabled"
        done = run_python(
            SCRIPT.format(model=str(self.model), output=str(output)), self.root, **{DISABLE_ENV_VAR: "1"}
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(
            f"Trying to export a {UNSUPPORTED_TYPE} model, that is a custom or unsupported architecture",
            done.stderr,
        )
        self.assertNotIn("legacy_shim", done.stderr)

    def test_supported_types_are_exported_by_optimum_onnx_untouched(self):
        # optimum-onnx's own export of the same tiny llama is the session's.
        model = self.artifacts.causal_lm("llama")
        output = self.root / "llama_hooked"
        script = (
            "from optimum.exporters.onnx import main_export\n"
            f"main_export({str(model)!r}, {str(output)!r}, task={WITH_PAST!r})"
        )
        done = run_python(script, self.root)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        assert_same_export(self, self.artifacts.legacy_export("llama"), output)
