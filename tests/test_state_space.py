"""State-space and hybrid models (mamba, falcon_mamba, mamba2; bamba, granitemoehybrid, jamba):
their convolution and SSM states exported as cache inputs and outputs of one graph for prefill
and decode, next to the attention layers' keys and values, generating through legacy_shim's
ORTModelForCausalLM, which feeds every `present.*` back by name."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parameterized import parameterized

import optimum_observer
from legacy_shim import state_runtime
from legacy_shim.modeling import ORTModelForCausalLM
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.reference_inputs import random_token_batch
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES, applied, plain_tensor_buffers
from legacy_shim.tooling.tiny_configs import build_tiny_model
from stages import load, observe, replay_without

#: Per tiny model: (state inputs, layers with attention keys/values). Mamba layers hold a conv
#: window and an SSM state, LFM2's convolution layers a window only, Qwen3-Next's linear
#: attention layers a window and a recurrent state, MiniMax's lightning attention a state only;
#: jamba-style hybrids alternate layers; falcon_h1 runs both in every layer; zamba's hybrid
#: layers add a shared attention block.
LAYERS = {
    "mamba": (4, 0),
    "falcon_mamba": (4, 0),
    "mamba2": (4, 0),
    "bamba": (2, 1),
    "granitemoehybrid": (2, 1),
    "jamba": (2, 1),
    "falcon_h1": (4, 2),
    "zamba": (6, 1),
    "zamba2": (4, 1),
    "lfm2": (1, 1),
    "qwen3_next": (2, 1),
    "minimax": (1, 1),
}
MODEL_TYPES = tuple(LAYERS)
#: Exported in the default suite: one type per cache flattening of optimum_observer.cache_pytree
#: (state cache, Mamba2's stacked one, and each hybrid layout: mamba-style, short convolution,
#: gated delta, linear attention). The others flatten like one of these; their mixer patches
#: keep a default-suite test in TestUnifiedMixers; their exports are the coverage sweep's too
#: (docs/coverage.md) and run with `-m slow`.
EXPORTED_BY_DEFAULT = ("mamba", "mamba2", "jamba", "lfm2", "qwen3_next", "minimax")


def _patches_of(model_type: str):
    return [p for p in PATCHES if p.name.startswith(f"{model_type}_")]


def _prompts(model, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_token_batch(model, [7, 4], torch.Generator().manual_seed(seed), left_padding=True)


def _generate_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    return torch.stack(out.logits)


class TestUnifiedMixers(unittest.TestCase):
    @parameterized.expand(MODEL_TYPES)
    def test_one_program_matches_prefill_and_decode_of_eager(self, model_type):
        # The patched mixer replaces two programs (prefill, decode) by one: generate with it
        # must give the same logits at every step, left padding included.
        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        inputs = _prompts(model)
        expected = _generate_logits(model, inputs)
        patches = _patches_of(model_type)
        self.assertTrue(any("_unified_" in p.name for p in patches))
        with applied(patches):
            got = _generate_logits(model, inputs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


class TestMambaPatchesAreNeeded(unittest.TestCase):
    """One observed run of the tiny mamba serves both conversions."""

    @classmethod
    def setUpClass(cls):
        cls.observed = _observe("mamba")

    def test_without_the_unified_mixer_torch_export_specialises_the_sequence(self):
        # `for i in range(seq_len)` unrolls to the example's length.
        with self.assertRaises(ObserverExportError) as caught:
            _replay_without(self.observed, "mamba_unified_mixer")
        self.assertEqual(caught.exception.stage, Stage.TORCH_EXPORT)
        self.assertIn("inferred a static shape", str(caught.exception.__cause__))

    def test_without_the_cache_position_patch_torch_export_refuses(self):
        with self.assertRaises(ObserverExportError) as caught:
            _replay_without(self.observed, "mamba_cache_position_optional")
        self.assertEqual(caught.exception.stage, Stage.TORCH_EXPORT)
        self.assertIn("cache_position", str(caught.exception.__cause__))


def _observe(model_type: str):
    """The tiny model saved and loaded as the pipeline loads a checkpoint, its run observed."""
    with tempfile.TemporaryDirectory() as scratch:
        build_tiny_model(model_type, "AutoModelForCausalLM").save_pretrained(Path(scratch) / "model")
        return observe(load(Path(scratch) / "model"))


def _replay_without(observed, patch_name: str) -> list:
    """Exports the observed model without one patch and replays the observed calls on the graph;
    raises the conversion stage's error when torch.export refuses."""
    with tempfile.TemporaryDirectory() as scratch:
        return replay_without(observed, Path(scratch), patch_name)


#: Every state-space patch but the two mamba ones tested above, with the model type it is for.
_OTHER_STATE_SPACE_PATCHES = [
    (p.name, next(t for t in sorted(LAYERS, key=len, reverse=True) if p.name.startswith(f"{t}_")))
    for p in PATCHES
    if p.name.startswith(tuple(f"{t}_" for t in LAYERS))
    and not p.name.startswith("dense_")
    and p.name not in ("mamba_unified_mixer", "mamba_cache_position_optional")
]


