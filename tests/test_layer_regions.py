"""Decoder layers as torch.export regions (optimum_observer/patches/layer_regions.py): each
layer's code traced once per pass, the same ONNX outputs, and the export as before when a layer
does not fit a region."""

from __future__ import annotations

import contextlib
import tempfile
import unittest
import unittest.mock
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

import optimum_observer
from optimum_observer import conversion
from optimum_observer.demo import DECODER_SIZES
from optimum_observer.patches import layer_regions
from optimum_observer.patches.layer_regions import LayerRegions, memoized_region_fake_impl
from tiny_models import save_causal_lm

LAYERS = 4


@contextlib.contextmanager
def spied_regions(same_past_length: bool = True):
    """Records the export's :class:`LayerRegions` and the fake implementation's counts; with
    `same_past_length` False, the past-length check is left out."""
    seen: dict[str, object] = {}
    upstream_init = LayerRegions.__init__
    upstream_memo = layer_regions.memoized_region_fake_impl

    def init(self, stacks):
        upstream_init(self, stacks)
        seen["regions"] = self

    @contextlib.contextmanager
    def memo():
        with upstream_memo() as stats:
            seen["stats"] = stats
            yield stats

    with contextlib.ExitStack() as stack:
        stack.enter_context(unittest.mock.patch.object(LayerRegions, "__init__", init))
        stack.enter_context(unittest.mock.patch.object(layer_regions, "memoized_region_fake_impl", memo))
        if not same_past_length:
            stack.enter_context(unittest.mock.patch.object(LayerRegions, "_same_past_length", lambda *a: None))
        yield seen


