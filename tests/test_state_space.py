"""State-space and hybrid models (mamba, falcon_mamba, mamba2; bamba, granitemoehybrid, jamba):
their convolution and SSM states exported as cache inputs and outputs of one graph for prefill
and decode, next to the attention layers' keys and values, carried in value slots
(`past_key_values.{i}.value.conv_state`, optimum_observer.portable_cache), generating through
legacy_shim's ORTModelForCausalLM (which feeds every `present.*` back by name), through
optimum-onnx's class with the hook, and through it where optimum-observer is not installed."""

from __future__ import annotations

import functools
import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parameterized import parameterized

import optimum.onnxruntime
import optimum_observer
from transformers import AutoConfig, AutoModelForCausalLM

from legacy_shim import state_runtime
from legacy_shim.modeling import ORTModelForCausalLM
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.reference_inputs import random_token_batch
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import PATCHES, applied, plain_tensor_buffers
from legacy_shim.tooling.tiny_configs import build_tiny_model
from legacy_shim.tooling import without_observer
from optimum_observer.packaging import runtime_size_attributes
from optimum_observer.portable_cache import STATE_AXIS_NAMES
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
    "zamba": (8, 2),
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
#: Checked through optimum-onnx's own class in the default suite: a pure state-space model and a
#: hybrid (grouped-query attention layers beside mamba layers). The sweep checks every type.
THROUGH_OPTIMUM_BY_DEFAULT = ("mamba2", "jamba")

_EXPORTS: dict[str, tuple[torch.nn.Module, Path]] = {}
_SCRATCH = tempfile.TemporaryDirectory()


def tearDownModule():
    _SCRATCH.cleanup()


def _exported(model_type: str) -> tuple[torch.nn.Module, Path]:
    """The tiny model and its export (validated with legacy_shim's class), once per module."""
    if model_type not in _EXPORTS:
        model = build_tiny_model(model_type, "AutoModelForCausalLM").eval()
        out = Path(_SCRATCH.name) / model_type
        result = optimum_observer.export(
            model, out, task="text-generation-with-past", show_progress=False, runtime_class=ORTModelForCausalLM
        )
        assert result.validation.ok and result.validation.generation, result.validation.table()
        _EXPORTS[model_type] = model, out
    return _EXPORTS[model_type]


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
    and p.for_this_transformers  # transformers 5's: tests/test_transformers5.py
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


GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@functools.cache
def _torch_greedy(model_type: str) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Left-padded prompts and torch's greedy tokens for them."""
    model, _ = _exported(model_type)
    prompts = _prompts(model, seed=5)
    with torch.no_grad():
        return prompts, model.generate(**prompts, **GREEDY).tolist()


class TestStateSpaceExport(unittest.TestCase):
    """Each export's names and shapes, and generation through legacy_shim's class; for
    THROUGH_OPTIMUM_BY_DEFAULT also through `optimum.onnxruntime.ORTModelForCausalLM`, which feeds
    only inputs named `.key` / `.value` (by position, the first step an empty
    `(batch, heads, 0, head_size)` sized from the config): with the hook, and in an interpreter
    without optimum-observer. One class, so that a worker of `--dist loadscope` exports each
    model once for all of them."""

    def test_unchanged_class_without_observer_generates_torch_tokens(self):
        # One interpreter where neither optimum_observer nor legacy_shim can be imported (so no
        # hook) generates with both exports.
        with tempfile.TemporaryDirectory() as scratch:
            specs = {t: _generate_spec(_exported(t)[1], _torch_greedy(t)[0], GREEDY, Path(scratch) / t)
                     for t in THROUGH_OPTIMUM_BY_DEFAULT}  # fmt: skip
            done = without_observer.run_without_observer(without_observer.RUNTIME_SCRIPT, *map(str, specs.values()))
            self.assertEqual(done.returncode, 0, done.stderr[-2000:])
            for model_type, spec in specs.items():
                with self.subTest(model_type), np.load(spec.parent / "outputs.npz") as returned:
                    self.assertEqual(returned["0.output"].tolist(), _torch_greedy(model_type)[1])

    @parameterized.expand(THROUGH_OPTIMUM_BY_DEFAULT)
    def test_class_with_the_hook_generates_torch_tokens(self, model_type):
        onnx_model = optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(_exported(model_type)[1])
        self.assertTrue(onnx_model.cache_fed_by_name)  # the hook's runtime, not upstream's
        prompts, expected = _torch_greedy(model_type)
        self.assertEqual(onnx_model.generate(**prompts, **GREEDY).tolist(), expected)

    def test_exported_config_loads_and_builds_the_same_model(self):
        # config.json carries the `num_attention_heads` optimum's __init__ reads; transformers
        # keeps it as an unused attribute and builds the same model from that config.
        model, out = _exported("mamba2")
        self.assertFalse(hasattr(model.config, "num_attention_heads"))
        config = AutoConfig.from_pretrained(out)
        self.assertEqual((config.num_attention_heads, config.hidden_size), (1, model.config.hidden_size))
        rebuilt = AutoModelForCausalLM.from_config(config)
        self.assertIs(type(rebuilt), type(model))
        self.assertEqual(
            {k: v.shape for k, v in rebuilt.state_dict().items()}, {k: v.shape for k, v in model.state_dict().items()}
        )

    @parameterized.expand(EXPORTED_BY_DEFAULT)
    def test_export_names_states_and_generates_through_the_shim(self, model_type):
        self.assertExportNamesStatesAndGeneratesThroughTheShim(model_type)

    @parameterized.expand([t for t in MODEL_TYPES if t not in EXPORTED_BY_DEFAULT])
    @pytest.mark.slow
    def test_export_of_more_types_names_states_and_generates_through_the_shim(self, model_type):
        self.assertExportNamesStatesAndGeneratesThroughTheShim(model_type)

    def assertExportNamesStatesAndGeneratesThroughTheShim(self, model_type: str) -> None:
        model, out = _exported(model_type)
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in session.get_inputs()}
        returned = {o.name: o.shape for o in session.get_outputs()}
        past = [n for n in shapes if n.startswith("past_key_values.")]
        presents = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.assertEqual([state_runtime.present_name(n) for n in past], presents)
        states = [n for n in past if n.endswith((".conv_state", ".ssm_state", ".recurrent_state"))]
        state_inputs, attention_layers = LAYERS[model_type]
        self.assertEqual(len(states), state_inputs)
        for name in states:
            # In a value slot, so that optimum-onnx feeds it; any size fed is made the state.
            self.assertRegex(name, r"^past_key_values\.\d+\.value\.\w+_state$")
            self.assertEqual(shapes[name], ["batch_size", *STATE_AXIS_NAMES.values()])
            # Returned at its fixed size (only the batch varies), 4-D.
            present = returned[state_runtime.present_name(name)]
            self.assertEqual((present[0], len(present)), ("batch_size", 4))
            self.assertTrue(all(isinstance(d, int) for d in present[1:]), present)
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


