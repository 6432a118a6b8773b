"""Packaging: external data for large weights, and publishing into the output directory."""

from __future__ import annotations

import tempfile
import unittest
from unittest import mock
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from parameterized import parameterized

from optimum_observer import packaging
from legacy_shim.tooling.tiny_configs import build_tiny_model


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.linear(x)


def _program() -> torch.onnx.ONNXProgram:
    torch.manual_seed(0)
    return torch.onnx.export(Affine().eval(), (torch.randn(2, 64),), dynamo=True, verbose=False)


class TestWriteModel(unittest.TestCase):
    def test_weights_past_the_threshold_go_to_model_onnx_data(self):
        program = _program()
        with tempfile.TemporaryDirectory() as scratch:
            with mock.patch.object(packaging, "EXTERNAL_DATA_THRESHOLD_BYTES", 1):
                files = packaging.write_model(program, Path(scratch))
            self.assertEqual(files, ["model.onnx", "model.onnx_data"])
            self.assertGreaterEqual((Path(scratch) / "model.onnx_data").stat().st_size, 64 * 32 * 4)
            session = ort.InferenceSession(str(Path(scratch) / "model.onnx"))
            x = np.ones((2, 64), dtype=np.float32)
            expected = program(torch.from_numpy(x))[0].numpy()
            np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected, atol=1e-6)

    def test_small_weights_stay_inside_model_onnx(self):
        with tempfile.TemporaryDirectory() as scratch:
            self.assertEqual(packaging.write_model(_program(), Path(scratch)), ["model.onnx"])
            self.assertFalse((Path(scratch) / "model.onnx_data").exists())

    def test_model_onnx_written_in_pieces_reads_as_ir_saves_file(self):
        import onnx
        import onnx_ir as ir

        program = _program()
        with tempfile.TemporaryDirectory() as scratch:
            packaging.write_model(program, Path(scratch))
            ir.save(program.model, Path(scratch) / "whole.onnx")
            whole = (Path(scratch) / "whole.onnx").read_bytes()
            written = (Path(scratch) / "model.onnx").read_bytes()
            self.assertNotEqual(written, whole)  # pieces: the initializers come last
            self.assertEqual(onnx.load(Path(scratch) / "model.onnx").SerializeToString(), whole)
            self.assertEqual(len(onnx.load(Path(scratch) / "model.onnx").graph.initializer), 2)
            session = ort.InferenceSession(str(Path(scratch) / "model.onnx"))
            x = np.ones((2, 64), dtype=np.float32)
            expected = program(torch.from_numpy(x))[0].numpy()
            np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected, atol=1e-6)


class TestStagedOutput(unittest.TestCase):
    def test_a_new_directory_appears_only_when_the_block_succeeds(self):
        with tempfile.TemporaryDirectory() as scratch:
            destination = Path(scratch) / "out"
            with self.assertRaises(RuntimeError):
                with packaging.staged_output(destination) as staging:
                    (staging / "model.onnx").write_text("half")
                    raise RuntimeError("validation failed")
            self.assertEqual(list(Path(scratch).iterdir()), [])
            with packaging.staged_output(destination) as staging:
                (staging / "model.onnx").write_text("whole")
            self.assertEqual((destination / "model.onnx").read_text(), "whole")

    def test_an_existing_directory_keeps_its_other_files(self):
        with tempfile.TemporaryDirectory() as scratch:
            destination = Path(scratch) / "out"
            destination.mkdir()
            (destination / "README.md").write_text("mine")
            (destination / "model.onnx").write_text("old")
            with packaging.staged_output(destination) as staging:
                (staging / "model.onnx").write_text("new")
                (staging / "config.json").write_text("{}")
            self.assertEqual(sorted(p.name for p in destination.iterdir()), ["README.md", "config.json", "model.onnx"])
            self.assertEqual((destination / "model.onnx").read_text(), "new")
            self.assertEqual([p.name for p in Path(scratch).iterdir()], ["out"])


def _without_path(config: transformers.PretrainedConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


class TestConfigOfATextModelRegisteredOnlyAsASubConfig(unittest.TestCase):
    """emu3's and mllama's causal-LM heads are built on a text config that transformers registers only
    inside the type's composite config: config.json holds the composite, as checkpoints do."""

    @parameterized.expand([("emu3", "Emu3Config"), ("mllama", "MllamaConfig")])
    def test_autoconfig_reads_it_and_transformers_rebuilds_the_same_model(self, model_type, composite_name):
        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch)  # the weights, for the rebuild below
            packaging.write_configs(model, None, Path(scratch))
            config = transformers.AutoConfig.from_pretrained(scratch)
            self.assertEqual(type(config).__name__, composite_name)
            self.assertEqual(_without_path(config.get_text_config()), _without_path(model.config))
            # optimum-onnx's ORTModelForCausalLM reads these two at the top level.
            self.assertEqual((config.hidden_size, config.num_attention_heads), (64, 4))
            rebuilt = transformers.AutoModelForCausalLM.from_pretrained(scratch).eval()
        self.assertIs(type(rebuilt), type(model))
        self.assertEqual(_without_path(rebuilt.config), _without_path(model.config))
        ids = torch.tensor([[5, 9, 3]])
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits)

    def test_a_registered_config_is_written_as_it_is(self):
        config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4)
        self.assertIs(packaging.checkpoint_config(config), config)
