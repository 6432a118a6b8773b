"""Longformer and LED's encoder (sliding-window attention): the patches of
optimum_observer.patches.sliding_window make one ONNX encoder that matches torch for every input
length, and each patch's failure happens without it.

The encoder graph is captured and synthesized as the pipeline does (LED: from a generate run;
Longformer: from the feature-extraction run), then converted with all patches or all but one;
its ONNX Runtime output is compared with the unpatched torch encoder on batches of every length
from 1 to 13, one row padded. (LED's greedy generation through the unchanged runtime class:
tests/test_seq2seq_export.py.)
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parameterized import parameterized

from optimum_observer import loading
from optimum_observer.conversion import restricted_axes
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.tasks import get_task
from stages import convert_without, load, observe
from tiny_families import save_encoder, save_seq2seq_lm

LENGTHS = range(1, 14)


def _batch(length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(5, 90, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[0, length - length // 3 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class SlidingWindowCase:
    """One model type's encoder graph; subclasses say how to build and run it."""

    model_type: str
    task: str

    @classmethod
    def save(cls, directory: Path) -> Path:
        raise NotImplementedError

    @staticmethod
    def last_hidden_state(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def assertPaddingFailure(self, differences: dict[int, float]) -> None:
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        cls._scratch = tempfile.TemporaryDirectory()
        cls.scratch = Path(cls._scratch.name)
        contract = get_task(cls.task)
        cls.observed = observe(load(cls.save(cls.scratch / "model"), contract), contract)
        cls.loaded: loading.LoadedModel = cls.observed.loaded
        cls.example = cls.observed.examples[0]  # the encoder's
        cls.window = cls.loaded.model.config.attention_window[0]

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def encoder(self, without: str | None = None) -> ort.InferenceSession:
        without = without and f"{self.model_type}_{without}"
        program = convert_without(self.observed, *((without,) if without else ()))
        self.restricted = restricted_axes(program.exported_program, self.example)
        path = self.scratch / f"encoder-without-{without}.onnx"
        program.save(str(path))
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def differences(self, session: ort.InferenceSession) -> dict[int, float]:
        """Largest difference from torch per input length (inf: the output has the wrong shape)."""
        names = {i.name for i in session.get_inputs()}
        found = {}
        for length in LENGTHS:
            batch = _batch(length)
            if "token_type_ids" in names:
                batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
            with torch.no_grad():
                expected = self.last_hidden_state(self.loaded.model, batch).numpy()
            got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
            found[length] = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        return found

    def test_one_encoder_matches_torch_for_every_length(self):
        lengths = {self.example.kwargs["input_ids"].shape[1], *LENGTHS}
        # Lengths that are and are not multiples of the window, shorter and longer than it.
        self.assertTrue({n % self.window for n in lengths} == set(range(self.window)) and max(lengths) > 2 * self.window)
        session = self.encoder()
        self.assertEqual(self.restricted, [])  # no axis bounded by torch.export
        differences = self.differences(session)
        self.assertLessEqual(max(differences.values()), 1e-4, differences)

    @parameterized.expand(["local_attention_only", "integer_window_division"])
    def test_export_fails_on_data_dependent_sizes_without(self, patch):
        with self.assertRaises(ObserverExportError) as caught:
            self.encoder(without=patch)
        self.assertEqual(caught.exception.stage, Stage.TORCH_EXPORT)
        self.assertRegex(str(caught.exception.__cause__), "data-dependent|GuardOnDataDependent")

    @pytest.mark.slow
    def test_padding_fails_without_unconditional_padding(self):
        session = self.encoder(without="pad_to_window_size_unconditionally")
        # The pipeline refuses such a graph (conversion.check_axes); here it is kept to show why.
        self.assertIn("attention_mask axis 1 (sequence_length) <= 5", "; ".join(self.restricted))
        self.assertPaddingFailure(self.differences(session))

    @pytest.mark.slow
    def test_encoder_silently_wrong_without_contiguous_chunks(self):
        differences = self.differences(self.encoder(without="contiguous_chunks"))
        self.assertGreater(max(differences.values()), 1e-3, differences)
        self.assertTrue(all(np.isfinite(d) for d in differences.values()), differences)


class TestLedEncoder(SlidingWindowCase, unittest.TestCase):
    model_type = "led"
    task = "text2text-generation-with-past"

    @classmethod
    def save(cls, directory: Path) -> Path:
        return save_seq2seq_lm("led", directory, with_tokenizer=False)

    @staticmethod
    def last_hidden_state(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.get_encoder()(**batch).last_hidden_state

    def assertPaddingFailure(self, differences: dict[int, float]) -> None:
        example_pads = self.example.kwargs["input_ids"].shape[1] % self.window != 0
        wrong = {n for n, difference in differences.items() if difference > 1e-4}
        # The graph keeps the example's branch: lengths on the other side of it come out wrong.
        self.assertEqual(wrong, {n for n in LENGTHS if (n % self.window != 0) != example_pads}, differences)


class TestLongformer(SlidingWindowCase, unittest.TestCase):
    model_type = "longformer"
    task = "feature-extraction"

    @classmethod
    def save(cls, directory: Path) -> Path:
        return save_encoder("longformer", "AutoModel", directory)

    @staticmethod
    def last_hidden_state(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).last_hidden_state

    @pytest.mark.slow
    def test_one_encoder_matches_torch_for_every_length(self):
        # Behind the marker for Longformer: LED's encoder (the same attention code, copied) checks
        # the mechanism in the default suite; Longformer's export-failure tests stay there.
        super().test_one_encoder_matches_torch_for_every_length()

    def assertPaddingFailure(self, differences: dict[int, float]) -> None:
        # Longformer unpads without a branch: only the bounded mask axis (refused by the pipeline) is wrong.
        self.assertLessEqual(max(differences.values()), 1e-4, differences)


if __name__ == "__main__":
    unittest.main()
