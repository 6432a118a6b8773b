"""legacy_shim where optimum-onnx's exporter cannot run (transformers 5): routing, lent names, generation seams.

Cheap and version-independent: the router is given the availability explicitly, the lending is
checked on plain objects, the generation seams on a stand-in upstream class. The end-to-end
checks on transformers 5 are in test_transformers5.py.
"""

from __future__ import annotations

import subprocess
import sys
import types
import unittest
from unittest import mock

import torch
import transformers
from packaging.version import Version

from legacy_shim import ShimError, optimum_compat
from legacy_shim.runtime import GenerationSeams
from legacy_shim.optimum_compat import Availability
from legacy_shim.registry import MigrationRegistry
from legacy_shim.router import DecisionSource, Exporter, RouteRequest, decide
from legacy_shim.routes import ROUTES, ExportCall

WITH_PAST = "text-generation-with-past"
CANNOT_RUN = Availability(False, "optimum-onnx 0.1.0 requires transformers<4.58.0,>=4.36, and transformers 5.25.0 is installed")
EMPTY_REGISTRY = MigrationRegistry(path=None, entries=())  # type: ignore[arg-type]


def decide_where_legacy_cannot_run(request: RouteRequest, **overrides):
    return decide(request, environ={}, registry=EMPTY_REGISTRY, legacy=CANNOT_RUN, **overrides)


class TestLegacyExporterStatus(unittest.TestCase):
    def test_status_follows_optimum_onnx_declared_transformers_range(self):
        status = optimum_compat.legacy_exporter_status()
        inside = Version(transformers.__version__) < Version("4.58")
        self.assertEqual(status.available, inside, status.reason)
        if not inside:
            self.assertIn(f"transformers {transformers.__version__} is installed", status.reason)
            self.assertIn("optimum-onnx 0.1.0 requires transformers<4.58", status.reason)


class TestRoutingWhereLegacyCannotRun(unittest.TestCase):
    def test_a_type_optimum_onnx_supports_goes_to_the_observer_and_the_reason_says_why(self):
        decision = decide_where_legacy_cannot_run(RouteRequest("llama", WITH_PAST))
        self.assertEqual((decision.exporter, decision.source), (Exporter.OBSERVER, DecisionSource.DEFAULT))
        self.assertIn("optimum-onnx's exporter cannot run here", decision.reason)
        self.assertIn(CANNOT_RUN.reason, decision.explain())

    def test_an_unresolved_model_goes_to_the_observer_which_reports_it(self):
        decision = decide_where_legacy_cannot_run(RouteRequest("/no/such/dir", "auto", unresolved="OSError: no config"))
        self.assertEqual(decision.exporter, Exporter.OBSERVER)
        self.assertIn("OSError: no config", decision.reason)

    def test_legacy_only_arguments_stay_on_legacy_whose_route_explains(self):
        decision = decide_where_legacy_cannot_run(
            RouteRequest("llama", WITH_PAST, legacy_only_arguments=("custom_onnx_configs",))
        )
        self.assertEqual(decision.exporter, Exporter.LEGACY)
        self.assertIn("cannot run here", decision.reason)
        call = ExportCall({"model_name_or_path": "m"}, {}, "llama", WITH_PAST)
        with mock.patch("legacy_shim.routes.legacy_exporter_status", return_value=CANNOT_RUN):
            result = ROUTES[Exporter.LEGACY](call, decision)
        self.assertFalse(result.success)
        self.assertIsInstance(result.exception, ShimError)
        self.assertIn(CANNOT_RUN.reason, str(result.exception))
        self.assertIn("exporter='observer'", str(result.exception))

    def test_explicit_overrides_keep_their_precedence(self):
        decision = decide_where_legacy_cannot_run(RouteRequest("llama", WITH_PAST), argument="legacy")
        self.assertEqual((decision.exporter, decision.source), (Exporter.LEGACY, DecisionSource.ARGUMENT))

    def test_where_legacy_can_run_the_default_is_unchanged(self):
        decision = decide(
            RouteRequest("starcoder2", WITH_PAST), environ={}, registry=EMPTY_REGISTRY, legacy=Availability(True)
        )
        self.assertEqual(decision.exporter, Exporter.OBSERVER)
        self.assertIn("has no OnnxConfig", decision.reason)


