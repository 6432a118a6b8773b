"""--optimize and --quantize {int8,int4} (optimum_observer.optimization and the pipeline's stage).

The default cases post-process copies of the session's tiny llama export (grouped-query
attention, head_dim 32); one export runs the whole stage through `export()`. Other model types
(qwen3, an observer-only type, a MoE type) run with `-m slow`.
"""

from __future__ import annotations

import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers
from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort
from optimum.onnxruntime import ORTModelForCausalLM
from parameterized import parameterized

import optimum_observer
from legacy_shim.tooling import tiny_configs
from optimum_observer import cli, optimization, ort_fusions, validation
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.result import CosineCheck, ExportResult
from optimum_observer.tasks import get_task
from tiny_families import save_encoder
from tiny_models import save_causal_lm

MODEL_TYPE = "llama"


def _ops(directory: Path) -> set[str]:
    return {node.op_type for node in ir.load(directory / "model.onnx").graph.all_nodes()}


def _names(directory: Path) -> tuple[list[str], list[str]]:
    graph = ir.load(directory / "model.onnx").graph
    return [v.name for v in graph.inputs], [v.name for v in graph.outputs]


class TestPostProcessing(unittest.TestCase):
    """Post-processing of copies of the session's fp32 export."""

    @classmethod
    def setUpClass(cls):
        cls.fp32 = cls.artifacts.observer_export(MODEL_TYPE).output_dir
        source = cls.artifacts.causal_lm(MODEL_TYPE)
        cls.model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        cls.tokenizer = transformers.AutoTokenizer.from_pretrained(source)

    def setUp(self):
        self.scratch = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.scratch, True)

    def copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.fp32, self.scratch / name))

    def checked(self, directory: Path) -> validation.ValidationInputs:
        return validation.ValidationInputs(
            directory, self.model, get_task("text-generation-with-past"), ORTModelForCausalLM, self.tokenizer
        )

    def generation(self, directory: Path):
        return validation.check_generation(self.checked(directory))

    def test_optimize_fuses_and_keeps_torch_tokens_with_left_padding(self):
        directory = self.copy("optimized")
        done = optimization.post_process(directory, "model.onnx", optimize=True)

        for fusion in ("rms_normalization", "skip_rms_normalization", "rotary_embedding", "sdpa"):
            self.assertGreater(done.fusions.get(fusion, 0), 0, done.fusions)
        # Every layer's attention as GroupQueryAttention with the model's mask and positions
        # (ort_fusions.GroupQueryAttentionKeepingMask), none left as MultiHeadAttention.
        self.assertEqual(done.fusions.get("gqa"), tiny_configs.LAYERS, done.fusions)
        ops = _ops(directory)
        self.assertIn("GroupQueryAttention", ops)
        self.assertNotIn("MultiHeadAttention", ops)
        self.assertIn("SimplifiedLayerNormalization", ops)
        self.assertEqual(_names(directory), _names(self.fp32))
        checks = self.generation(directory)
        self.assertEqual(len(set(checks[0].prompt_lengths)), 2)  # a left-padded batch
        for check in checks:
            self.assertEqual(check.onnx_tokens, check.torch_tokens)

    def test_onnxscripts_own_group_query_attention_is_wrong_on_left_padded_rows(self):
        # Why ort_fusions.REPLACEMENTS replaces onnxscript's "gqa": when its rewrite honours the
        # mask, this test fails and the replacement can go.
        directory = self.copy("onnxscript-gqa")
        model, counts = optimize_for_ort(ir.load(directory / "model.onnx"))
        ir.save(model, directory / "model.onnx")

        self.assertGreater(counts["gqa"], 0)
        padded, single = self.generation(directory)
        self.assertNotEqual(padded.onnx_tokens, padded.torch_tokens)
        self.assertEqual(single.onnx_tokens, single.torch_tokens)

    def test_replacement_is_restored(self):
        original = _core.fuse_gqa
        with ort_fusions.fusions_replaced():
            self.assertIsNot(_core.fuse_gqa, original)
        self.assertIs(_core.fuse_gqa, original)
        with self.assertRaises(KeyError), ort_fusions.fusions_replaced():
            raise KeyError("inside")
        self.assertIs(_core.fuse_gqa, original)

    def test_optimized_int8_leaves_the_rotary_frequency_product_in_fp32(self):
        # onnxscript's cos/sin-cache fusion leaves positions x inverse frequencies as a MatMul
        # with a one-row constant; quantize_dynamic would round the positions
        # (optimization.short_weight_matmuls).
        directory = self.copy("optimized-int8")
        optimization.post_process(directory, "model.onnx", optimize=True, quantize="int8")

        graph = ir.load(directory / "model.onnx").graph
        short = [n for n in graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                 and n.inputs[1].const_value.shape[0] < optimization.MIN_QUANTIZED_ROWS]
        self.assertEqual(len(short), 1, [n.name for n in short])
        quantized = [n for n in graph if n.op_type == "MatMulInteger"]
        # q/k/v and gate/up of each layer, each merged into one MatMul (sibling_matmuls_merged),
        # and lm_head
        self.assertEqual(len(quantized), 2 * tiny_configs.LAYERS + 1)
        for node in quantized:
            self.assertGreaterEqual(node.inputs[1].shape[0], optimization.MIN_QUANTIZED_ROWS, node.name)

    @parameterized.expand([("int8", {"MatMulInteger", "DynamicQuantizeLinear"}), ("int4", {"MatMulNBits"})])
    def test_quantized_file_loads_in_the_unchanged_class_and_keeps_quality(self, mode, quantized_ops):
        directory = self.copy(mode)
        reference = validation.perplexity(self.checked(directory))
        done = optimization.post_process(directory, "model.onnx", quantize=mode)

        self.assertLessEqual(quantized_ops, _ops(directory))
        self.assertEqual(_names(directory), _names(self.fp32))
        self.assertLess((directory / "model.onnx").stat().st_size, (self.fp32 / "model.onnx").stat().st_size)
        if mode == "int8":  # down_proj and o_proj stay fp32 (optimization.INT8_SETTINGS)
            self.assertEqual(len(done.kept_fp32), 2 * tiny_configs.LAYERS)  # down_proj, o_proj
        nodes = list(ir.load(directory / "model.onnx").graph.all_nodes())
        bits = [n.attributes["bits"].value for n in nodes if n.op_type == "MatMulNBits"]
        # lm_head: int4 mode 8-bit MatMulNBits; int8 mode quantize_dynamic (a tied one through
        # its own transposed copy: TestWeightLayouts).
        self.assertEqual(bits.count(8), 1 if mode == "int4" else 0)
        if mode == "int8":
            integer = [n for n in nodes if n.op_type == "MatMulInteger"]
            self.assertEqual(len(integer), 2 * tiny_configs.LAYERS + 1)  # qkv, gate/up per layer; lm_head
            self.assertNotIn("Transpose", {p.op_type for n in integer for i in n.inputs if i is not None
                                           for p in [i.producer()] if p is not None})
        # int4: gate_proj and up_proj merged into one MatMul per layer, with exact block offsets;
        # q/k/v merged too (sibling_matmuls_merged): qkv, o_proj, gate/up, down_proj per layer.
        offsets = [n for n in nodes if n.name.endswith("_plus_offsets")]
        self.assertEqual(len(offsets), tiny_configs.LAYERS if mode == "int4" else 0)
        if mode == "int4":
            self.assertEqual(len(bits), 4 * tiny_configs.LAYERS + 1)
        quality = validation.check_quality(self.checked(directory), reference)
        self.assertLessEqual(quality.perplexity_ratio, optimization.MAX_PERPLEXITY_RATIO[mode])
        self.assertGreater(quality.perplexity_ratio, 0.95)
        self.assertTrue(all(len(row) == validation.GENERATION_NEW_TOKENS for g in quality.generation for row in g.onnx_tokens))


