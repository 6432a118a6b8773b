"""Types optimum-onnx rejects go to the observer, and export models that generate like torch."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import optimum.onnxruntime.modeling_decoder as upstream_decoder
from parameterized import parameterized

import legacy_shim
from legacy_shim import ShimError, main_export
from legacy_shim.observer_arguments import observer_arguments
from legacy_shim.router import Exporter
from shim_helpers import UNSUPPORTED_TYPE, ort_greedy, save_causal_lm, save_encoder, torch_greedy

WITH_PAST = "text-generation-with-past"


class TestObserverRoute(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory()
        cls.model = save_causal_lm(UNSUPPORTED_TYPE, Path(cls.scratch.name) / "model")
        cls.torch_tokens = torch_greedy(cls.model)

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_main_export_auto_uses_the_observer_and_generates_like_torch(self):
        output = Path(self.scratch.name) / "main_export"
        result = main_export(str(self.model), output, task=WITH_PAST)
        self.assertEqual(result.route, Exporter.OBSERVER)
        self.assertIn("optimum-onnx has no OnnxConfig for starcoder2", result.decision.reason)
        self.assertTrue(result.observer_result.validation.ok)
        self.assertTrue((output / "model.onnx").is_file())
        ort_model = legacy_shim.ORTModelForCausalLM.from_pretrained(output)
        self.assertEqual(ort_greedy(ort_model, output), self.torch_tokens)

    def test_from_pretrained_export_uses_the_router_and_generates_like_torch(self):
        upstream_before = upstream_decoder.main_export
        ort_model = legacy_shim.ORTModelForCausalLM.from_pretrained(self.model, export=True)
        self.assertIsInstance(ort_model, legacy_shim.ORTModelForCausalLM)
        self.assertEqual(ort_greedy(ort_model, self.model), self.torch_tokens)
        self.assertIs(upstream_decoder.main_export, upstream_before)

    def test_from_pretrained_export_with_the_legacy_exporter_fails_as_upstream(self):
        upstream_before = upstream_decoder.main_export
        with self.assertRaisesRegex(ValueError, "custom or unsupported architecture"):
            legacy_shim.ORTModelForCausalLM.from_pretrained(self.model, export=True, exporter="legacy")
        self.assertIs(upstream_decoder.main_export, upstream_before)

    def test_observer_rejects_legacy_only_arguments_at_once(self):
        output = Path(self.scratch.name) / "rejected"
        with self.assertRaises(ShimError) as caught:
            main_export(
                str(self.model),
                output,
                task=WITH_PAST,
                exporter="observer",
                optimize="O1",
                slim=True,
                batch_size=4,
            )
        message = str(caught.exception)
        for fragment in (
            "[starcoder2] argument mapping",
            "optimize='O1'",
            "slim=True",
            "batch_size=4",
            "Next steps",
        ):
            self.assertIn(fragment, message)
        self.assertFalse(output.exists())


class TestObserverTaskSupport(unittest.TestCase):
    def test_observer_on_a_task_it_does_not_export_is_a_clear_error(self):
        with tempfile.TemporaryDirectory() as scratch:
            model = save_encoder("bert", Path(scratch) / "bert")
            with self.assertRaisesRegex(
                ShimError,
                r"\[bert\] routing: the observer exporter does not export the task 'multiple-choice'",
            ):
                main_export(str(model), Path(scratch) / "out", task="multiple-choice", exporter="observer")
            self.assertFalse((Path(scratch) / "out").exists())


def _legacy_call(**overrides):
    arguments = dict(
        model_name_or_path="some/model",
        output="out",
        task="auto",
        opset=None,
        device="cpu",
        dtype=None,
        optimize=None,
        monolith=False,
        no_post_process=False,
        framework="pt",
        atol=None,
        pad_token_id=None,
        subfolder="",
        revision="main",
        force_download=False,
        local_files_only=False,
        trust_remote_code=False,
        cache_dir="cache",
        token=None,
        do_validation=True,
        model_kwargs=None,
        custom_onnx_configs=None,
        fn_get_submodels=None,
        use_subprocess=False,
        _variant="default",
        library_name=None,
        no_dynamic_axes=False,
        do_constant_folding=True,
        slim=False,
    )
    arguments.update(overrides)
    return arguments


class TestObserverArguments(unittest.TestCase):
    def test_maps_the_arguments_that_make_sense(self):
        mapped = observer_arguments(
            _legacy_call(
                opset=18, dtype="fp16", do_validation=False, atol=1e-3, trust_remote_code=True, token="t"
            ),
            {},
            task=WITH_PAST,
            model_name="llama",
        )
        self.assertEqual(
            mapped,
            dict(
                model="some/model",
                output_dir="out",
                task=WITH_PAST,
                opset=18,
                dtype="fp16",
                device="cpu",
                trust_remote_code=True,
                model_kwargs=None,
                validate=False,
                local_files_only=False,
                cache_dir="cache",
                revision="main",
                token="t",
                subfolder="",
                atol=1e-3,
            ),
        )

    def test_cli_defaults_are_accepted(self):
        from optimum.utils import DEFAULT_DUMMY_SHAPES

        mapped = observer_arguments(
            _legacy_call(use_subprocess=True, no_post_process=True),
            dict(DEFAULT_DUMMY_SHAPES),
            task=WITH_PAST,
            model_name="llama",
        )
        self.assertNotIn("atol", mapped)

    @parameterized.expand(
        [
            ("custom_onnx_configs", {"model": object()}),
            ("fn_get_submodels", len),
            ("monolith", True),
            ("optimize", "O2"),
            ("no_dynamic_axes", True),
            ("do_constant_folding", False),
            ("_variant", "with-past"),
            ("library_name", "timm"),
            ("pad_token_id", 0),
            ("force_download", True),
        ]
    )
    def test_rejects(self, name, value):
        with self.assertRaisesRegex(ShimError, f"{name}="):
            observer_arguments(_legacy_call(**{name: value}), {}, task=WITH_PAST, model_name="llama")


class TestObserverRouteValidatesWithTheShimRuntime(unittest.TestCase):
    def test_grouped_query_model_of_a_type_the_unchanged_runtime_mis_sizes(self):
        # mixtral with 2 key/value heads of 4: optimum-onnx's runtime feeds a 4-head empty cache,
        # which the portable cache inputs accept; both runtime classes give torch's tokens.
        with tempfile.TemporaryDirectory() as scratch:
            model = save_causal_lm("mixtral", Path(scratch) / "model", num_key_value_heads=2)
            result = main_export(str(model), Path(scratch) / "onnx", task=WITH_PAST)
            self.assertEqual(result.route, Exporter.OBSERVER)
            self.assertTrue(result.observer_result.validation.ok, result.observer_result.validation.table())
            self.assertEqual(len(result.observer_result.validation.generation), 2)
            unchanged = upstream_decoder.ORTModelForCausalLM.from_pretrained(Path(scratch) / "onnx")
            self.assertEqual(ort_greedy(unchanged, Path(scratch) / "onnx"), torch_greedy(model))