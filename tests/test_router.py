"""The router: default rule, precedence, explanations, registry, and how calls are resolved for it."""

from __future__ import annotations

import inspect
import json
import tempfile
import unittest
from pathlib import Path

from parameterized import parameterized
from transformers import AutoConfig

import legacy_shim
from legacy_shim import main_export
from legacy_shim import registry as registry_module
from legacy_shim.export import Resolution, _with_past_default, bind_arguments, resolve
from legacy_shim.registry import (
    MigrationEntry,
    MigrationRegistry,
    RegistryError,
    add_migration,
    load_registry,
)
from legacy_shim.router import EXPORTER_ENV_VAR, DecisionSource, Exporter, RouteRequest, decide, explain
from legacy_shim.routes import upstream_main_export

WITH_PAST = "text-generation-with-past"
EMPTY = MigrationRegistry(Path("empty.json"), ())
LLAMA_MIGRATED = MigrationRegistry(
    Path("migrated.json"), (MigrationEntry("llama", (WITH_PAST,), "0.2.0", "tiny + 125M llama parity run"),)
)


class TestDefaultRule(unittest.TestCase):
    @parameterized.expand(
        [
            ("gpt2", WITH_PAST, Exporter.LEGACY),
            ("llama", WITH_PAST, Exporter.LEGACY),
            ("llama", "text-generation", Exporter.LEGACY),
            ("bert", "feature-extraction", Exporter.LEGACY),
            ("t5", "text2text-generation-with-past", Exporter.LEGACY),
            ("starcoder2", WITH_PAST, Exporter.OBSERVER),
            ("ministral", "text-generation", Exporter.OBSERVER),
            # Neither exporter supports the pair: optimum-onnx keeps reporting its own error.
            ("ministral", "multiple-choice", Exporter.LEGACY),
        ]
    )
    def test_default(self, model_type, task, expected):
        decision = decide(RouteRequest(model_type, task), environ={}, registry=EMPTY)
        self.assertEqual(decision.exporter, expected)
        self.assertEqual(decision.source, DecisionSource.DEFAULT)

    def test_legacy_only_arguments_keep_auto_on_legacy(self):
        request = RouteRequest("starcoder2", WITH_PAST, legacy_only_arguments=("custom_onnx_configs",))
        decision = decide(request, environ={}, registry=EMPTY)
        self.assertEqual(decision.exporter, Exporter.LEGACY)
        self.assertIn("custom_onnx_configs", decision.reason)

    def test_unreadable_config_goes_to_legacy_which_reports_it(self):
        request = RouteRequest("/no/such/dir", WITH_PAST, unresolved="OSError: no config.json")
        decision = decide(request, environ={}, registry=EMPTY)
        self.assertEqual(decision.exporter, Exporter.LEGACY)
        self.assertIn("no config.json", decision.reason)

    def test_non_transformers_library_goes_to_legacy(self):
        request = RouteRequest("resnet50", "image-classification", library_name="timm")
        self.assertEqual(decide(request, environ={}, registry=EMPTY).exporter, Exporter.LEGACY)


class TestPrecedence(unittest.TestCase):
    """argument > CLI flag > environment variable > registry > default; "auto" is no override."""

    @parameterized.expand(
        [
            (
                "argument_beats_all",
                "observer",
                "legacy",
                "legacy",
                LLAMA_MIGRATED,
                Exporter.OBSERVER,
                "ARGUMENT",
            ),
            (
                "argument_legacy_beats_registry",
                "legacy",
                None,
                None,
                LLAMA_MIGRATED,
                Exporter.LEGACY,
                "ARGUMENT",
            ),
            ("cli_beats_env", None, "observer", "legacy", EMPTY, Exporter.OBSERVER, "CLI"),
            ("auto_argument_defers_to_cli", "auto", "observer", None, EMPTY, Exporter.OBSERVER, "CLI"),
            ("env_beats_registry", None, None, "legacy", LLAMA_MIGRATED, Exporter.LEGACY, "ENVIRONMENT"),
            ("auto_cli_defers_to_env", None, "auto", "observer", EMPTY, Exporter.OBSERVER, "ENVIRONMENT"),
            ("registry_beats_default", None, None, None, LLAMA_MIGRATED, Exporter.OBSERVER, "REGISTRY"),
            (
                "auto_env_defers_to_registry",
                "auto",
                "auto",
                "auto",
                LLAMA_MIGRATED,
                Exporter.OBSERVER,
                "REGISTRY",
            ),
            ("default", None, None, None, EMPTY, Exporter.LEGACY, "DEFAULT"),
        ]
    )
    def test_precedence(self, _, argument, cli_flag, env, registry, expected, source):
        environ = {} if env is None else {EXPORTER_ENV_VAR: env}
        decision = decide(
            RouteRequest("llama", WITH_PAST),
            argument=argument,
            cli_flag=cli_flag,
            environ=environ,
            registry=registry,
        )
        self.assertEqual((decision.exporter, decision.source), (expected, DecisionSource[source]))

    @parameterized.expand(
        [("argument", dict(argument="onnx")), ("env", dict(environ={EXPORTER_ENV_VAR: "dynamo"}))]
    )
    def test_unknown_exporter_value_is_an_error(self, _, overrides):
        overrides.setdefault("environ", {})
        with self.assertRaisesRegex(ValueError, "Unknown exporter .* choose one of: auto, legacy, observer"):
            decide(RouteRequest("llama", WITH_PAST), registry=EMPTY, **overrides)