def _graph(nodes: list[ir.Node], x: ir.Value, initializers: dict[str, np.ndarray]) -> ir.Model:
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": 21, "com.microsoft": 1})
    for value in initializers.values():
        graph.register_initializer(value)
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _value(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(array)
    )


class TestWeightLayouts(unittest.TestCase):
    """The graph rewrites behind INT4_SETTINGS / INT8_SETTINGS, on one-node graphs."""

    K, N, BLOCK = 96, 40, 32

    def input(self) -> ir.Value:
        return ir.Value(name="x", shape=ir.Shape([3, self.K]), type=ir.TensorType(ir.DataType.FLOAT))

    def grid_weight(self) -> np.ndarray:
        # Every block of 32 rows per column on its own min..max grid of 15 steps, the offset
        # (min) not a multiple of the step: what a Q4_1 GGUF checkpoint dequantizes to.
        rng = np.random.default_rng(0)
        blocks = self.K // self.BLOCK
        step = rng.uniform(0.01, 0.05, (blocks, 1, self.N))
        low = -step * rng.uniform(3.0, 11.0, (blocks, 1, self.N))
        levels = rng.integers(0, 16, (blocks, self.BLOCK, self.N))
        levels[:, 0], levels[:, 1] = 0, 15  # min and max present, as a min-max quantizer leaves them
        return (low + step * levels).reshape(self.K, self.N).astype(np.float32)

    def quantized_error(self, exact: bool) -> float:
        weight, x = self.grid_weight(), self.input()
        node = ir.node("MatMul", [x, _value("w", weight)], name="proj")
        model = _graph([node], x, {"w": node.inputs[1]})
        helpers = optimization.block_offsets_apart(model, frozenset({"proj"} if exact else ()), self.BLOCK, 4)
        names = {n.name for n in model.graph if n.op_type == "MatMul"} - set(helpers)
        # accuracy_level 0: fp32 arithmetic, so only the weights' representation differs.
        model = optimization._matmul_nbits(model, [(4, exact, names)], self.BLOCK, accuracy_level=0)
        self.assertEqual(sum(n.op_type == "MatMulNBits" for n in model.graph), 1)
        inputs = np.random.default_rng(1).standard_normal((3, self.K)).astype(np.float32)
        return float(np.abs(_run(model, inputs) - inputs @ weight).max())

    def test_exact_offsets_keep_a_block_grid_that_integer_zero_points_round(self):
        self.assertLess(self.quantized_error(exact=True), 1e-4)
        self.assertGreater(self.quantized_error(exact=False), 1e-2)  # MatMulNBits' own asymmetric form

    def test_transposed_weight_becomes_a_plain_matmul_weight(self):
        rng = np.random.default_rng(2)
        embedding = rng.standard_normal((self.N, self.K)).astype(np.float32)
        inputs = rng.standard_normal((3, self.K)).astype(np.float32)
        for fused in (False, True):
            x, table = self.input(), _value("embedding", embedding)
            if fused:
                fused_node = ir.node("FusedMatMul", [x, table], attributes={"transB": 1}, domain="com.microsoft", name="lm_head")
                nodes = [fused_node]
            else:
                transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]})
                nodes = [transpose, ir.node("MatMul", [x, transpose.outputs[0]], name="lm_head")]
            model = _graph(nodes, x, {"embedding": table})
            expected = _run(model, inputs)

            self.assertEqual(optimization.transposed_weights_materialized(model, {"lm_head"}), ["lm_head"])
            (node,) = list(model.graph)
            self.assertEqual((node.op_type, node.name), ("MatMul", "lm_head"))
            np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), embedding.T)
            np.testing.assert_allclose(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
            self.assertEqual(optimization.transposed_weights_materialized(model, {"lm_head"}), [])


    def sibling_model(self) -> ir.Model:
        """q/k/v/o projections of one input, concatenated (a graph output per layout)."""
        rng = np.random.default_rng(3)
        x = self.input()
        weights = {name: _value(name, rng.standard_normal((self.K, n)).astype(np.float32)) for name, n in
                   (("q", 48), ("k", 16), ("v", 16), ("o", 40))}
        nodes = [ir.node("MatMul", [x, w], name=name) for name, w in weights.items()]
        joined = ir.node("Concat", [n.outputs[0] for n in nodes], attributes={"axis": -1})
        graph = ir.Graph([x], [joined.outputs[0]], nodes=[*nodes, joined], opset_imports={"": 21, "com.microsoft": 1})
        for value in weights.values():
            graph.register_initializer(value)
        return ir.Model(graph, ir_version=10)

    def test_sibling_matmuls_merge_into_one_weight_with_the_same_results(self):
        inputs = np.random.default_rng(4).standard_normal((3, self.K)).astype(np.float32)
        model = self.sibling_model()
        expected = _run(model, inputs)
        classes = [{"q", "k", "v"}, {"o"}]  # o quantized otherwise: not merged with them

        self.assertEqual(optimization.sibling_matmuls_merged(model, classes), {"q": ["q", "k", "v"]})
        self.assertEqual(classes, [{"q"}, {"o"}])
        ops = [n.op_type for n in model.graph]
        self.assertEqual((ops.count("MatMul"), ops.count("Split")), (2, 1))
        np.testing.assert_allclose(_run(model, inputs), expected, rtol=1e-5, atol=1e-5)
        # Blocks and scales are per output column: quantized merged = quantized apart
        # (accuracy_level 0: fp32 arithmetic).
        merged = optimization._matmul_nbits(model, [(4, False, {"q", "o"})], self.BLOCK, accuracy_level=0)
        apart = optimization._matmul_nbits(self.sibling_model(), [(4, False, {"q", "k", "v", "o"})], self.BLOCK, 0)
        self.assertEqual(sum(n.op_type == "MatMulNBits" for n in merged.graph), 2)
        np.testing.assert_allclose(_run(merged, inputs), _run(apart, inputs), rtol=1e-5, atol=1e-5)
        self.assertGreater(np.abs(_run(merged, inputs) - expected).max(), 1e-3)  # it was quantized

    def test_int8_quantizes_a_tied_vocabulary_projection(self):
        # SmolLM2 ties lm_head to the embedding: MatMul(x, Transpose(embedding)), which
        # quantize_dynamic does not see as a weight without its own transposed copy.
        rng = np.random.default_rng(5)
        x, table = self.input(), _value("embedding", rng.standard_normal((self.N, self.K)).astype(np.float32))
        transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]})
        lm_head = ir.node("MatMul", [x, transpose.outputs[0]], name="lm_head",
                          metadata_props={optimization.NAME_SCOPES: "['', 'lm_head']"})
        lm_head.outputs[0].shape, lm_head.outputs[0].type = ir.Shape([3, self.N]), ir.TensorType(ir.DataType.FLOAT)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.onnx"
            ir.save(_graph([transpose, lm_head], x, {"embedding": table}), path)
            optimization._quantize_int8(path, False, optimization.INT8_SETTINGS)
            ops = [n.op_type for n in ir.load(path).graph]
        self.assertIn("MatMulInteger", ops)
        self.assertNotIn("Transpose", ops)

    def test_short_weight_matmuls_are_the_rotary_product_not_projections(self):
        x = ir.Value(name="x", shape=ir.Shape([7, 1]), type=ir.TensorType(ir.DataType.FLOAT))
        rotary = ir.node("MatMul", [x, _value("inv_freq", np.ones((1, 32), np.float32))], name="freqs")
        projection = ir.node("MatMul", [rotary.outputs[0], _value("w", np.ones((32, 8), np.float32))], name="proj")
        model = _graph([rotary, projection], x, {})
        model.graph.register_initializer(rotary.inputs[1])
        model.graph.register_initializer(projection.inputs[1])
        self.assertEqual(optimization.short_weight_matmuls(model), {"freqs"})


