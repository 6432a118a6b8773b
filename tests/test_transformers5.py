"""The entry points on every family, end to end: CI's subset on transformers 5 (marker `transformers5`).

Each export is validated through `legacy_shim`'s runtime class of the task (replay of every
observed call plus greedy generation against torch): on transformers 5 that is the class users
load, optimum-onnx's own ones failing at import. Deselected from the default run, whose
transformers 4.57.6 tests cover the same entry points beside the legacy exporter;
`.ci/run` runs this file in its second, transformers-5 venv (README.md, "transformers 5").

State-space models keep their states in transformers 5's `DynamicCache` of linear-attention layers;
mamba exports here with the graph names of transformers 4.57.6 (`past_key_values.{i}.value.conv_state`,
`.ssm_state`), so legacy_shim's one state runtime feeds both.

Not here because it cannot run on transformers 5: every comparison with optimum-onnx's exporter.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import onnx
import pytest
from parameterized import parameterized

import legacy_shim
import optimum_observer
from legacy_shim.optimum_compat import legacy_exporter_status
from legacy_shim.router import Exporter
from shim_helpers import ort_greedy, torch_greedy
from tiny_families import save_encoder, save_seq2seq_lm, save_whisper, whisper_feature_extractor

pytestmark = pytest.mark.transformers5

WITH_PAST = "text-generation-with-past"


class TestObserverExportOfEveryFamily(unittest.TestCase):
    def setUp(self):
        self._scratch = tempfile.TemporaryDirectory()
        self.scratch = Path(self._scratch.name)

    def tearDown(self):
        self._scratch.cleanup()

    def assertValidatedThroughTheRuntimeClass(self, result: optimum_observer.ExportResult, generates: bool = True):
        report = result.validation
        self.assertTrue(report.ok, report.table())
        self.assertTrue(report.calls, report.table())
        self.assertTrue(all(c.max_abs_diff <= 1e-4 for c in report.calls), report.table())
        # Generation token for token against torch, or (encoders) the runtime class's outputs.
        self.assertTrue(report.generation if generates else report.runtime, report.table())

    def test_decoder_with_grouped_query_attention(self):
        source = self.artifacts.causal_lm("llama")
        result = optimum_observer.export(
            source, self.scratch / "onnx", task=WITH_PAST, runtime_class=legacy_shim.ORTModelForCausalLM
        )
        self.assertValidatedThroughTheRuntimeClass(result)

    def test_mixture_of_experts(self):
        # transformers 5: pluggable experts exported with "batched_mm" (experts_implementation);
        # transformers 4.57: the dense_mixtral_moe patch.
        source = self.artifacts.causal_lm("mixtral")
        result = optimum_observer.export(
            source, self.scratch / "onnx", task=WITH_PAST, runtime_class=legacy_shim.ORTModelForCausalLM
        )
        self.assertValidatedThroughTheRuntimeClass(result)

    def test_state_space_model(self):
        # mamba (expand 2, 16 SSM states, 4-wide convolution, dt rank hidden / 16, as its
        # checkpoints): one graph for prefill and decode, its states carried in value slots under
        # the names the transformers-4.57 export has.
        source = self.artifacts.causal_lm("mamba")
        result = optimum_observer.export(
            source, self.scratch / "onnx", task=WITH_PAST, runtime_class=legacy_shim.ORTModelForCausalLM
        )
        self.assertValidatedThroughTheRuntimeClass(result)
        graph = onnx.load(self.scratch / "onnx" / "model.onnx", load_external_data=False).graph
        states = [f"{layer}.value.{state}" for layer in range(2) for state in ("conv_state", "ssm_state")]
        self.assertEqual(
            [i.name for i in graph.input],
            ["input_ids", "attention_mask", *(f"past_key_values.{name}" for name in states)],
        )
        self.assertEqual([o.name for o in graph.output], ["logits", *(f"present.{name}" for name in states)])

    @parameterized.expand([("t5",)])
    def test_text2text(self, model_type):
        source = save_seq2seq_lm(model_type, self.scratch / model_type)
        result = optimum_observer.export(
            source, self.scratch / "onnx", task="text2text-generation-with-past",
            runtime_class=legacy_shim.ORTModelForSeq2SeqLM,
        )  # fmt: skip
        self.assertValidatedThroughTheRuntimeClass(result)

    def test_speech(self):
        source = save_whisper(self.scratch / "whisper")
        result = optimum_observer.export(
            source, self.scratch / "onnx", task="automatic-speech-recognition-with-past",
            runtime_class=legacy_shim.ORTModelForSpeechSeq2Seq, feature_extractor=whisper_feature_extractor(),
        )  # fmt: skip
        self.assertValidatedThroughTheRuntimeClass(result)

    def test_encoder(self):
        source = save_encoder("bert", "AutoModel", self.scratch / "bert")
        result = optimum_observer.export(
            source, self.scratch / "onnx", task="feature-extraction",
            runtime_class=legacy_shim.ORTModelForFeatureExtraction,
        )  # fmt: skip
        self.assertValidatedThroughTheRuntimeClass(result, generates=False)


class TestLegacyShimEntryPoints(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._scratch = tempfile.TemporaryDirectory()
        cls.scratch = Path(cls._scratch.name)

    @classmethod
    def tearDownClass(cls):
        cls._scratch.cleanup()

    def expected_route(self) -> Exporter:
        # optimum-onnx supports llama and qwen3: it exports them wherever it can run.
        return Exporter.LEGACY if legacy_exporter_status().available else Exporter.OBSERVER

    def test_main_export_generates_torch_tokens(self):
        source = self.artifacts.causal_lm("qwen3")
        output = self.scratch / "main_export"
        result = legacy_shim.main_export(str(source), output, task=WITH_PAST)
        self.assertEqual(result.route, self.expected_route(), result.decision.explain())
        if result.route is Exporter.OBSERVER:
            self.assertIn(legacy_exporter_status().reason, result.decision.reason)
            self.assertTrue(result.observer_result.validation.ok)
        ort_model = legacy_shim.ORTModelForCausalLM.from_pretrained(output)
        self.assertEqual(ort_greedy(ort_model, source), torch_greedy(source))

    def test_from_pretrained_export_generates_torch_tokens(self):
        source = self.artifacts.causal_lm("llama")
        ort_model = legacy_shim.ORTModelForCausalLM.from_pretrained(source, export=True)
        self.assertIsInstance(ort_model, legacy_shim.ORTModelForCausalLM)
        self.assertEqual(ort_greedy(ort_model, source), torch_greedy(source))

    def test_state_space_model_through_both_entry_points(self):
        source = self.artifacts.causal_lm("mamba")
        output = self.scratch / "main_export_mamba"
        result = legacy_shim.main_export(str(source), output, task=WITH_PAST)
        if result.route is Exporter.OBSERVER:
            self.assertTrue(result.observer_result.validation.ok, result.observer_result.validation.table())
        expected = torch_greedy(source)
        self.assertEqual(ort_greedy(legacy_shim.ORTModelForCausalLM.from_pretrained(output), source), expected)
        exported = legacy_shim.ORTModelForCausalLM.from_pretrained(source, export=True)
        self.assertEqual(ort_greedy(exported, source), expected)

    def test_explain_names_the_exporter_and_why(self):
        text = legacy_shim.explain("llama", WITH_PAST)
        self.assertIn(f"-> {self.expected_route().value}", text)
        if not legacy_exporter_status().available:
            self.assertIn(legacy_exporter_status().reason, text)


class TestTinyModelsForTheSweep(unittest.TestCase):
    def test_a_config_without_a_pad_token_id_builds(self):
        # transformers 5 configs define only the token ids their model has: CodeGenConfig has no
        # pad_token_id, and the sweep's tiny codegen failed at config build reading it.
        from legacy_shim.tooling.tiny_configs import build_tiny_model

        model = build_tiny_model("codegen", "AutoModelForCausalLM")
        self.assertIsInstance(model.generation_config.pad_token_id, int)

    def test_layers_with_their_own_settings_keep_them(self):
        # gemma4's full-attention layers have twice the head_dim of its sliding ones
        # (`per_layer_config`); the tiny model keeps one of each, with the same ratio.
        from legacy_shim.tooling.tiny_configs import build_tiny_model

        model = build_tiny_model("gemma4_text", "AutoModelForCausalLM")
        head_dims = [layer.self_attn.head_dim for layer in model.model.layers]
        # (config.head_dim itself raises on a config with per-layer values: read the stored one.)
        head_dim = model.config.to_dict()["head_dim"]
        self.assertEqual(head_dims, [head_dim, 2 * head_dim])


class TestStateSpaceCaches(unittest.TestCase):
    """transformers 5 keeps state-space states in a `DynamicCache` of linear-attention layers."""

    @staticmethod
    def filled_cache(model_type: str):
        import torch

        from legacy_shim.tooling.tiny_configs import build_tiny_model

        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        with torch.no_grad():
            return model(torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True).cache

    @parameterized.expand([("mamba", 2, ()), ("jamba", 1, (1,))])
    def test_flattens_to_named_states_and_back(self, model_type, state_layers, attention_layers):
        import torch
        import torch.utils._pytree as pytree

        from optimum_observer.cache_pytree import cache_leaf_names, registered_caches

        cache = self.filled_cache(model_type)
        with registered_caches():
            leaves, spec = pytree.tree_flatten(cache)
            names = cache_leaf_names("present", cache)
            rebuilt = pytree.tree_unflatten(leaves, spec)
        suffixes = [name.split(".", 2)[2] for name in names]
        self.assertEqual(suffixes.count("conv_state"), state_layers)
        self.assertEqual(suffixes.count("ssm_state"), state_layers)
        self.assertEqual(sorted({int(n.split(".")[1]) for n in names if n.endswith(".key")}), list(attention_layers))
        for index, layer in enumerate(cache.layers):
            if cache.is_linear[index] or hasattr(layer, "conv_states"):
                self.assertTrue(torch.equal(rebuilt.get_conv_state(index), layer.conv_states[0]))
                self.assertTrue(torch.equal(rebuilt.get_recurrent_state(index), layer.recurrent_states[0]))
            elif layer.keys is not None:
                self.assertTrue(torch.equal(rebuilt.layers[index].keys, layer.keys))

    @parameterized.expand([("mamba",), ("jamba",), ("zamba",)])
    def test_unified_functions_generate_as_upstream(self, model_type):
        # One program for prefill and decode from the cached states (the graph's), equal to
        # upstream's two at every step, left padding included.
        import torch

        from legacy_shim.tooling.tiny_configs import build_tiny_model
        from optimum_observer.patches import PATCHES, applied, for_model
        from optimum_observer.reference_inputs import random_token_batch

        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        inputs = random_token_batch(model, [7, 4], torch.Generator().manual_seed(0), left_padding=True)

        def logits():
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0,
                )  # fmt: skip
            return torch.stack(out.logits)

        expected = logits()
        patches = [p for p in for_model(PATCHES, model, model_type) if p.transformers == 5]
        self.assertTrue(any("_unified_" in p.name for p in patches))
        with applied(patches) as done:
            got = logits()
        self.assertFalse(done.skipped)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


#: One model type per transformers-5 state-space function patch (optimum_observer.patches.state_space):
#: the others replace the same function, copied into another model's module.
_ONE_PER_FUNCTION = (
    ("mamba_unified_apply_mask_to_padding_states", "mamba"),
    ("mamba_unified_mamba_scan_forward", "mamba"),
    ("zamba_unified_mixer_on_dynamic_cache", "zamba"),
)


#: Zamba-7B's layout (tiny_configs' zamba): two hybrid layers sharing one attention block.
_REAL_SHAPES = {"zamba": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "mamba", "hybrid", "hybrid"]}}


class TestEveryStateSpaceFunctionPatchIsNeeded(unittest.TestCase):
    @parameterized.expand(_ONE_PER_FUNCTION)
    def test_export_or_replay_fails_without_it(self, patch_name, model_type):
        from optimum_observer.errors import ObserverExportError, Stage
        from optimum_observer.patches import PATCHES, applied, for_model_runs
        from stages import load_tiny, observe, replay_without

        loaded = load_tiny(model_type, self.scratch / "model", **_REAL_SHAPES.get(model_type, {}))
        with applied(for_model_runs(PATCHES, loaded.model, model_type)):  # as the pipeline runs the model
            observed = observe(loaded)
        try:
            checks = replay_without(observed, self.scratch, patch_name)
        except ObserverExportError as error:
            self.assertIn(error.stage, (Stage.TORCH_EXPORT, Stage.ONNX_CONVERSION))
            return
        self.assertFalse(all(c.ok for c in checks), f"{model_type} replays right without {patch_name}")

    def setUp(self):
        self._scratch = tempfile.TemporaryDirectory()
        self.scratch = Path(self._scratch.name)

    def tearDown(self):
        self._scratch.cleanup()
