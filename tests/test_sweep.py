"""The coverage sweep: each type in its own process, failures recorded with their stage, resumable."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from legacy_shim.tooling import sweep
from optimum_observer.errors import RUN_FAILS_WITHOUT_OBSERVER, ErrorKind, ObserverExportError, Stage
from optimum_observer.result import CallCheck, GenerationCheck, RuntimeCheck, ValidationReport
from legacy_shim.tooling.sweep import PathResult, Runtime, Status, SweepStage, TypeResult

TASK = "text-generation-with-past"
#: gpt2 passes both paths, the observer's through optimum-onnx's class where optimum-observer is
#: not installed (a); mamba passes the observer path only (optimum-onnx has no config for it), also
#: at (a): its states are carried in value slots that plain optimum-onnx feeds (it reached only (b),
#: with the hook, before); qdqbert fails on purpose at
#: the first stage: its model class needs pytorch-quantization, which is not installed.
SAMPLE = ["gpt2", "mamba", "qdqbert"]


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
        for model_type in ("gpt2", "mamba"):
            observer = self.results[model_type].observer
            self.assertEqual(observer.status, Status.PASS, observer.error)
            self.assertGreater(observer.export_seconds, 0)
            self.assertGreater(observer.onnx_bytes, 10_000)

    def test_passing_types_record_the_patches_their_export_applied(self):
        self.assertIn("mamba_unified_mixer", self.results["mamba"].observer.patches)
        self.assertNotIn("mamba_unified_mixer", self.results["gpt2"].observer.patches)
        raw = json.loads(sweep.coverage_path(self.out, TASK).read_text())
        self.assertEqual(tuple(raw["results"]["mamba"]["observer"]["patches"]), self.results["mamba"].observer.patches)

    def test_an_export_plain_optimum_onnx_generates_with_is_at_level_a(self):
        gpt2 = self.results["gpt2"].observer
        self.assertEqual(gpt2.runtime, Runtime.WITHOUT_OBSERVER, gpt2.note)
        self.assertGreater(gpt2.without_observer_seconds, 0)

    def test_a_state_space_export_plain_optimum_onnx_generates_with_is_at_level_a(self):
        # Level (b) and its reason are shown on recorded results below (TestCoverageTable): no
        # sampled type reaches only (b) any more.
        mamba = self.results["mamba"].observer
        self.assertEqual((mamba.status, mamba.runtime), (Status.PASS, Runtime.WITHOUT_OBSERVER), mamba.note)

    def test_legacy_path_runs_where_optimum_onnx_supports_the_type(self):
        self.assertEqual(self.results["gpt2"].legacy.status, Status.PASS, self.results["gpt2"].legacy.error)
        self.assertEqual(self.results["mamba"].legacy.status, Status.UNSUPPORTED)

    def test_failure_is_recorded_with_its_stage_and_the_sweep_goes_on(self):
        failed = self.results["qdqbert"].observer
        self.assertEqual(failed.status, Status.FAIL)
        self.assertEqual(failed.stage, SweepStage.CONFIG_BUILD)
        self.assertIn("ImportError", failed.error)

    def test_coverage_json_and_markdown(self):
        raw = json.loads(sweep.coverage_path(self.out, TASK).read_text())
        self.assertEqual((raw["task"], raw["shapes"]), (TASK, "real"))
        self.assertIn("transformers", raw["versions"])
        self.assertEqual(raw["results"]["qdqbert"]["observer"]["stage"], "config build")
        self.assertEqual(raw["results"]["gpt2"]["observer"]["runtime"], Runtime.WITHOUT_OBSERVER.value)
        table = sweep.coverage_path(self.out, TASK).with_suffix(".md").read_text()
        self.assertIn("where optimum-observer is not installed (a): **2 / 3**", table)
        self.assertIn("| gpt2 | pass | (a) |", table)
        self.assertIn("| mamba | pass | (a) |", table)
        self.assertIn("| qdqbert | FAIL (config build) |  |", table)
        self.assertIn("#### config build (1)", table)
        self.assertIn(f"- **partial**: 3 of the {len(sweep.model_types_for(TASK))} model types", table)
        self.assertIn("not measured (", table)
        self.assertIn(f"## {TASK}", sweep.coverage_document(self.out))

    def test_resume_keeps_finished_types_without_running_them(self):
        with mock.patch.object(sweep, "sweep_one", side_effect=AssertionError("re-ran a finished type")):
            resumed = sweep.run_sweep(TASK, self.out, SAMPLE, resume=True, show_progress=False)
        self.assertEqual({t: r.to_json() for t, r in resumed.items()}, {t: r.to_json() for t, r in self.results.items()})

    def test_redo_measures_the_named_types_again_and_keeps_the_others(self):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch)
            shutil.copy(sweep.coverage_path(self.out, TASK), sweep.coverage_path(out, TASK))
            again = self.results["qdqbert"]
            with mock.patch.object(sweep, "sweep_one", return_value=again) as one:
                redone = sweep.run_sweep(TASK, out, ["qdqbert"], resume=True, redo=True, show_progress=False)
            caveats = sweep.load_caveats(sweep.coverage_path(out, TASK))
        self.assertEqual([c.args[0] for c in one.call_args_list], ["qdqbert"])
        self.assertEqual(sorted(redone), sorted(self.results))
        # The file says which rows were measured later than the rest.
        self.assertEqual(len(caveats), 1)
        self.assertRegex(caveats[0], r"^re-measured at .+ with --redo: qdqbert$")


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
    def _error(self, stage: Stage, reason: str = "boom", cause: BaseException | None = None, report=None, kind=None):
        error = ObserverExportError("llama", stage, reason, "try again", report=report, kind=kind or ErrorKind.FAILED)
        error.__cause__ = cause
        return error

    def test_export_failures_are_classified_by_their_stage(self):
        # The exporter's error class names no longer matter: the stage says which step failed.
        cause = RuntimeError("guard")
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.TORCH_EXPORT, cause=cause), TASK), SweepStage.TORCH_EXPORT
        )
        self.assertEqual(
            sweep.classify_observer_error(self._error(Stage.ONNX_CONVERSION, cause=cause), TASK),
            SweepStage.ONNX_CONVERSION,
        )

    def test_an_internal_error_is_a_crash_unless_onnx_runtime_raised_it(self):
        onnxruntime_error = type("Fail", (RuntimeError,), {"__module__": "onnxruntime.capi"})("cannot load")
        internal = self._error(Stage.NAMING, "internal error: KeyError: x", KeyError("x"), kind=ErrorKind.INTERNAL)
        loading = self._error(Stage.VALIDATION, "internal error: Fail", onnxruntime_error, kind=ErrorKind.INTERNAL)
        self.assertEqual(sweep.classify_observer_error(internal, TASK), SweepStage.CRASH)
        self.assertEqual(sweep.classify_observer_error(loading, TASK), SweepStage.ORT_LOAD)
        self.assertFalse(sweep.failed_in_runtime_class(loading))
        self.assertEqual(sweep._describe(internal), "KeyError: 'x'")

    def test_a_run_that_fails_without_the_observer_is_known_by_its_kind(self):
        error = self._error(Stage.CAPTURE, "the model broke", ValueError("no cache"), kind=ErrorKind.MODEL_RUN)
        self.assertEqual(sweep._without_past_after(error, TASK), "text-generation")
        self.assertEqual(sweep._describe(error), f"{RUN_FAILS_WITHOUT_OBSERVER}: ValueError: no cache")
        # The same words in the reason of another kind of failure decide nothing.
        worded = self._error(Stage.CAPTURE, f"{RUN_FAILS_WITHOUT_OBSERVER}: ...", ValueError("no cache"))
        self.assertIsNone(sweep._without_past_after(worded, TASK))

    def test_a_validation_failure_is_described_from_its_report(self):
        error = self._error(Stage.VALIDATION, "the ONNX model does not match torch", report=self.GENERATION_FAILED)
        self.assertRegex(sweep._describe(error), r"^the ONNX model does not match torch \[greedy generation 0 +FAIL\]$")

    REPLAY_FAILED = ValidationReport(1e-4, [CallCheck(0, 0.5, False)], [GenerationCheck((3,), [[1]], [[1]])])
    GENERATION_FAILED = ValidationReport(1e-4, [CallCheck(0, 0.0, True)], [GenerationCheck((3,), [[1]], [[2]])])
    OUTPUTS_FAILED = ValidationReport(1e-4, [CallCheck(0, 0.0, True)], [], [RuntimeCheck(0, "logits", 0.5, False)])

    def test_validation_failures_split_into_numerical_and_generation_parity(self):
        replay = self._error(Stage.VALIDATION, report=self.REPLAY_FAILED)
        generation = self._error(Stage.VALIDATION, report=self.GENERATION_FAILED)
        self.assertEqual(sweep.classify_observer_error(replay, TASK), SweepStage.NUMERICAL_PARITY)
        self.assertEqual(sweep.classify_observer_error(generation, TASK), SweepStage.GENERATION_PARITY)
        self.assertFalse(sweep.failed_in_runtime_class(replay))
        self.assertTrue(sweep.failed_in_runtime_class(generation))

    def test_encoder_tasks_fail_in_numerical_parity_not_generation(self):
        outputs = self._error(Stage.VALIDATION, report=self.OUTPUTS_FAILED)
        # The runtime class raised (its checks never finished): only the replay's report exists.
        raised = self._error(Stage.VALIDATION, report=ValidationReport(1e-4, [CallCheck(0, 0.0, True)], []))
        for error in (outputs, raised):
            self.assertEqual(sweep.classify_observer_error(error, "feature-extraction"), SweepStage.NUMERICAL_PARITY)
            self.assertTrue(sweep.failed_in_runtime_class(error))
        self.assertEqual(sweep.classify_observer_error(raised, TASK), SweepStage.GENERATION_PARITY)

    def test_path_result_round_trips_through_json(self):
        result = PathResult(Status.FAIL, SweepStage.CAPTURE, "IndexError: x", TASK, None, None)
        self.assertEqual(PathResult.from_json(json.loads(json.dumps(result.to_json()))), result)
        passed = PathResult(Status.PASS, None, "", TASK, 1.0, 10, Runtime.WITH_HOOK, "without optimum-observer: x",
                            patches=("dynamic_layer_lazy_initialization",))
        self.assertEqual(PathResult.from_json(json.loads(json.dumps(passed.to_json()))), passed)

    def test_results_written_before_the_runtime_levels_still_load(self):
        old = {"status": "pass", "stage": None, "error": "", "task": TASK, "export_seconds": 1.0,
               "onnx_bytes": 10, "runtime": "optimum.onnxruntime", "note": ""}  # fmt: skip
        self.assertEqual(PathResult.from_json(old).runtime, Runtime.WITH_HOOK)
        self.assertIsNone(PathResult.from_json({**old, "status": "fail", "stage": "capture"}).runtime)


def _passed(runtime: Runtime, note: str = "") -> PathResult:
    return PathResult(Status.PASS, None, "", TASK, 1.0, 10_000, runtime, note)


class TestCoverageTable(unittest.TestCase):
    """The table from results alone: runtime levels, legacy attribution, shapes."""

    RESULTS = {
        "llama": TypeResult("llama", _passed(Runtime.WITHOUT_OBSERVER), _passed(None), 1.0),
        "mamba": TypeResult(
            "mamba",
            _passed(Runtime.WITH_HOOK, "without optimum-observer: AttributeError: no num_attention_heads"),
            PathResult(Status.UNSUPPORTED),
            1.0,
        ),
        "emu3": TypeResult(
            "emu3",
            _passed(Runtime.SHIM, "with the hook: The checkpoint you are trying to load has model type x"),
            PathResult(Status.UNVALIDATED, error="the sweep's check, not optimum-onnx: ValueError: boom"),
            1.0,
        ),
    }

    def setUp(self):
        self.table = sweep.markdown(TASK, self.RESULTS, {"transformers": "4.57.6"}, "real")

    def test_headline_counts_level_a_with_b_and_c_beside_it(self):
        self.assertIn("where optimum-observer is not installed (a): **1 / 3**", self.table)
        self.assertIn("only with optimum-observer's hook installed (b): 1 (mamba)", self.table)
        self.assertIn("only through `legacy_shim`'s runtime class (c): 1 (emu3)", self.table)
        self.assertIn("observer export with validation passes, any runtime: 3 / 3", self.table)

    def test_passes_recorded_before_the_a_check_say_it_was_not_measured(self):
        self.assertNotIn("(a) not measured", self.table)
        old = {"status": "pass", "stage": None, "error": "", "task": TASK, "export_seconds": 1.0,
               "onnx_bytes": 10, "runtime": "optimum.onnxruntime", "note": ""}  # fmt: skip
        results = {**self.RESULTS, "gpt2": TypeResult("gpt2", PathResult.from_json(old), _passed(None), 1.0)}
        table = sweep.markdown(TASK, results, {"transformers": "4.57.6"}, "real")
        self.assertIn("only with optimum-observer's hook installed (b): 2 (gpt2, mamba)", table)
        self.assertIn("of which (a) not measured: 1 (recorded before the sweep checked (a)", table)

    def test_a_results_file_can_carry_caveats(self):
        table = sweep.markdown(TASK, self.RESULTS, {"transformers": "4.57.6"}, "real", ["measured with the hook on"])
        self.assertIn("- caveat: measured with the hook on", table)

    def test_rows_show_the_level_and_passes_below_a_say_why(self):
        self.assertIn("| llama | pass | (a) |", self.table)
        self.assertIn("| emu3 | pass | (c) |", self.table)
        self.assertIn("### Observer passes below (a): why the better runtime failed (2)", self.table)
        self.assertIn("- `mamba (b)`: `without optimum-observer: AttributeError: no num_attention_heads`", self.table)
        # A known reason is named before the error.
        self.assertIn("- `emu3 (c)`: the head's text config is registered only inside", self.table)

    def test_a_legacy_export_the_check_could_not_validate_is_not_a_failure(self):
        self.assertIn("legacy exporter (optimum-onnx's `main_export` and runtime classes as they ship, hook off) "
                      "with validation passes: **1 / 3** (exported, not validated by the sweep's check: 1)", self.table)  # fmt: skip
        self.assertIn("| exported, not validated | the sweep's check, not optimum-onnx: ValueError: boom |", self.table)

    def test_the_shapes_are_in_the_table_and_a_resume_refuses_other_shapes(self):
        self.assertIn("tiny models of `shapes='real'`", self.table)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "coverage.json"
            sweep.write_results(path, TASK, self.RESULTS, "mha")
            self.assertEqual(sorted(sweep.load_results(path, "mha")), sorted(self.RESULTS))
            with self.assertRaisesRegex(ValueError, "shapes='mha'"):
                sweep.load_results(path, "real")


def _worker_runtime_class_and_result(model_type: str, task: str) -> tuple[type, dict]:
    """The runtime class the sweep's worker validates `model_type` with (its export mocked to a
    (c) pass), and the result file it writes."""
    with tempfile.TemporaryDirectory() as scratch, mock.patch.object(
        sweep, "run_observer_path", return_value=_passed(Runtime.SHIM)
    ) as observer_path:
        result_file = Path(scratch) / "result.json"
        sweep._worker_main([model_type, "--task", task, "--workdir", scratch, "--result", str(result_file)])
        return observer_path.call_args.args[3], json.loads(result_file.read_text())


VLM_TASK = "image-text-to-text"


class TestImageTextToTextSweep(unittest.TestCase):
    """optimum-onnx 0.1.0 neither exports nor runs image-text-to-text: the legacy path is recorded
    as unsupported without running, and the observer export is validated through legacy_shim's
    own runtime class, at level (c) (mocked processes: the real rows are docs/coverage-data)."""

    def _sweep_one(self, observer: PathResult) -> tuple[TypeResult, mock.MagicMock]:
        with mock.patch.object(sweep, "run_path_process", return_value=observer) as process:
            return sweep.sweep_one("llava", VLM_TASK, timeout=10, legacy_types=set()), process

    def test_the_legacy_path_is_unsupported_without_running_and_says_why(self):
        result, process = self._sweep_one(dataclasses.replace(_passed(Runtime.SHIM), task=VLM_TASK))
        # One process: the observer worker; no legacy runner.
        (call,) = process.call_args_list
        self.assertIn("legacy_shim.tooling.sweep", call.args[0])
        self.assertEqual(result.legacy.status, Status.UNSUPPORTED)
        self.assertIn("optimum-onnx 0.1.0 has no image-text-to-text export", result.legacy.error)

    def test_a_runtime_class_failure_is_not_retried_through_the_same_class(self):
        failed = PathResult(Status.FAIL, SweepStage.GENERATION_PARITY, "torch [[1]] != onnx [[2]]", VLM_TASK,
                            failed_in_runtime_class=True)  # fmt: skip
        result, process = self._sweep_one(failed)
        self.assertEqual(process.call_count, 1)
        self.assertEqual(result.observer, failed)

    def test_the_sweep_asks_no_legacy_runner_for_supported_types(self):
        llava = TypeResult("llava", _passed(Runtime.SHIM), PathResult(Status.UNSUPPORTED), 1.0)
        asked = AssertionError("asked the legacy runner")
        with (
            tempfile.TemporaryDirectory() as scratch,
            mock.patch.object(sweep, "legacy_supported_types", side_effect=asked),
            mock.patch.object(sweep, "sweep_one", return_value=llava),
        ):
            results = sweep.run_sweep(VLM_TASK, Path(scratch), ["llava"], show_progress=False)
        self.assertEqual(list(results), ["llava"])

    def test_the_worker_validates_through_legacy_shims_runtime_class(self):
        from legacy_shim.runtime import ORTModelForImageTextToText

        runtime_class, result = _worker_runtime_class_and_result("llava", VLM_TASK)
        self.assertEqual(result["runtime"], Runtime.SHIM.value)
        self.assertIs(runtime_class, ORTModelForImageTextToText)

    def test_the_table_counts_level_c_and_says_why_a_and_b_do_not_apply(self):
        failed = PathResult(Status.FAIL, SweepStage.CAPTURE, "the default run cannot build image-text inputs", VLM_TASK)
        unsupported = PathResult(Status.UNSUPPORTED, error=sweep.NO_OPTIMUM_ONNX[VLM_TASK], task=VLM_TASK)
        results = {
            "llava": TypeResult("llava", dataclasses.replace(_passed(Runtime.SHIM), task=VLM_TASK), unsupported, 1.0),
            "qwen2_vl": TypeResult("qwen2_vl", failed, unsupported, 1.0),
        }
        table = sweep.markdown(VLM_TASK, results, {"transformers": "4.57.6"}, "real")
        self.assertIn("greedy tokens of `legacy_shim.ORTModelForImageTextToText` against torch's): **1 / 2**, all at "
                      "level (c)", table)  # fmt: skip
        self.assertIn("levels (a) and (b) do not apply: optimum-onnx 0.1.0 has no image-text-to-text export", table)
        self.assertIn("- legacy exporter: unsupported for every type, not run", table)
        self.assertNotIn("where optimum-observer is not installed (a)", table)
        # A (c) pass is the best this task has: nothing to explain below (a).
        self.assertNotIn("passes below (a)", table)
        self.assertIn("| llava | pass | (c) | image-text-to-text |", table)
        self.assertIn("#### capture (1)", table)

    def test_the_coverage_document_has_the_task(self):
        self.assertIn(VLM_TASK, sweep.SWEPT_TASKS)

    def test_a_default_run_that_cannot_build_inputs_is_named_before_its_cause(self):
        error = ObserverExportError(
            "qwen2_vl", Stage.CAPTURE,
            "the default run cannot build image-text inputs for this model (AttributeError: no image_size): it feeds ...",
            "pass a `run`",
        )  # fmt: skip
        error.__cause__ = AttributeError("'Qwen2VLVisionConfig' object has no attribute 'image_size'")
        described = sweep._describe(error)
        self.assertEqual(
            described,
            "the default run cannot build image-text inputs for this model: AttributeError: 'Qwen2VLVisionConfig' "
            "object has no attribute 'image_size'",
        )
        self.assertIn("llava-style inputs", sweep.known_reason(described, VLM_TASK))
        self.assertEqual(sweep.known_reason(described), "")


class TestSweepWhereOptimumOnnxCannotRun(unittest.TestCase):
    """On transformers 5 optimum-onnx 0.1.0 neither exports nor runs (its exporter fails at import,
    its runtime classes are legacy_shim's adaptation): the sweep records the legacy path as not run
    with optimum_compat's reason, validates through legacy_shim's class (level (c)) and titles the
    table with the transformers version (availability mocked; the real rows: docs/coverage-data/transformers-5)."""

    REASON = "optimum-onnx 0.1.0 requires transformers<4.58.0,>=4.36, and transformers 5.25.0 is installed"

    def setUp(self):
        from legacy_shim import optimum_compat

        unavailable = optimum_compat.Availability(False, self.REASON)
        patcher = mock.patch.object(optimum_compat, "legacy_exporter_status", return_value=unavailable)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_the_reason_is_optimum_compats(self):
        self.assertEqual(sweep.optimum_onnx_absent(TASK), f"optimum-onnx cannot run here: {self.REASON}")
        # A task optimum-onnx never had keeps its own reason.
        self.assertEqual(sweep.optimum_onnx_absent(VLM_TASK), sweep.NO_OPTIMUM_ONNX[VLM_TASK])

    def test_no_legacy_runner_runs_and_the_legacy_path_says_why(self):
        with mock.patch.object(sweep, "run_path_process", return_value=_passed(Runtime.SHIM)) as process:
            result = sweep.sweep_one("llama", TASK, timeout=10, legacy_types={"llama"})
        (call,) = process.call_args_list
        self.assertIn("legacy_shim.tooling.sweep", call.args[0])
        self.assertEqual(result.legacy.status, Status.UNSUPPORTED)
        self.assertIn(self.REASON, result.legacy.error)

    def test_the_worker_validates_through_legacy_shims_runtime_class(self):
        from legacy_shim.runtime import ORTModelForCausalLM

        runtime_class, result = _worker_runtime_class_and_result("llama", TASK)
        self.assertEqual(result["runtime"], Runtime.SHIM.value)
        self.assertIs(runtime_class, ORTModelForCausalLM)

    def test_the_file_records_the_reason_and_the_document_titles_the_version(self):
        unsupported = PathResult(Status.UNSUPPORTED, error=sweep.optimum_onnx_absent(TASK), task=TASK)
        results = {"llama": TypeResult("llama", _passed(Runtime.SHIM), unsupported, 1.0)}
        with tempfile.TemporaryDirectory() as scratch, mock.patch.object(
            sweep, "versions", return_value={"transformers": "5.25.0"}
        ):
            out = Path(scratch)
            sweep.write_results(sweep.coverage_path(out / "transformers-5", TASK), TASK, results, "real", (),
                                sweep.optimum_onnx_absent(TASK))  # fmt: skip
            document = sweep.coverage_document(out)
        self.assertIn(f"## {TASK} on transformers 5.25.0", document)
        self.assertIn("**1 / 1**, all at level (c)", document)
        self.assertIn(f"levels (a) and (b) do not apply: optimum-onnx cannot run here: {self.REASON}", document)
        self.assertNotIn("where optimum-observer is not installed (a)", document)


    def test_a_table_of_another_version_is_not_held_to_the_installed_mapping(self):
        # Regenerated into docs/coverage.md from the default venv, a transformers-5 table must not
        # read as "partial" against transformers 4.57.6's causal-LM mapping.
        unsupported = PathResult(Status.UNSUPPORTED, error=sweep.optimum_onnx_absent(TASK), task=TASK)
        results = {"llama": TypeResult("llama", _passed(Runtime.SHIM), unsupported, 1.0)}
        installed = sweep.versions()["transformers"]
        other = sweep.markdown(TASK, results, {"transformers": "5.25.0"}, "real")
        same = sweep.markdown(TASK, results, {"transformers": installed}, "real")
        self.assertNotIn("**partial**", other)
        self.assertIn("**partial**: 1 of the", same)


class TestTaskForCacheArgument(unittest.TestCase):
    def test_a_forward_taking_cache_keeps_the_task_with_past(self):
        # transformers 5 names the cache argument `cache`; the sweep exported the tiny llama without past.
        class Model:
            def forward(self, input_ids=None, attention_mask=None, cache=None):
                pass

        self.assertEqual(sweep._task_for(Model(), TASK), TASK)

        class NoCache:
            def forward(self, input_ids=None, attention_mask=None):
                pass

        self.assertEqual(sweep._task_for(NoCache(), TASK), "text-generation")