class TestSymbolicDims(unittest.TestCase):
    def test_equal_lengths_written_differently_become_one_string(self):
        shapes = {
            "a": ["batch", "past_sequence_length + sequence_length", 64],
            "b": ["batch", "sequence_length + past_sequence_length", 64],
            "c": ["Min(sequence_length + past_sequence_length, past_sequence_length + sequence_length)", "E + N"],
        }
        x = ir.Value(name="x", shape=ir.Shape(["batch", "sequence_length + past_sequence_length"]),
                     type=ir.TensorType(ir.DataType.FLOAT))
        nodes = [ir.node("Identity", [x], name=name) for name in shapes]
        values = [node.outputs[0] for node in nodes]
        for value, shape in zip(values, shapes.values()):
            value.shape = ir.Shape(shape)
        out = ir.node("Identity", [values[0]])
        out.outputs[0].shape = ir.Shape(["sequence_length + past_sequence_length"])
        graph = ir.Graph([x], [out.outputs[0]], nodes=[*nodes, out], opset_imports={"": 21})
        model = ir.Model(graph, ir_version=10)

        self.assertEqual(ort_fusions.symbolic_dims_canonical(model), 2)  # b[1] and c[0]
        a, b, c = (list(v.shape) for v in values)
        self.assertEqual(str(a[1]), str(b[1]))
        self.assertEqual(a[0], b[0])  # plain names untouched
        self.assertEqual(str(c[0]), str(a[1]))  # Min of two equal lengths
        self.assertEqual(str(c[1]), "E + N")  # names are symbols, not sympy's constants
        # The graph's inputs and outputs keep their dimension names.
        self.assertEqual(str(list(x.shape)[1]), "sequence_length + past_sequence_length")
        self.assertEqual(str(list(out.outputs[0].shape)[0]), "sequence_length + past_sequence_length")
        self.assertEqual(ort_fusions.symbolic_dims_canonical(model), 0)


