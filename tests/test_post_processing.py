"""The post-processing Optimum users already call, on observer exports: `ORTOptimizer`,
`optimum-cli onnxruntime optimize` and `ORTQuantizer` (issue 15).

One observer export of a tiny olmo2 (a type optimum-onnx cannot export; real shapes: 4 heads,
2 key/value heads, explicit head_dim) and one legacy export of a tiny llama are shared by the
class. Through the unchanged-code hook (installed by the package's .pth file), optimum's own
`ORTOptimizer` optimizes the olmo2 export with the observer's fusions and the unchanged
`ORTModelForCausalLM` generates torch's tokens from the result, left padding included; the
llama export still takes optimum-onnx's optimizer. `ORTQuantizer` needs no routing.
"""

from __future__ import annotations

import collections
import tempfile
import unittest
from pathlib import Path

import onnx
import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM, ORTOptimizer, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig

import optimum_observer
from legacy_shim import main_export
from optimum_observer.packaging import exported_by_observer
from shim_helpers import run_cli, save_causal_lm

#: A causal-LM type optimum-onnx 0.1.0 can neither export nor optimize.
OBSERVER_ONLY = "olmo2"
LEGACY_TYPE = "llama"
PROMPTS = ["The capital of France is", "Hello"]
NEW_TOKENS = 8


def op_types(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


class TestPostProcessingObserverExports(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._scratch = tempfile.TemporaryDirectory()
        cls.scratch = Path(cls._scratch.name)
        cls.source = save_causal_lm(OBSERVER_ONLY, cls.scratch / "olmo2")
        cls.observer = cls.scratch / "olmo2-onnx"
        optimum_observer.export(cls.source, cls.observer)
        cls.legacy_source = save_causal_lm(LEGACY_TYPE, cls.scratch / "llama")
        cls.legacy = cls.scratch / "llama-onnx"
        main_export(cls.legacy_source, cls.legacy, task="text-generation-with-past", library_name="transformers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(cls.source)
        tokenizer.padding_side = "left"
        cls.inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(cls.source)
        with torch.no_grad():
            cls.expected = model.generate(
                **cls.inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            ).tolist()

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def generate(self, directory: Path, file_name: str) -> list[list[int]]:
        model = ORTModelForCausalLM.from_pretrained(directory, file_name=file_name)
        return model.generate(
            **self.inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        ).tolist()

    def test_exports_say_which_exporter_wrote_them(self):
        self.assertTrue(exported_by_observer(self.observer / "model.onnx"))
        self.assertFalse(exported_by_observer(self.legacy / "model.onnx"))

    def test_optimum_alone_refuses_the_observer_only_type(self):
        # The failure the routing fixes: optimum-onnx's own `optimize`, kept on the routed method.
        original = ORTOptimizer.optimize.__optimum_observer_original__
        optimizer = ORTOptimizer.from_pretrained(self.observer)
        with self.assertRaisesRegex(NotImplementedError, OBSERVER_ONLY):
            original(optimizer, OptimizationConfig(optimization_level=2), self.scratch / "refused")

    def test_ortoptimizer_fuses_observer_export_and_runtime_generates_torch_tokens(self):
        out = self.scratch / "olmo2-optimized"
        ORTOptimizer.from_pretrained(self.observer).optimize(OptimizationConfig(optimization_level=2), out)
        optimized = out / "model_optimized.onnx"
        self.assertTrue(optimized.is_file())
        self.assertTrue({"config.json", "ort_config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()})
        before, after = op_types(self.observer / "model.onnx"), op_types(optimized)
        self.assertGreater(sum(after.values()), 0)
        self.assertLess(sum(after.values()), sum(before.values()), "no fusion applied")
        self.assertIn("SimplifiedLayerNormalization", after)  # olmo2's RMSNorms, fused
        self.assertIn("GroupQueryAttention", after)  # with the mask and positions kept (ort_fusions)
        self.assertEqual(self.generate(out, "model_optimized.onnx"), self.expected)

    def test_fp16_is_refused_with_a_remedy(self):
        with self.assertRaisesRegex(NotImplementedError, rf"{OBSERVER_ONLY}.*fp16.*Optimize without"):
            ORTOptimizer.from_pretrained(self.observer).optimize(
                OptimizationConfig(optimization_level=1, fp16=True), self.scratch / "fp16"
            )
        self.assertFalse((self.scratch / "fp16" / "model_optimized.onnx").exists())

    def test_legacy_export_keeps_optimum_onnx_optimizer(self):
        routed, unrouted = self.scratch / "llama-routed", self.scratch / "llama-unrouted"
        config = OptimizationConfig(optimization_level=2)
        ORTOptimizer.from_pretrained(self.legacy).optimize(config, routed)
        original = ORTOptimizer.optimize.__optimum_observer_original__
        original(ORTOptimizer.from_pretrained(self.legacy), config, unrouted)
        self.assertEqual(op_types(routed / "model_optimized.onnx"), op_types(unrouted / "model_optimized.onnx"))
        self.assertIn("SkipSimplifiedLayerNormalization", op_types(routed / "model_optimized.onnx"))

    def test_optimum_cli_optimizes_observer_export(self):
        out = self.scratch / "olmo2-cli"
        done = run_cli("onnxruntime", "optimize", "--onnx_model", str(self.observer), "-O2", "-o", str(out), cwd=self.scratch)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn("SimplifiedLayerNormalization", op_types(out / "model_optimized.onnx"))

    def test_ortquantizer_quantizes_observer_export_that_runtime_loads(self):
        out = self.scratch / "olmo2-int8"
        config = AutoQuantizationConfig.avx2(is_static=False, per_channel=True)
        ORTQuantizer.from_pretrained(self.observer).quantize(config, out)
        quantized = out / "model_quantized.onnx"
        self.assertIn("MatMulInteger", op_types(quantized))
        tokens = self.generate(out, "model_quantized.onnx")
        self.assertEqual([row[: self.inputs["input_ids"].shape[1]] for row in tokens], self.inputs["input_ids"].tolist())
        self.assertEqual([len(row) for row in tokens], [len(row) for row in self.expected])
        # int8 weights of a random model: the first new token's logits keep their direction.
        fp32 = ORTModelForCausalLM.from_pretrained(self.observer)(**self.inputs).logits[:, -1]
        int8 = ORTModelForCausalLM.from_pretrained(out, file_name="model_quantized.onnx")(**self.inputs).logits[:, -1]
        cosine = torch.nn.functional.cosine_similarity(torch.as_tensor(fp32), torch.as_tensor(int8), dim=-1)
        self.assertGreater(cosine.min().item(), 0.99, cosine.tolist())