class TestExplanations(unittest.TestCase):
    @parameterized.expand(
        [
            (
                "llama",
                {},
                EMPTY,
                "llama / text-generation-with-past -> legacy: optimum-onnx has an OnnxConfig for "
                "llama / text-generation-with-past and llama is not migrated",
            ),
            (
                "starcoder2",
                {},
                EMPTY,
                "starcoder2 / text-generation-with-past -> observer: optimum-onnx has no OnnxConfig for "
                "starcoder2 / text-generation-with-past and the observer exports text-generation-with-past",
            ),
            (
                "llama",
                {},
                LLAMA_MIGRATED,
                "llama / text-generation-with-past -> observer: llama was migrated to the observer in 0.2.0 "
                "(tiny + 125M llama parity run)",
            ),
            (
                "llama",
                {EXPORTER_ENV_VAR: "observer"},
                EMPTY,
                f"llama / text-generation-with-past -> observer: {EXPORTER_ENV_VAR}=observer was set",
            ),
        ]
    )
    def test_explain(self, model_type, environ, registry, expected):
        self.assertEqual(explain(model_type, WITH_PAST, environ=environ, registry=registry), expected)


def _entry(**overrides):
    return {
        "model_type": "llama",
        "tasks": [WITH_PAST],
        "since": "0.2.0",
        "evidence": "parity run",
        **overrides,
    }