class TestExportStage(unittest.TestCase):
    def setUp(self):
        self.scratch = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.scratch, True)

    def test_quality_threshold_fails_loudly_after_the_fused_files_validated(self):
        output = self.scratch / "onnx"
        with self.assertRaises(ObserverExportError) as caught:
            optimum_observer.export(
                self.artifacts.causal_lm(MODEL_TYPE), output, optimize=True, quantize="int4", max_perplexity_ratio=0.5
            )
        error = caught.exception
        self.assertEqual(error.stage, Stage.OPTIMIZATION)
        self.assertIn("--max-perplexity-ratio", error.remedy)
        # The fused file passed the fp32 checks (exact tokens); the quantized one was measured.
        self.assertTrue(error.report.ok, error.report.table())
        self.assertGreater(error.report.quality.perplexity_ratio, 0.5)
        self.assertIn("quantized: perplexity / fp32 file", str(error))
        self.assertFalse(output.exists())

    def test_encoder_cosine_limit_fails_loudly(self):
        # A tiny random BERT quantized with the encoder settings: its cosine is within 1e-6 of 1
        # (small random weights), so only the limit 1.0, which no quantized file reaches, fails it.
        source = save_encoder("bert", "AutoModel", self.scratch / "bert")
        output = self.scratch / "onnx"
        with self.assertRaises(ObserverExportError) as caught:
            optimum_observer.export(source, output, task="feature-extraction", quantize="int8", min_cosine=1.0)
        error = caught.exception
        self.assertEqual(error.stage, Stage.OPTIMIZATION)
        self.assertIn("--min-cosine", error.remedy)
        self.assertTrue(error.report.ok, error.report.table())  # the fp32 file validated
        self.assertIsInstance(error.report.quality, CosineCheck)
        self.assertLess(error.report.quality.min_cosine, 1.0)
        self.assertGreater(error.report.quality.min_cosine, 0.99)
        self.assertIn("quantized: min cosine to torch, last_hidden_state", str(error))
        self.assertFalse(output.exists())

    @parameterized.expand(
        [("feature-extraction", "int4", "minimum cosine of 0.95"), ("text2text-generation-with-past", "int8", "not implemented for encoder-decoder generation")]
    )
    def test_mode_a_task_family_does_not_offer_is_refused_before_any_work(self, task, mode, reason):
        with self.assertRaises(ObserverExportError) as caught:
            optimum_observer.export(self.scratch / "missing-model", self.scratch / "onnx", task=task, quantize=mode)
        self.assertEqual(caught.exception.stage, Stage.OPTIMIZATION)
        self.assertIn(reason, caught.exception.reason)

    def test_unknown_quantize_mode_is_refused_before_any_work(self):
        with self.assertRaises(ObserverExportError) as caught:
            optimum_observer.export(self.scratch / "missing-model", self.scratch / "onnx", quantize="int3")
        self.assertEqual(caught.exception.stage, Stage.OPTIMIZATION)
        self.assertIn("int8, int4", caught.exception.remedy)

    def test_cli_passes_the_options_to_export(self):
        result = ExportResult(self.scratch, MODEL_TYPE, "text-generation-with-past", ["model.onnx"], {}, None, {})
        with mock.patch("optimum_observer.pipeline.export", return_value=result) as export:
            code = cli.main(
                ["export", "-m", "some/model", str(self.scratch), "--optimize", "--quantize", "int4",
                 "--max-perplexity-ratio", "1.2", "--min-cosine", "0.98"]
            )
        self.assertEqual(code, 0)
        kwargs = export.call_args.kwargs
        self.assertEqual(
            (kwargs["optimize"], kwargs["quantize"], kwargs["max_perplexity_ratio"], kwargs["min_cosine"]),
            (True, "int4", 1.2, 0.98),
        )
        with self.assertRaises(SystemExit):
            cli.main(["export", "-m", "some/model", str(self.scratch), "--quantize", "int3"])


@pytest.mark.slow
class TestMoreTypes(unittest.TestCase):
    @parameterized.expand(
        [(t, q) for t in ("qwen3", "starcoder2", "mixtral") for q in ("int8", "int4")],
        name_func=lambda function, _, param: f"{function.__name__}_{param.args[0]}_{param.args[1]}",
    )
    def test_optimize_and_quantize(self, model_type, mode):
        # mixtral int8: quantize_dynamic's second shape inference refused the fused graph until
        # optimization._intermediate_shapes_dropped.
        self.assertOptimizedAndQuantized(model_type, mode)

    def assertOptimizedAndQuantized(self, model_type, mode):
        with tempfile.TemporaryDirectory() as scratch:
            source = save_causal_lm(model_type, Path(scratch) / "model")
            result = optimum_observer.export(source, Path(scratch) / "onnx", optimize=True, quantize=mode)
            self.assertTrue(result.validation.ok, result.validation.table())
            self.assertLessEqual(result.validation.quality.perplexity_ratio, optimization.MAX_PERPLEXITY_RATIO[mode])
            model = ORTModelForCausalLM.from_pretrained(result.output_dir)
            ids = torch.tensor([[5, 6, 7]])
            self.assertEqual(model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4).shape, (1, 7))