class TestLentNames(unittest.TestCase):
    def test_a_missing_name_is_lent_for_the_block_only(self):
        owner = types.SimpleNamespace()
        with optimum_compat._lent(owner, "gone", 1) as lent:
            self.assertTrue(lent)
            self.assertEqual(owner.gone, 1)
        self.assertFalse(hasattr(owner, "gone"))

    def test_an_existing_name_is_never_replaced(self):
        owner = types.SimpleNamespace(kept="original")
        with optimum_compat._lent(owner, "kept", "other") as lent:
            self.assertFalse(lent)
            self.assertEqual(owner.kept, "original")
        self.assertEqual(owner.kept, "original")

    def test_removed_also_when_the_block_raises(self):
        owner = types.SimpleNamespace()
        with self.assertRaises(RuntimeError), optimum_compat._lent(owner, "gone", 1):
            raise RuntimeError("import failed")
        self.assertFalse(hasattr(owner, "gone"))

    def test_transformers_is_left_as_it_was(self):
        def present():
            return {
                (module, name): hasattr(__import__(module, fromlist=["_"]), name)
                for module, name in optimum_compat.MISSING_NAMES
            }

        before = present()
        with optimum_compat.lent_names() as lent:
            self.assertTrue(all(present().values()))
            self.assertEqual(sorted(lent), sorted(k for k, v in before.items() if not v))
        self.assertEqual(present(), before)

    def test_exporter_only_stand_ins_name_the_remedy(self):
        with self.assertRaises(optimum_compat.LegacyExporterUnavailable) as caught:
            optimum_compat._exporter_only("get_parameter_dtype")(torch.nn.Linear(1, 1))
        self.assertIn("exporter='observer'", str(caught.exception))


class TestImportInAFreshInterpreter(unittest.TestCase):
    def test_the_runtime_classes_import_with_nothing_imported_before(self):
        # On transformers 5, importing optimum-onnx's modules puts a new `transformers` module
        # object in sys.modules midway; the names lent to the old one were lost ("cannot import
        # name 'AutoModelForVision2Seq' from 'transformers'") until they were lent again.
        code = "import transformers, legacy_shim.modeling; print(legacy_shim.modeling.ORTModelForCausalLM.__name__)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertEqual(done.stdout.strip(), "ORTModelForCausalLM")


class _FailingRuntimeModule(types.ModuleType):
    """`optimum.onnxruntime` on transformers 5: the package imports, reading a class raises."""

    def __getattr__(self, name):
        raise ImportError("cannot import name 'get_parameter_dtype' from 'transformers.modeling_utils'")


class TestValidationWhereTheRuntimeClassFailsAtImport(unittest.TestCase):
    def test_generation_parity_is_skipped_with_a_warning_not_a_crash(self):
        import optimum

        from optimum_observer import validation
        from optimum_observer.tasks import get_task

        failing = _FailingRuntimeModule("optimum.onnxruntime")
        with (
            mock.patch.dict(sys.modules, {"optimum.onnxruntime": failing}),
            mock.patch.object(optimum, "onnxruntime", failing, create=True),
            self.assertLogs("optimum_observer.validation", "WARNING") as logs,
        ):
            self.assertIsNone(validation.default_runtime_class(get_task(WITH_PAST)))
        self.assertIn("get_parameter_dtype", logs.output[0])
        self.assertIn("runtime_class=", logs.output[0])


class _Upstream:
    """Stands for optimum's class under transformers 5's `prepare_inputs_for_generation`."""

    input_names = ["input_ids", "attention_mask", "past_key_values.0.key"]

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = {"input_ids": input_ids[:, -1:]}
        if kwargs.get("cache") is not None:
            inputs["cache"] = kwargs["cache"]
        if kwargs.get("attention_mask") is not None:
            inputs["attention_mask"] = kwargs["attention_mask"]
        return inputs


class _Seamed(GenerationSeams, _Upstream):
    pass


class TestGenerationSeams(unittest.TestCase):
    def test_the_cache_reaches_forward_as_past_key_values(self):
        past = ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),)
        inputs = _Seamed().prepare_inputs_for_generation(torch.ones(1, 4, dtype=torch.long), cache=past)
        self.assertIs(inputs["past_key_values"], past)
        self.assertNotIn("cache", inputs)

    def test_a_dropped_all_ones_mask_is_rebuilt_over_past_and_new_tokens(self):
        inputs = _Seamed().prepare_inputs_for_generation(torch.ones(2, 7, dtype=torch.long))
        torch.testing.assert_close(inputs["attention_mask"], torch.ones(2, 7, dtype=torch.long))

    def test_a_given_mask_is_kept(self):
        mask = torch.tensor([[0, 1, 1]])
        inputs = _Seamed().prepare_inputs_for_generation(torch.ones(1, 3, dtype=torch.long), attention_mask=mask)
        self.assertIs(inputs["attention_mask"], mask)

    def test_an_onnx_model_runs_no_remote_code_and_has_no_expert_kernels_to_switch(self):
        self.assertFalse(_Seamed().is_remote_code())
        self.assertEqual(_Seamed().get_experts_implementation(), {})