@pytest.mark.slow  # one hybrid export per patch (the file's slowest group); mamba's patches stay in the default suite
class TestEveryStateSpacePatchIsNeeded(unittest.TestCase):
    @parameterized.expand(_OTHER_STATE_SPACE_PATCHES)
    def test_export_or_replay_fails_without_it(self, patch_name, model_type):
        try:
            checks = _replay_without(_observe(model_type), patch_name)
        except ObserverExportError as error:
            self.assertIn(error.stage, (Stage.TORCH_EXPORT, Stage.ONNX_CONVERSION))
            return
        self.assertFalse(all(c.ok for c in checks), f"{model_type} replays right without {patch_name}")


class TestStateSpaceExport(unittest.TestCase):
    @parameterized.expand(EXPORTED_BY_DEFAULT)
    def test_export_names_states_and_generates_through_the_shim(self, model_type):
        self.assertExportNamesStatesAndGeneratesThroughTheShim(model_type)

    @parameterized.expand([t for t in MODEL_TYPES if t not in EXPORTED_BY_DEFAULT])
    @pytest.mark.slow
    def test_export_of_more_types_names_states_and_generates_through_the_shim(self, model_type):
        self.assertExportNamesStatesAndGeneratesThroughTheShim(model_type)

    def assertExportNamesStatesAndGeneratesThroughTheShim(self, model_type: str) -> None:
        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "out"
            result = optimum_observer.export(
                model,
                out,
                task="text-generation-with-past",
                show_progress=False,
                runtime_class=ORTModelForCausalLM,
            )
            self.assertTrue(result.validation.ok)
            self.assertTrue(result.validation.generation)
            session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            shapes = {i.name: i.shape for i in session.get_inputs()}
            past = [n for n in shapes if n.startswith("past_key_values.")]
            presents = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
            self.assertEqual([state_runtime.present_name(n) for n in past], presents)
            states = [n for n in past if n.endswith((".conv_state", ".ssm_state", ".recurrent_state"))]
            state_inputs, attention_layers = LAYERS[model_type]
            self.assertEqual(len(states), state_inputs)
            for name in states:  # only the batch varies
                self.assertEqual(shapes[name][0], "batch_size")
                self.assertTrue(all(isinstance(d, int) for d in shapes[name][1:]), shapes[name])
            keys_values = [n for n in past if n.endswith((".key", ".value"))]
            self.assertEqual(len(keys_values), 2 * attention_layers)
            self.assertEqual(len(past), len(states) + len(keys_values))

            # Step by step through the shim's runtime against torch: logits of the prefill and
            # of every decode step, with the states fed back by name.
            onnx_model = ORTModelForCausalLM.from_pretrained(out)
            inputs = _prompts(model, seed=3)
            expected = _generate_logits(model, inputs)
            with torch.no_grad():
                got = onnx_model.generate(
                    **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0,
                )  # fmt: skip
            torch.testing.assert_close(torch.stack(got.logits), expected, atol=1e-4, rtol=1e-4)


class TestStateRuntime(unittest.TestCase):
    def test_first_step_shapes(self):
        self.assertEqual(state_runtime.first_step_shape(["batch_size", 128, 4], 3), (3, 128, 4))
        self.assertEqual(
            state_runtime.first_step_shape(["batch_size", 4, "past_sequence_length", 16], 2), (2, 4, 0, 16)
        )

    def test_state_inputs_are_told_from_key_value_caches(self):
        self.assertTrue(state_runtime.has_state_inputs(["input_ids", "past_key_values.0.conv_state"]))
        self.assertFalse(
            state_runtime.has_state_inputs(["input_ids", "past_key_values.0.key", "past_key_values.0.value"])
        )
        self.assertEqual(state_runtime.present_name("past_key_values.3.ssm_state"), "present.3.ssm_state")


class _BufferParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer(
            "scale", torch.nn.Parameter(torch.ones(4), requires_grad=False), persistent=False
        )

    def forward(self, x):
        return x * 2


class TestPlainTensorBuffers(unittest.TestCase):
    def test_torch_export_fails_without_it_and_the_buffer_is_restored(self):
        module = _BufferParameter()
        x = torch.ones(2, 4)
        with self.assertRaisesRegex(Exception, "already exists"):
            torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        with plain_tensor_buffers(module):
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        self.assertIsInstance(module._buffers["scale"], torch.nn.Parameter)
        np.testing.assert_allclose(program(x)[0].numpy(), (x * 2).numpy())


class TestStateCacheRegistration(unittest.TestCase):
    def test_round_trip_and_restored(self):
        import torch.utils._pytree as pytree
        from transformers.models.mamba.modeling_mamba import MambaCache

        model = build_tiny_model("mamba", "AutoModelForCausalLM")
        cache = MambaCache(model.config, 2, dtype=torch.float32)
        cache.conv_states[1] += 1
        with registered_caches():
            leaves, spec = pytree.tree_flatten(cache)
            rebuilt = pytree.tree_unflatten(leaves, spec)
        self.assertEqual(len(leaves), 2 * model.config.num_hidden_layers)
        self.assertTrue(torch.equal(rebuilt.conv_states[1], cache.conv_states[1]))
        self.assertEqual(rebuilt.conv_kernel_size, cache.conv_kernel_size)
        self.assertNotIn(MambaCache, pytree.SUPPORTED_NODES)
