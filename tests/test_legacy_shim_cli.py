"""`optimum-cli export onnx --exporter {auto,legacy,observer}`, run as a subprocess.

Needs the package installed (the flag comes through optimum's `optimum.commands.register`
namespace, which the installation extends).
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import transformers
from parameterized import parameterized

import legacy_shim
from shim_helpers import UNSUPPORTED_TYPE, assert_same_export, ort_greedy, run_cli, torch_greedy

WITH_PAST = "text-generation-with-past"


class TestCli(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory()
        cls.root = Path(cls.scratch.name)
        cls.gpt2 = cls.artifacts.causal_lm("gpt2")
        cls.unsupported = cls.artifacts.causal_lm(UNSUPPORTED_TYPE)
        # A model type without a causal-LM head: the observer fails at its load stage.
        transformers.AutoConfig.for_model(
            "t5", vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2
        ).save_pretrained(cls.root / "t5")

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def export(self, *args: str):
        return run_cli("export", "onnx", *args, cwd=self.root)

    def test_help_lists_the_flag_and_keeps_every_upstream_flag(self):
        done = self.export("--help")
        self.assertEqual(done.returncode, 0, done.stderr)
        help_text = " ".join(done.stdout.split())
        self.assertIn("--exporter {auto,legacy,observer}", help_text)
        self.assertIn("legacy: always optimum-onnx; observer: always optimum-observer", help_text)
        for flag in (
            "--task",
            "--opset",
            "--device",
            "--dtype",
            "--optimize",
            "--monolith",
            "--no-post-process",
            "--framework",
            "--atol",
            "--trust-remote-code",
            "--library-name",
            "--model-kwargs",
            "--no-dynamic-axes",
            "--no-constant-folding",
            "--slim",
            "--batch_size",
            "--sequence_length",
        ):
            self.assertIn(flag, help_text)

    def test_off_switch_removes_the_flag(self):
        done = run_cli("export", "onnx", "--help", cwd=self.root, OPTIMUM_OBSERVER_DISABLE="1")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("--exporter", done.stdout)
        self.assertIn("--task", done.stdout)

    def test_auto_sends_an_unsupported_type_to_the_observer(self):
        output = self.root / "auto_unsupported"
        done = self.export("-m", str(self.unsupported), "--task", WITH_PAST, str(output))
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn(
            f"{UNSUPPORTED_TYPE} / {WITH_PAST} -> observer: optimum-onnx has no OnnxConfig", done.stderr
        )
        model = legacy_shim.ORTModelForCausalLM.from_pretrained(output)
        self.assertEqual(ort_greedy(model, output), torch_greedy(self.unsupported))

    def test_legacy_flag_matches_optimum_onnx(self):
        output = self.root / "gpt2_cli"
        done = self.export("-m", str(self.gpt2), "--task", WITH_PAST, "--exporter", "legacy", str(output))
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn(f"gpt2 / {WITH_PAST} -> legacy: --exporter=legacy was set", done.stderr)
        # optimum-onnx's own export of the same tiny gpt2 is the session's.
        assert_same_export(self, self.artifacts.legacy_export("gpt2"), output)

    @parameterized.expand(
        [
            (
                "unknown_model_path",
                ["-m", "/no/such/model", "--task", WITH_PAST],
                1,
                "error: the model directory /no/such/model does not exist",
            ),
            (
                "unknown_task",
                ["-m", "{gpt2}", "--task", "not-a-task"],
                1,
                "error: ValueError: Asked to export a gpt2 model for the task not-a-task",
            ),
            ("unknown_exporter", ["-m", "{gpt2}", "--exporter", "dynamo"], 2, "invalid choice: 'dynamo'"),
            (
                "observer_failure",
                ["-m", "{t5}", "--task", WITH_PAST, "--exporter", "observer"],
                1,
                "error: ObserverExportError: [t5] observer export failed at stage 1/",
            ),
        ]
    )
    def test_errors_exit_non_zero_with_one_message(self, name, args, returncode, message):
        output = self.root / f"error_{name}"
        args = [a.format(gpt2=self.gpt2, t5=self.root / "t5") for a in args]
        done = self.export(*args, str(output))
        self.assertEqual(done.returncode, returncode, done.stderr[-3000:])
        self.assertIn(message, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertFalse(output.exists())

    def test_verbose_shows_the_traceback(self):
        output = self.root / "verbose"
        done = self.export(
            "-m",
            str(self.root / "t5"),
            "--task",
            WITH_PAST,
            "--exporter",
            "observer",
            "--verbose",
            str(output),
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("Traceback", done.stderr)
        self.assertFalse(output.exists())