class TestRegistry(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "migrated.json"
        self.path.write_text("[\n]\n")

    def tearDown(self):
        self.directory.cleanup()

    def write(self, raw):
        self.path.write_text(json.dumps(raw))

    def test_packaged_registry_is_valid(self):
        registry = load_registry()
        self.assertEqual(registry.path, registry_module.REGISTRY_PATH)
        self.assertTrue(all(isinstance(e, MigrationEntry) for e in registry.entries))

    @parameterized.expand(
        [
            ("unknown_model_type", [_entry(model_type="llamma")], "unknown model_type 'llamma'"),
            (
                "duplicate_entries",
                [_entry(), _entry(since="0.3.0")],
                "duplicate entry for llama / text-generation",
            ),
            ("task_listed_twice", [_entry(tasks=[WITH_PAST, WITH_PAST])], "lists a task twice"),
            ("task_not_observer", [_entry(tasks=["not-a-task"])], r"tasks \['not-a-task'\] are not exported"),
            ("empty_tasks", [_entry(tasks=[])], "'tasks' must be a non-empty list"),
            ("tasks_not_list", [_entry(tasks=WITH_PAST)], "'tasks' must be a non-empty list"),
            ("bad_version", [_entry(since="soon")], "'since' must be a version"),
            ("empty_evidence", [_entry(evidence="  ")], "'evidence' must say what showed parity"),
            (
                "missing_field",
                [{"model_type": "llama", "tasks": [WITH_PAST], "since": "0.2.0"}],
                r"missing fields \['evidence'\]",
            ),
            ("unknown_field", [_entry(reviewer="me")], r"unknown fields \['reviewer'\]"),
            ("entry_not_object", [["llama"]], "expected an object"),
            ("not_a_list", {"llama": _entry()}, "must be a JSON list"),
        ]
    )
    def test_invalid_registry_is_an_error(self, _, raw, message):
        self.write(raw)
        with self.assertRaisesRegex(RegistryError, message):
            load_registry(self.path)

    def test_invalid_json_is_an_error(self):
        self.path.write_text("[{]")
        with self.assertRaisesRegex(RegistryError, "not valid JSON"):
            load_registry(self.path)

    def test_add_migration_is_a_one_line_change_that_routes_the_type(self):
        add_migration("llama", [WITH_PAST], "0.2.0", "parity run", path=self.path)
        add_migration("gpt2", [WITH_PAST, "text-generation"], "0.2.0", "parity run", path=self.path)
        lines = self.path.read_text().splitlines()
        self.assertEqual(lines[0], "[")
        self.assertEqual(lines[-1], "]")
        self.assertEqual(len(lines), 4)  # one line per entry, sorted by model type
        self.assertIn('"model_type": "gpt2"', lines[1])
        registry = load_registry(self.path)
        decision = decide(RouteRequest("gpt2", "text-generation"), environ={}, registry=registry)
        self.assertEqual((decision.exporter, decision.source), (Exporter.OBSERVER, DecisionSource.REGISTRY))

    def test_add_migration_rejects_invalid_entries_and_leaves_the_file(self):
        add_migration("llama", [WITH_PAST], "0.2.0", "parity run", path=self.path)
        before = self.path.read_text()
        with self.assertRaisesRegex(RegistryError, "duplicate entry"):
            add_migration("llama", [WITH_PAST], "0.3.0", "again", path=self.path)
        with self.assertRaisesRegex(RegistryError, "unknown model_type"):
            add_migration("not_a_model", [WITH_PAST], "0.3.0", "parity", path=self.path)
        self.assertEqual(self.path.read_text(), before)


class TestResolution(unittest.TestCase):
    """How `main_export`'s model and task become the router's (model_type, task)."""

    def setUp(self):
        self.directory = tempfile.TemporaryDirectory()
        self.model = Path(self.directory.name) / "starcoder2"
        AutoConfig.for_model("starcoder2", hidden_size=16, num_attention_heads=2).save_pretrained(self.model)

    def tearDown(self):
        self.directory.cleanup()

    def arguments(self, **overrides):
        values, _, _ = bind_arguments((str(self.model), "out"), overrides)
        return values

    @parameterized.expand(
        [(WITH_PAST, WITH_PAST), ("causal-lm", "text-generation"), ("causal-lm-with-past", WITH_PAST)]
    )
    def test_task_synonyms_are_mapped(self, task, expected):
        self.assertEqual(
            resolve(self.arguments(task=task)), Resolution("starcoder2", expected, "transformers")
        )

    def test_auto_on_a_local_directory_is_left_to_optimum_onnx(self):
        # optimum-onnx cannot infer the task of a local directory; the call stays on it to say so.
        resolution = resolve(self.arguments())
        self.assertIsNone(resolution.model_type)
        self.assertIn("Cannot infer the task from a local directory", str(resolution.error))

    @parameterized.expand(
        [
            ("llama", "text-generation", False, WITH_PAST),
            ("starcoder2", "text-generation", False, WITH_PAST),
            ("bert", "feature-extraction", False, "feature-extraction"),
            ("llama", "text-generation", True, "text-generation"),
        ]
    )
    def test_inferred_tasks_get_with_past_like_optimum_onnx(self, model_type, task, monolith, expected):
        self.assertEqual(_with_past_default(model_type, task, monolith=monolith), expected)


class TestSignature(unittest.TestCase):
    def test_main_export_is_optimum_onnx_plus_exporter(self):
        upstream = inspect.signature(upstream_main_export()).parameters
        ours = dict(inspect.signature(main_export).parameters)
        exporter = ours.pop("exporter")
        self.assertEqual((exporter.default, exporter.kind), ("auto", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        self.assertEqual(list(ours), list(upstream))
        for name, parameter in upstream.items():
            self.assertEqual((ours[name].kind, ours[name].default), (parameter.kind, parameter.default), name)

    @parameterized.expand(
        [
            ("ORTModelForCausalLM",),
            ("ORTModelForFeatureExtraction",),
            ("ORTModelForSequenceClassification",),
            ("ORTModelForSeq2SeqLM",),
            ("ORTModelForSpeechSeq2Seq",),
        ]
    )
    def test_model_classes_keep_from_pretrained(self, name):
        import optimum.onnxruntime

        ours, upstream = getattr(legacy_shim, name), getattr(optimum.onnxruntime, name)
        self.assertTrue(issubclass(ours, upstream))
        self.assertEqual(inspect.signature(ours.from_pretrained), inspect.signature(upstream.from_pretrained))