def _feed(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Batch 2, 3 new tokens after 5 past ones, left padding on the first row."""
    rng = np.random.default_rng(0)
    feed = {}
    for entry in session.get_inputs():
        if entry.name == "input_ids":
            feed[entry.name] = rng.integers(3, 200, size=(2, 3), dtype=np.int64)
        elif entry.name == "attention_mask":
            feed[entry.name] = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], dtype=np.int64)
        elif entry.name == "position_ids":
            feed[entry.name] = np.array([[3, 4, 5], [5, 6, 7]], dtype=np.int64)
        else:
            heads, size = DECODER_SIZES["num_key_value_heads"], DECODER_SIZES["head_dim"]
            feed[entry.name] = rng.standard_normal((2, heads, 5, size)).astype(np.float32)
    return feed


class TestLlamaThroughRegions(unittest.TestCase):
    """A 4-layer llama with real-checkpoint shapes (grouped-query attention 4/2, head_dim 32)
    exported with regions (the default) and without."""

    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory()
        root = Path(cls.scratch.name)
        source = save_causal_lm("llama", root / "model", num_hidden_layers=LAYERS)
        with spied_regions() as cls.seen:
            cls.with_regions = optimum_observer.export(source, root / "regions")
        with spied_regions(same_past_length=False) as cls.unchecked:
            optimum_observer.export(source, root / "unchecked", validate=False)
        with unittest.mock.patch.object(conversion, "decoder_layer_regions", lambda model: contextlib.nullcontext()):
            cls.without = optimum_observer.export(source, root / "plain")

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_every_layer_call_went_through_one_region_body(self):
        regions = self.seen["regions"]
        self.assertEqual(regions.calls, LAYERS)
        self.assertEqual(len(regions._bodies), 1)

    def test_the_body_ran_once_per_pass_not_once_per_layer(self):
        # Passes: torch.export's trace, the decompositions' metadata and capture passes.
        stats = self.seen["stats"]
        self.assertLessEqual(stats.runs, 3)
        self.assertEqual(stats.runs + stats.reused, 3 * LAYERS)

    def test_without_the_past_length_check_no_two_layers_share_a_call(self):
        stats = self.unchecked["stats"]
        self.assertEqual(stats.reused, 0)
        self.assertEqual(stats.runs, 3 * LAYERS)

    def test_both_exports_validate(self):
        for result in (self.with_regions, self.without):
            self.assertTrue(all(call.ok for call in result.validation.calls))
            self.assertTrue(result.validation.generation)
            self.assertTrue(all(check.ok for check in result.validation.generation))

    def test_onnx_runtime_gives_the_same_outputs(self):
        sessions = [
            ort.InferenceSession(str(result.output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
            for result in (self.with_regions, self.without)
        ]
        self.assertEqual([i.name for i in sessions[0].get_inputs()], [i.name for i in sessions[1].get_inputs()])
        self.assertEqual([o.name for o in sessions[0].get_outputs()], [o.name for o in sessions[1].get_outputs()])
        feed = _feed(sessions[0])
        for a, b in zip(*(session.run(None, feed) for session in sessions)):
            self.assertEqual(a.shape, b.shape)
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    def test_the_layers_forward_and_requires_grad_are_put_back(self):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32,
        ))
        with self.assertRaises(RuntimeError):
            with layer_regions.decoder_layer_regions(model) as regions:
                self.assertIsNotNone(regions)
                self.assertIn("forward", vars(model.model.layers[0]))
                self.assertFalse(any(p.requires_grad for p in model.parameters()))
                raise RuntimeError("inside the block")
        self.assertNotIn("forward", vars(model.model.layers[0]))
        self.assertTrue(all(p.requires_grad for p in model.parameters()))


class TestRejectedRegion(unittest.TestCase):
    """A layer that asks its cache for more than `update` cannot be a region: the export falls
    back to the layers as they are, and still validates."""

    def test_export_runs_again_without_regions(self):
        from transformers.models.llama import modeling_llama

        upstream = modeling_llama.LlamaAttention.forward

        def forward(self, *args, **kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None:
                cache.get_seq_length()
            return upstream(self, *args, **kwargs)

        with tempfile.TemporaryDirectory() as scratch:
            source = save_causal_lm("llama", Path(scratch) / "model")
            with unittest.mock.patch.object(modeling_llama.LlamaAttention, "forward", forward), \
                    self.assertLogs(conversion.logger, "INFO") as logs:
                result = optimum_observer.export(source, Path(scratch) / "out")
        self.assertIn("exporting without decoder-layer regions", "\n".join(logs.output))
        self.assertIn("get_seq_length", "\n".join(logs.output))
        self.assertTrue(all(call.ok for call in result.validation.calls))


class TestLayerSignatures(unittest.TestCase):
    """Layers share a body only when their non-tensor state is the same apart from `layer_idx`."""

    def test_sliding_and_full_attention_layers_differ(self):
        config = transformers.Gemma2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, sliding_window=8,
        )
        model = transformers.Gemma2ForCausalLM(config)
        (stack,) = layer_regions._layer_stacks(model)
        signatures = [layer_regions._state_signature(layer) for layer in stack]
        self.assertEqual(config.layer_types[:2], ["sliding_attention", "full_attention"])
        self.assertNotEqual(signatures[0], signatures[1])
        self.assertEqual(signatures[0], signatures[2])
        self.assertEqual(signatures[1], signatures[3])

    def test_a_stack_without_layer_indices_is_not_one(self):
        model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
        self.assertEqual(layer_regions._layer_stacks(model), [])


class TestMemoizedFakeImpl(unittest.TestCase):
    """invoke_subgraph's fake implementation runs a body once for operands of one metadata, and
    torch's own is back after the block."""

    def test_torch_function_is_put_back(self):
        from torch._higher_order_ops.utils import registered_hop_fake_fns

        hop = torch.ops.higher_order.invoke_subgraph
        upstream = registered_hop_fake_fns[hop]
        with self.assertRaises(RuntimeError):
            with memoized_region_fake_impl():
                self.assertIsNot(registered_hop_fake_fns[hop], upstream)
                raise RuntimeError("inside the block")
        self.assertIs(registered_hop_fake_fns[hop], upstream)


def _tiny_llama(layers: int = 3) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


class TestRegionsEagerly(unittest.TestCase):
    """The regions' plumbing run eagerly (`invoke_subgraph` calls its body; torch.export reported
    as tracing): the cache goes in and out as tensors, and a layer whose code reads its
    `layer_idx` is refused instead of being given layer 0's index."""

    def step(self, model, past):
        ids = torch.tensor([[5, 6], [7, 8]])
        with torch.no_grad(), unittest.mock.patch.object(torch.compiler, "is_exporting", lambda: True), \
                layer_regions.decoder_layer_regions(model) as regions:
            logits = model(ids, past_key_values=past).logits
        return logits, regions

    def prefix(self, model):
        with torch.no_grad():
            return model(torch.tensor([[1, 2, 3], [4, 3, 2]]), use_cache=True).past_key_values

    def test_same_logits_and_cache_as_the_layers_themselves(self):
        model = _tiny_llama()
        past, reference_past = self.prefix(model), self.prefix(model)
        with torch.no_grad():
            reference = model(torch.tensor([[5, 6], [7, 8]]), past_key_values=reference_past).logits
        logits, regions = self.step(model, past)
        self.assertEqual((regions.calls, len(regions._bodies)), (3, 1))
        torch.testing.assert_close(logits, reference, rtol=0, atol=0)
        for ours, theirs in zip(past.layers, reference_past.layers):
            self.assertEqual(ours.keys.shape[-2], 5)
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
            torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=0)

    def test_a_layer_reading_its_layer_idx_is_refused(self):
        from transformers.models.llama import modeling_llama

        upstream = modeling_llama.LlamaAttention.forward

        def forward(self, *args, **kwargs):
            if self.layer_idx >= 2:  # what qwen2_moe does with max_window_layers
                raise AssertionError("not reached")
            return upstream(self, *args, **kwargs)

        model = _tiny_llama()
        past = self.prefix(model)
        with unittest.mock.patch.object(modeling_llama.LlamaAttention, "forward", forward), \
                self.assertRaisesRegex(layer_regions.RegionRejected, "reads its layer_idx"):
            self.step(model, past)


class TestDataDependentSizes(unittest.TestCase):
    """flex_olmo's experts pick their tokens with `nonzero`: inside one region body every layer's
    count would be one size name (`u18`) in the ONNX file, which ONNX Runtime takes as one size
    and fails on ("Shape mismatch attempting to re-use buffer {1,3} != {1,11}"). Such a layer is
    refused and the export runs without regions."""

    @classmethod
    def setUpClass(cls):
        from legacy_shim.tooling.tiny_configs import build_tiny_model
        from optimum_observer.demo import build_tokenizer

        cls.scratch = tempfile.TemporaryDirectory()
        cls.source = Path(cls.scratch.name) / "model"
        build_tiny_model("flex_olmo", "AutoModelForCausalLM").save_pretrained(cls.source)
        build_tokenizer(cls.source)

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_refused_then_exported_without_regions(self):
        with self.assertLogs(conversion.logger, "INFO") as logs:
            result = optimum_observer.export(self.source, Path(self.scratch.name) / "out")
        self.assertIn("data-dependent sizes", "\n".join(logs.output))
        self.assertTrue(all(call.ok for call in result.validation.calls))
        self.assertTrue(result.validation.generation and all(g.ok for g in result.validation.generation))

    def test_without_the_refusal_onnx_runtime_fails(self):
        with unittest.mock.patch.object(layer_regions, "_unbacked_symbols", lambda operands: 0), \
                self.assertRaisesRegex(Exception, "Shape mismatch"):
            optimum_observer.export(self.source, Path(self.scratch.name) / "unrefused")