def _generate_spec(directory: Path, prompts: dict[str, torch.Tensor], settings: dict, scratch: Path) -> Path:
    """A spec for :data:`without_observer.RUNTIME_SCRIPT`: one greedy `generate` of `prompts`."""
    scratch.mkdir(parents=True)
    np.savez(scratch / "inputs.npz", **{f"0.{k}": v.numpy() for k, v in prompts.items()})
    spec = {
        "runtime_class": "ORTModelForCausalLM",
        "directory": str(directory),
        "from_pretrained": {},
        "calls": [{"method": "generate", "tensors": sorted(prompts), "arguments": settings}],
        "inputs": str(scratch / "inputs.npz"),
        "outputs": str(scratch / "outputs.npz"),
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    return scratch / "spec.json"


class TestRuntimeSizeAttributes(unittest.TestCase):
    def test_taken_from_the_text_config_where_the_config_lacks_them(self):
        config = AutoConfig.for_model("got_ocr2")
        text = config.get_text_config()
        self.assertEqual(
            runtime_size_attributes(config),
            {"hidden_size": text.hidden_size, "num_attention_heads": text.num_attention_heads},
        )

    def test_nothing_added_where_the_config_has_them(self):
        self.assertEqual(runtime_size_attributes(AutoConfig.for_model("jamba")), {})


def _state_graph() -> "ir.Model":
    """`present.0.conv_state = past_key_values.0.conv_state + 1`, a (batch, 3, 2) state."""
    import onnx_ir as ir

    past = ir.Value(name="past_key_values.0.conv_state", type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(["batch_size", 3, 2]))  # fmt: skip
    one = ir.Value(name="one", const_value=ir.tensor(np.ones((), dtype=np.float32)))
    present = ir.Value(name="present.0.conv_state", type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(["batch_size", 3, 2]))  # fmt: skip
    graph = ir.Graph([past], [present], nodes=[ir.node("Add", [past, one], outputs=[present])],
                     initializers=[one], opset_imports={"": 18})  # fmt: skip
    return ir.Model(graph, ir_version=9)


class TestCarriedStates(unittest.TestCase):
    def setUp(self):
        import onnx_ir as ir

        from optimum_observer.portable_cache import carry_states_as_values

        model = _state_graph()
        self.axes = carry_states_as_values(model)
        self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])

    def test_names_and_declared_shapes(self):
        self.assertEqual([(i.name, i.shape) for i in self.session.get_inputs()],
                         [("past_key_values.0.value.conv_state", ["batch_size", *STATE_AXIS_NAMES.values()])])  # fmt: skip
        self.assertEqual([(o.name, o.shape) for o in self.session.get_outputs()],
                         [("present.0.value.conv_state", ["batch_size", 3, 1, 2])])  # fmt: skip
        self.assertEqual(self.axes["past_key_values.0.value.conv_state"], {0: "batch_size", **STATE_AXIS_NAMES})

    def test_empty_cache_of_any_head_layout_is_zeros_and_the_output_is_fed_back_as_is(self):
        # optimum's first step: (batch, heads, 0, head_size) from the config, any sizes.
        (first,) = self.session.run(None, {"past_key_values.0.value.conv_state": np.zeros((2, 5, 0, 7), np.float32)})
        np.testing.assert_array_equal(first, np.ones((2, 3, 1, 2), np.float32))
        state = np.arange(12, dtype=np.float32).reshape(2, 3, 1, 2)
        (second,) = self.session.run(None, {"past_key_values.0.value.conv_state": state})
        np.testing.assert_array_equal(second, state + 1)


class TestStateRuntime(unittest.TestCase):
    def test_first_step_shapes(self):
        self.assertEqual(state_runtime.first_step_shape(["batch_size", 128, 4], 3), (3, 128, 4))
        self.assertEqual(
            state_runtime.first_step_shape(["batch_size", 4, "past_sequence_length", 16], 2), (2, 4, 0, 16)
        )

    def test_state_inputs_are_told_from_key_value_caches(self):
        self.assertTrue(state_runtime.has_state_inputs(["input_ids", "past_key_values.0.value.conv_state"]))
        self.assertFalse(
            state_runtime.has_state_inputs(["input_ids", "past_key_values.0.key", "past_key_values.0.value"])
        )
        self.assertEqual(state_runtime.present_name("past_key_values.3.value.ssm_state"), "present.3.value.ssm_state")


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
