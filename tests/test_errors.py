"""Structured errors: every stage failure is an ObserverExportError whose attributes say what failed.

An exception a stage did not expect comes out as that stage's error of kind "internal error",
chained; torch.export and the ONNX conversion are two stages, told apart by the exporter's error
class; a validation failure carries its report. Ctrl-C and termination pass through unchanged.
"""

from __future__ import annotations

import unittest
from pathlib import Path
from unittest import mock

import torch

from failure_case import ExportFailureCase
from legacy_shim.tooling import tiny_configs
from optimum_observer import conversion, pipeline, synthesis
from optimum_observer.errors import ErrorKind, ObserverExportError, Stage
from optimum_observer.families import RuntimeChecks
from optimum_observer.result import GenerationCheck
from optimum_observer.signals import Terminated
from optimum_observer.synthesis import ExportExample
from optimum_observer.tasks import ContractInput, ContractOutput, GraphContract, get_task
from optimum_observer.validation import ValidationInputs

TASK = get_task("text-generation-with-past")
GRAPH = GraphContract("model.onnx", (ContractInput("input_ids"),), (ContractOutput("logits"),), use_cache=None)


class _Logits(torch.nn.Module):
    """A model whose forward returns `{"logits": body(input_ids)}`, as the contract reads it."""

    def forward(self, input_ids=None, return_dict=True):
        return {"logits": self.body(input_ids)}


class _DataDependentBranch(_Logits):
    def body(self, x):
        return x * 2 if x.sum() > 0 else x * 3


class _NoOnnxFunction(_Logits):
    def body(self, x):
        return torch.special.bessel_j0(x)


def _convert_error(model: torch.nn.Module) -> ObserverExportError:
    dims = {0: "batch_size", 1: "sequence_length"}
    example = ExportExample({"input_ids": torch.ones(2, 3)}, {"input_ids": dims}, [], {})
    try:
        conversion.convert(model, GRAPH, example, "toy", patches=[])
    except ObserverExportError as error:
        return error
    raise AssertionError("the export did not fail")


class TestTorchExportAndConversionAreTwoStages(unittest.TestCase):
    def test_a_graph_torch_export_cannot_capture_fails_at_torch_export(self):
        error = _convert_error(_DataDependentBranch())
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertEqual(type(error.__cause__).__name__, "TorchExportError")
        self.assertIn(f"stage 4/{len(Stage)} (torch.export)", str(error))

    def test_an_operator_without_an_onnx_function_fails_at_the_conversion(self):
        error = _convert_error(_NoOnnxFunction())
        self.assertEqual(error.stage, Stage.ONNX_CONVERSION)
        self.assertEqual(type(error.__cause__).__name__, "ConversionError")
        self.assertIn(f"stage 5/{len(Stage)} (ONNX conversion)", str(error))


class TestUnexpectedExceptions(ExportFailureCase):
    export_kwargs = {"validate": False, "show_progress": False}

    @classmethod
    def setUpClass(cls):
        cls.model = tiny_configs.build_tiny_model("llama", TASK.auto_model_class).eval()

    def test_an_unexpected_exception_in_a_stage_is_that_stages_internal_error(self):
        with mock.patch.object(synthesis, "synthesize", side_effect=KeyError("leaf")):
            error = self.export_error(self.model)
        self.assertFailsCleanly(error, "llama", Stage.SYNTHESIS)
        self.assertIs(error.kind, ErrorKind.INTERNAL)
        self.assertIn("internal error: KeyError: 'leaf'", str(error))
        self.assertIsInstance(error.__cause__, KeyError)

    def test_before_the_model_is_loaded_the_error_names_the_path(self):
        with mock.patch.object(pipeline.loading, "load", side_effect=AttributeError("config")):
            error = self.export_error(str(self.scratch / "model"))
        self.assertEqual((error.stage, error.kind), (Stage.LOAD, ErrorKind.INTERNAL))
        self.assertEqual(error.model_type, str(self.scratch / "model"))

    def test_an_expected_failure_keeps_its_kind(self):
        error = self.export_error(self.model, run=lambda model: None)
        self.assertEqual((error.stage, error.kind), (Stage.CAPTURE, ErrorKind.FAILED))

    def test_arguments_torch_does_not_know_are_refused_before_any_stage_as_before(self):
        with mock.patch.object(pipeline.loading, "load") as load:
            with self.assertRaises(ValueError):
                pipeline.export(self.model, self.output, dtype="fp64", **self.export_kwargs)
            with self.assertRaises(RuntimeError):
                pipeline.export(self.model, self.output, device="no-such-device", **self.export_kwargs)
        load.assert_not_called()

    def test_a_device_the_machine_lacks_is_a_load_failure_with_a_remedy(self):
        move = torch.nn.Module.to

        def to(module, *args, **kwargs):
            if args == ("cpu",):
                raise RuntimeError("no such device here")
            return move(module, *args, **kwargs)

        with mock.patch.object(torch.nn.Module, "to", to):
            error = self.export_error(self.model, device="cpu")
        self.assertFailsCleanly(error, "llama", Stage.LOAD)
        self.assertIs(error.kind, ErrorKind.FAILED)
        self.assertIn("device='cpu'", error.remedy)

    def test_ctrl_c_and_termination_pass_through_unchanged(self):
        for interruption in (KeyboardInterrupt(), Terminated(15)):
            with self.subTest(type(interruption).__name__):
                with mock.patch.object(synthesis, "synthesize", side_effect=interruption):
                    with self.assertRaises(type(interruption)):
                        pipeline.export(self.model, self.output, **self.export_kwargs)
                self.assertFalse(self.output.exists())


class _FailingFamily:
    """Stands for a task family whose runtime check returns `checks` or raises `error`."""

    def __init__(self, checks: RuntimeChecks | None = None, error: Exception | None = None):
        self.checks, self.error = checks, error

    def check_runtime(self, inputs: ValidationInputs) -> RuntimeChecks:
        if self.error is not None:
            raise self.error
        return self.checks


def _checking(family) -> pipeline._Checking:
    runtime_class = type("StubRuntime", (), {})
    inputs = ValidationInputs(Path("unused"), None, TASK, runtime_class)
    return pipeline._Checking(inputs, family, graphs=[], model_type="llama")


class TestValidationReportAttached(unittest.TestCase):
    def test_a_mismatch_carries_the_report_of_every_check(self):
        checks = RuntimeChecks([GenerationCheck((3,), [[1, 2]], [[1, 5]])], [])
        with self.assertRaises(ObserverExportError) as caught:
            pipeline._validate(_checking(_FailingFamily(checks)))
        error = caught.exception
        self.assertEqual((error.stage, error.kind), (Stage.VALIDATION, ErrorKind.FAILED))
        self.assertEqual(error.report.generation, checks.generation)
        self.assertFalse(error.report.ok)
        self.assertEqual(len(error.report.failures()), 1)

    def test_a_runtime_class_that_raises_carries_the_replay_report(self):
        with self.assertRaises(ObserverExportError) as caught:
            pipeline._validate(_checking(_FailingFamily(error=ValueError("cannot load"))))
        self.assertEqual(caught.exception.stage, Stage.VALIDATION)
        self.assertIsNotNone(caught.exception.report)
        self.assertEqual(caught.exception.report.generation, [])


if __name__ == "__main__":
    unittest.main()
