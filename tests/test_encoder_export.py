"""End-to-end: tiny random encoders exported by observation for the encoder-only tasks.

Each export replays the observed forward calls through ONNX Runtime and runs the unchanged
`optimum.onnxruntime.ORTModelFor*` class of the task on batches of 2 and 3 texts of different
lengths against torch (atol 1e-4); validation raises on any mismatch, and the tests check the
report, the graph names and, for the types the legacy exporter supports, its export too.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import onnx
import optimum.onnxruntime
import pytest
import torch
import transformers
from optimum.exporters.onnx import main_export
from parameterized import parameterized

import optimum_observer
from legacy_shim.tooling.tiny_configs import save_tiny_model
from optimum_observer.reference_inputs import encoder_batches, text_batches
from optimum_observer.tasks import get_task
from legacy import legacy_tasks
from tiny_families import save_encoder

LEGACY_SUPPORTED = ["bert", "roberta", "distilbert", "deberta-v2"]
#: Types optimum-onnx 0.1.0 cannot export for text-classification.
LEGACY_UNSUPPORTED = ["fnet", "luke", "xlm-roberta-xl", "ernie", "roc_bert", "yoso"]
#: Exported in the default suite: bert for every task (beside optimum-onnx's export), fnet (a
#: forward without attention_mask: the graph's inputs follow the signature), distilbert's
#: feature extraction (no token_type_ids), vit and wav2vec2 (image and waveform inputs). The
#: other text types go through the same stages; they are the coverage sweep's too
#: (docs/coverage.md, feature-extraction) and run with `-m slow`.
DEFAULT_UNSUPPORTED = ["fnet"]
OUTPUTS = {
    "feature-extraction": ["last_hidden_state"],
    "text-classification": ["logits"],
    "token-classification": ["logits"],
    "question-answering": ["start_logits", "end_logits"],
    "fill-mask": ["logits"],
}
ATOL = 1e-4


class EncoderCase(unittest.TestCase):
    def setUp(self):
        self._scratch = tempfile.TemporaryDirectory()
        self.scratch = Path(self._scratch.name)

    def tearDown(self):
        self._scratch.cleanup()

    def export(self, model_type: str, task: str) -> tuple[Path, optimum_observer.ExportResult]:
        source = save_encoder(model_type, get_task(task).auto_model_class, self.scratch / "model")
        return source, optimum_observer.export(source, self.scratch / "onnx", task=task)

    def assertExportMatchesTorch(self, result: optimum_observer.ExportResult, task: str) -> None:
        report = result.validation
        self.assertTrue(report.ok, report.table())
        self.assertGreaterEqual(len(report.calls), 2)
        self.assertTrue(all(c.max_abs_diff <= ATOL for c in report.calls), report.table())
        self.assertEqual({r.output for r in report.runtime}, set(OUTPUTS[task]))
        self.assertEqual({r.index for r in report.runtime}, {0, 1})
        self.assertTrue(all(r.max_abs_diff <= ATOL for r in report.runtime), report.table())
        graph = onnx.load(self.scratch / "onnx" / "model.onnx").graph
        self.assertEqual([o.name for o in graph.output], OUTPUTS[task])
        inputs = [i.name for i in graph.input]
        self.assertEqual(inputs[0], "input_ids")
        # FNet mixes tokens by Fourier transform and takes no attention mask.
        self.assertLessEqual(set(inputs), {"input_ids", "attention_mask", "token_type_ids"})
        self.assertEqual(result.dynamic_axes["input_ids"], {0: "batch_size", 1: "sequence_length"})

    def runtime_outputs(self, directory: Path, task: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        runtime_class = getattr(optimum.onnxruntime, get_task(task).runtime_class)
        outputs = runtime_class.from_pretrained(directory)(**inputs)
        return [torch.as_tensor(getattr(outputs, name)) for name in OUTPUTS[task]]


class TestLegacyCoverage(unittest.TestCase):
    @parameterized.expand([(t,) for t in LEGACY_UNSUPPORTED])
    def test_type_is_not_exportable_by_the_legacy_exporter(self, model_type):
        self.assertNotIn("text-classification", legacy_tasks(model_type))

    @parameterized.expand([(t,) for t in LEGACY_SUPPORTED])
    def test_type_is_exportable_by_the_legacy_exporter(self, model_type):
        self.assertIn("text-classification", legacy_tasks(model_type))


class TestEncoderExport(EncoderCase):
    @parameterized.expand([(t,) for t in DEFAULT_UNSUPPORTED])
    def test_text_classification_matches_torch(self, model_type):
        self.assertTextClassificationMatchesTorch(model_type)

    @parameterized.expand([(t,) for t in LEGACY_UNSUPPORTED if t not in DEFAULT_UNSUPPORTED])
    @pytest.mark.slow
    def test_text_classification_of_more_types_matches_torch(self, model_type):
        self.assertTextClassificationMatchesTorch(model_type)

    def assertTextClassificationMatchesTorch(self, model_type: str) -> None:
        _, result = self.export(model_type, "text-classification")
        self.assertExportMatchesTorch(result, "text-classification")

    @parameterized.expand([(task,) for task in OUTPUTS])
    def test_every_encoder_task_matches_torch_and_legacy(self, task):
        self.assertObserverAndLegacyAgree("bert", task)

    @parameterized.expand([(t,) for t in LEGACY_SUPPORTED if t != "bert"])
    @pytest.mark.slow
    def test_text_classification_matches_torch_and_legacy(self, model_type):
        self.assertObserverAndLegacyAgree(model_type, "text-classification")

    def assertObserverAndLegacyAgree(self, model_type: str, task: str) -> None:
        source, result = self.export(model_type, task)
        self.assertExportMatchesTorch(result, task)
        main_export(source, self.scratch / "legacy", task=task, library_name="transformers")
        model = getattr(transformers, get_task(task).auto_model_class).from_pretrained(source).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        for inputs in text_batches(model, tokenizer):
            with torch.no_grad():
                outputs = model(**inputs)
            expected = [outputs[name] for name in OUTPUTS[task]]
            observer = self.runtime_outputs(self.scratch / "onnx", task, inputs)
            legacy = self.runtime_outputs(self.scratch / "legacy", task, inputs)
            for want, ours, theirs in zip(expected, observer, legacy):
                torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
                torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    def test_token_type_ids_is_a_graph_input_only_when_forward_takes_it(self):
        _, result = self.export("distilbert", "feature-extraction")
        graph = onnx.load(self.scratch / "onnx" / "model.onnx").graph
        self.assertEqual([i.name for i in graph.input], ["input_ids", "attention_mask"])
        self.assertTrue(result.validation.ok)


class TestImageAndAudioEncoders(EncoderCase):
    """Encoders whose main input is an image or a waveform: the default run feeds that input
    (batches of 2 and 3; waveforms of different lengths), and the unchanged
    ORTModelForFeatureExtraction feeds it by the same name. Compared with torch and with the
    legacy exporter's file on the same batches."""

    @parameterized.expand(
        [
            ("vit", "pixel_values", {0: "batch_size"}),
            # Waveform lengths are observed only in the thousands; an example of a few samples
            # would break the convolutions' guard at torch.export ("3 not in VR[10, int_oo]").
            ("wav2vec2", "input_values", {0: "batch_size", 1: "sequence_length"}),
        ]
    )
    def test_feature_extraction_matches_torch_and_legacy(self, model_type, main_input, axes):
        source = save_tiny_model(model_type, "AutoModel", self.scratch / "model")
        result = optimum_observer.export(source, self.scratch / "onnx", task="feature-extraction")
        self.assertTrue(result.validation.ok, result.validation.table())
        self.assertEqual({r.index for r in result.validation.runtime}, {0, 1})
        graph = onnx.load(self.scratch / "onnx" / "model.onnx").graph
        self.assertEqual([i.name for i in graph.input], [main_input])
        self.assertEqual(result.dynamic_axes[main_input], axes)
        main_export(source, self.scratch / "legacy", task="feature-extraction", library_name="transformers")
        model = transformers.AutoModel.from_pretrained(source).eval()
        batches = encoder_batches(model, None)
        self.assertEqual(len({tuple(b[main_input].shape) for b in batches}), 2)
        for inputs in batches:
            with torch.no_grad():
                want = model(**inputs).last_hidden_state
            (ours,) = self.runtime_outputs(self.scratch / "onnx", "feature-extraction", inputs)
            (theirs,) = self.runtime_outputs(self.scratch / "legacy", "feature-extraction", inputs)
            torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
