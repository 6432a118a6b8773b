"""The coverage sweep: each type in its own process, failures recorded with their stage, resumable."""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from optimum_observer import sweep
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.sweep import PathResult, Status, SweepStage

TASK = "text-generation-with-past"
#: gpt2 passes both paths; bert passes the observer path only (optimum-onnx has no causal-LM
#: config for it); mamba passes the observer path through optimum's class only with the hook
#: installed in this environment (it feeds the states by name); qdqbert fails on purpose at the first stage: its model
#: class needs pytorch-quantization, which is not installed.
SAMPLE = ["gpt2", "bert", "mamba", "qdqbert"]


class TestSweepSample(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._scratch = tempfile.TemporaryDirectory()
        cls.out = Path(cls._scratch.name)
        cls.results = sweep.run_sweep(TASK, cls.out, SAMPLE, timeout=600, show_progress=False)

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def test_every_type_has_a_result(self):
        self.assertEqual(sorted(self.results), sorted(SAMPLE))

    def test_passing_types_record_time_and_size(self):
        for model_type in ("gpt2", "bert"):
            observer = self.results[model_type].observer
            self.assertEqual(observer.status, Status.PASS, observer.error)
            self.assertGreater(observer.export_seconds, 0)
            self.assertGreater(observer.onnx_bytes, 10_000)

    def test_runtime_the_export_generates_through_is_recorded(self):
        self.assertEqual(self.results["gpt2"].observer.runtime, sweep.UNCHANGED_RUNTIME)
        mamba = self.results["mamba"].observer
        self.assertEqual(mamba.status, Status.PASS, mamba.error)
        self.assertEqual(mamba.runtime, sweep.UNCHANGED_RUNTIME)

    def test_legacy_path_runs_where_optimum_onnx_supports_the_type(self):
        self.assertEqual(self.results["gpt2"].legacy.status, Status.PASS, self.results["gpt2"].legacy.error)
        self.assertEqual(self.results["bert"].legacy.status, Status.UNSUPPORTED)

    def test_failure_is_recorded_with_its_stage_and_the_sweep_goes_on(self):
        failed = self.results["qdqbert"].observer
        self.assertEqual(failed.status, Status.FAIL)
        self.assertEqual(failed.stage, SweepStage.CONFIG_BUILD)
        self.assertIn("ImportError", failed.error)

    def test_coverage_json_and_markdown(self):
        raw = json.loads(sweep.coverage_path(self.out, TASK).read_text())
        self.assertEqual(raw["task"], TASK)
        self.assertIn("transformers", raw["versions"])
        self.assertEqual(raw["results"]["qdqbert"]["observer"]["stage"], "config build")
        table = sweep.coverage_path(self.out, TASK).with_suffix(".md").read_text()
        self.assertIn("observer export with validation passes: **3 / 4** (3 validated through the unchanged", table)
        self.assertIn("only through `legacy_shim`'s runtime class: mamba)", table)
        self.assertIn("| mamba | pass (shim runtime) |", table)
        self.assertIn("| qdqbert | FAIL (config build) |", table)
        self.assertIn("#### config build (1)", table)
        self.assertIn(f"- **partial**: 4 of the {len(sweep.model_types_for(TASK))} model types", table)
        self.assertIn("not measured (", table)
        self.assertIn(f"## {TASK}", sweep.coverage_document(self.out))

    def test_resume_keeps_finished_types_without_running_them(self):
        with mock.patch.object(sweep, "sweep_one", side_effect=AssertionError("re-ran a finished type")):
            resumed = sweep.run_sweep(TASK, self.out, SAMPLE, resume=True, show_progress=False)
        self.assertEqual({t: r.to_json() for t, r in resumed.items()}, {t: r.to_json() for t, r in self.results.items()})


class TestSweepIsolation(unittest.TestCase):
    def test_a_hanging_type_is_recorded_as_over_the_time_limit(self):
        with tempfile.TemporaryDirectory() as scratch:
            result_file = Path(scratch) / "never-written.json"
            result = sweep.run_path_process(["sleep", "30"], result_file, timeout=1, task=TASK)
        self.assertEqual((result.status, result.stage), (Status.FAIL, SweepStage.TIME_LIMIT))

    def test_a_crashing_type_is_recorded_with_its_last_error_line(self):
        with tempfile.TemporaryDirectory() as scratch:
            command = ["python3", "-c", "import sys; sys.exit('segfault-like death')"]
            result = sweep.run_path_process(command, Path(scratch) / "none.json", timeout=30, task=TASK)
        self.assertEqual(result.stage, SweepStage.CRASH)
        self.assertIn("segfault-like death", result.error)

    def test_unknown_model_types_are_rejected_before_running(self):
        with tempfile.TemporaryDirectory() as scratch, self.assertRaises(ValueError):
            sweep.run_sweep(TASK, Path(scratch), ["not-a-model-type"])


class TestStageClassification(unittest.TestCase):
    def _error(self, stage: Stage, reason: str = "boom", cause: BaseException | None = None):
        error = ObserverExportError("llama", stage, reason, "try again")
        error.__cause__ = cause
        return error

    def test_export_failures_split_into_torch_export_and_conversion(self):
        torch_export_error = type("TorchExportError", (RuntimeError,), {})("guard")
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.EXPORT, cause=torch_export_error)), SweepStage.TORCH_EXPORT
        )
        conversion_error = type("ConversionError", (RuntimeError,), {})("no onnx function")
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.EXPORT, cause=conversion_error)), SweepStage.ONNX_CONVERSION
        )

    def test_validation_failures_split_into_numerical_and_generation_parity(self):
        replay = "the ONNX model does not match torch:\nobserved call 0       0.5  FAIL\ngreedy generation 0   ok"
        generation = "the ONNX model does not match torch:\nobserved call 0       0  ok\ngreedy generation 0   FAIL"
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.VALIDATION, replay)), SweepStage.NUMERICAL_PARITY
        )
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.VALIDATION, generation)), SweepStage.GENERATION_PARITY
        )

    def test_path_result_round_trips_through_json(self):
        result = PathResult(Status.FAIL, SweepStage.CAPTURE, "IndexError: x", TASK, None, None)
        self.assertEqual(PathResult.from_json(json.loads(json.dumps(result.to_json()))), result)
