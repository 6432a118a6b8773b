"""End-to-end: tiny random causal LMs exported by observation, validated against torch.

Each export replays every observed call through ONNX Runtime and checks greedy generation
through the unchanged `optimum.onnxruntime.ORTModelForCausalLM` (8 new tokens, batch 2 with
left padding and prompts of different lengths, then a single prompt); validation raises on any
mismatch, and the tests check the report too.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import onnx
import optimum.exporters.onnx.model_configs  # noqa: F401  (fills TasksManager's onnx registry)
import pytest
from optimum.exporters.tasks import TasksManager
from parameterized import parameterized

import optimum_observer
from tiny_models import save_causal_lm

LEGACY_SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"]
LEGACY_UNSUPPORTED = [
    "mixtral",
    "qwen2_moe",
    "starcoder2",
    "olmoe",
    "glm4",
    "granitemoe",
    "cohere2",
    "ministral",
    "ernie4_5",
    "seed_oss",
]


def legacy_tasks(model_type: str) -> set[str]:
    try:
        return set(TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx", library_name="transformers"))
    except KeyError:
        return set()


class TestLegacyCoverage(unittest.TestCase):
    @parameterized.expand([(t,) for t in LEGACY_UNSUPPORTED])
    def test_type_is_not_exportable_by_the_legacy_exporter(self, model_type):
        self.assertNotIn("text-generation-with-past", legacy_tasks(model_type))

    @parameterized.expand([(t,) for t in LEGACY_SUPPORTED])
    def test_type_is_exportable_by_the_legacy_exporter(self, model_type):
        self.assertIn("text-generation-with-past", legacy_tasks(model_type))


#: Exported by tests/test_real_shapes.py (real-shaped sweep models, through the runtime with and
#: without optimum-observer); not exported twice.
EXPORTED_ELSEWHERE = {"glm4", "seed_oss", "ernie4_5", "cohere2", "ministral"}
#: The default suite exports llama here: every stage every decoder type goes through. Other
#: default-suite exports cover the rest: MoE dispatch (mixtral, tests/test_legacy_shim_observer_route.py,
#: and each dense-experts patch in tests/test_patches.py), starcoder2 (the demo, tests/test_cli.py,
#: and the legacy_shim entry points). The other types here are the coverage sweep's too
#: (docs/coverage.md) and run with `-m slow`.
DEFAULT_TYPES = ["llama"]
#: Decoders no patch of a model type serves (their exports get the exporter environment's only).
DENSE_TYPES = {"llama", "qwen2", "mistral", "gemma", "starcoder2"}
SLOW_TYPES = [
    t for t in LEGACY_SUPPORTED + LEGACY_UNSUPPORTED if t not in EXPORTED_ELSEWHERE and t not in DEFAULT_TYPES
]


class TestObserverExport(unittest.TestCase):
    @parameterized.expand([(t,) for t in DEFAULT_TYPES])
    def test_export_matches_torch(self, model_type):
        # The session's export: tests/test_optimization.py post-processes the same files.
        result = self.artifacts.observer_export(model_type)
        self.assertExportMatchesTorch(result, result.output_dir)

    @parameterized.expand([(t,) for t in SLOW_TYPES])
    @pytest.mark.slow
    def test_export_of_more_types_matches_torch(self, model_type):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            result = optimum_observer.export(save_causal_lm(model_type, scratch / "model"), scratch / "onnx")
            self.assertExportMatchesTorch(result, scratch / "onnx")

    def assertExportMatchesTorch(self, result, output: Path) -> None:
        if result.model_type in DENSE_TYPES:
            # No model type's patch: the others' targets are never touched.
            self.assertEqual(
                result.patches,
                (
                    "dynamic_layer_lazy_initialization",
                    "type_promotion_number_operands",
                    "multi_output_pattern_first_node",
                    "rewrite_rule_root_operator_first",
                    "type_promotion_recorded_values",
                ),
            )
        self.assertIn("dynamic_layer_lazy_initialization", result.patches)
        report = result.validation
        self.assertTrue(report.ok, report.table())
        self.assertGreaterEqual(len(report.calls), 6)
        self.assertTrue(all(c.max_abs_diff <= 1e-4 for c in report.calls), report.table())
        batched = report.generation[0]
        self.assertEqual(len(batched.torch_tokens), 2)
        self.assertEqual(len(set(batched.prompt_lengths)), 2)
        self.assertTrue(all(len(t) >= 8 for g in report.generation for t in g.onnx_tokens))

        graph = onnx.load(output / "model.onnx").graph
        inputs = [i.name for i in graph.input]
        outputs = [o.name for o in graph.output]
        self.assertEqual(inputs[:2], ["input_ids", "attention_mask"])
        self.assertIn("past_key_values.1.value", inputs)
        self.assertEqual(outputs[0], "logits")
        self.assertIn("present.1.value", outputs)
        self.assertEqual(result.dynamic_axes["present.0.key"][2], "past_sequence_length + sequence_length")
        # Heads and head size symbolic: the portable cache inputs (optimum_observer.portable_cache).
        self.assertEqual(
            result.dynamic_axes["past_key_values.0.key"],
            {0: "batch_size", 1: "num_key_value_heads", 2: "past_sequence_length", 3: "key_head_size"},
        )
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            self.assertTrue((output / name).is_file(), name)
