"""`python -m optimum_observer export`: the demo end to end, and a failure's exit status and message."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optimum_observer", *args], capture_output=True, text=True, timeout=600, check=False
    )


class TestCommandLine(unittest.TestCase):
    def test_demo_exports_and_validates(self):
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / "demo-onnx"
            done = run_cli("export", "--demo", str(output))
            self.assertEqual(done.returncode, 0, done.stderr[-2000:])
            self.assertIn("exported starcoder2 for text-generation-with-past", done.stdout)
            self.assertIn("greedy generation 0", done.stdout)
            self.assertNotIn("FAIL", done.stdout)
            # A dense decoder: only the patches every export applies, no model type's.
            self.assertIn(
                "patches applied: dynamic_layer_lazy_initialization, type_promotion_number_operands, "
                "multi_output_pattern_first_node, rewrite_rule_root_operator_first, type_promotion_recorded_values\n",
                done.stdout,
            )
            self.assertTrue((output / "model.onnx").is_file())
            self.assertEqual(json.loads((output / "config.json").read_text())["model_type"], "starcoder2")

    def test_failure_exits_non_zero_with_one_message_and_no_output(self):
        with tempfile.TemporaryDirectory() as scratch:
            output = Path(scratch) / "out"
            done = run_cli("export", "-m", str(Path(scratch) / "missing"), str(output), "--local-files-only")
            self.assertEqual(done.returncode, 1)
            self.assertIn("error: [", done.stderr)
            self.assertIn("stage 1/9 (load)", done.stderr)
            self.assertNotIn("Traceback", done.stderr)
            self.assertFalse(output.exists())

    def test_unknown_task_is_rejected_by_the_parser(self):
        done = run_cli("export", "--demo", "out", "--task", "no-such-task")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid choice", done.stderr)


class TestLogging(unittest.TestCase):
    def test_libraries_log_from_warning_unless_verbose(self):
        import logging

        from optimum_observer import cli

        names = ("onnx_ir", "onnxscript", "torch", "onnxruntime")
        saved = {name: logging.getLogger(name).level for name in names}
        self.addCleanup(lambda: [logging.getLogger(n).setLevel(level) for n, level in saved.items()])
        quantizer = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
        cli.configure_logging(verbose=False)
        self.assertFalse(quantizer.isEnabledFor(logging.INFO))  # "skip to quantize node_..." lines
        cli.configure_logging(verbose=True)
        self.assertTrue(quantizer.isEnabledFor(logging.DEBUG))
