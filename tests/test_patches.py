"""Each export patch: the failure it names happens without it, and it is always restored."""

from __future__ import annotations

import contextlib
import tempfile
import types
import unittest
import unittest.mock
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from parameterized import parameterized
from transformers.cache_utils import DynamicLayer
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import optimum_observer
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.patches import (
    PATCHES,
    Patch,
    applied,
    exact_no_op_constants,
    fewer_garbage_collections,
    for_model,
    for_model_type,
    no_op_rule_constants,
    split_to_sequence_folding_guard,
    unbounded_sympy_cache,
    uncached_fake_tensor_dispatch,
    untraced_no_op_mode_switches,
)
from legacy_shim.tooling.tiny_configs import build_tiny_model
from stages import conversion_error, load, load_tiny, observe


def _export_error(model_type: str, *without: str) -> ObserverExportError:
    """The tiny model of tests/tiny_models.py, converted without the patches `without`."""
    with tempfile.TemporaryDirectory() as scratch:
        return conversion_error(observe(load_tiny(model_type, Path(scratch), with_tokenizer=False)), *without)


def _tiny_export_error(model_type: str, *without: str) -> ObserverExportError:
    """The sweep's tiny model (legacy_shim.tooling.tiny_configs), converted without the patches `without`."""
    return conversion_error(observe(load(build_tiny_model(model_type, "AutoModelForCausalLM"))), *without)


class TestPatchesFixTheirFailure(unittest.TestCase):
    def test_lazy_initialization_patch(self):
        error = _export_error("llama", "dynamic_layer_lazy_initialization")
        self.assertEqual(error.stage, Stage.ONNX_CONVERSION)
        self.assertIn("is not in the constants dictionary", str(error.__cause__))

    def test_dense_moe_patch(self):
        error = _export_error("mixtral", "dense_mixtral_moe")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("data-dependent", str(error.__cause__))


#: The patches of this transformers version's code (the others are skipped here: `Patch.transformers`).
HERE = [p for p in PATCHES if p.for_this_transformers]


def _own_values(patches) -> dict:
    return {p.name: p.resolve().own_value for p in patches}


class TestPatchesAreScoped(unittest.TestCase):
    def test_restored_after_the_block_and_after_an_exception(self):
        originals = _own_values(HERE)
        with applied(PATCHES) as done:
            self.assertIsNot(DynamicLayer.__dict__["lazy_initialization"], originals["dynamic_layer_lazy_initialization"])
            self.assertIsNot(MixtralSparseMoeBlock.__dict__["forward"], originals["dense_mixtral_moe"])
        self.assertEqual(done.names, [p.name for p in HERE])
        self.assertEqual(sorted(done.skipped), sorted(p.name for p in PATCHES if not p.for_this_transformers))
        with self.assertRaises(KeyError):
            with applied(PATCHES):
                raise KeyError("boom")
        self.assertEqual(_own_values(HERE), originals)

    def test_every_patch_names_the_failure_it_fixes(self):
        for patch in PATCHES:
            self.assertTrue(patch.fixes.strip(), patch.name)
            if not patch.for_this_transformers:
                continue  # its target holds another version's code here
            target = patch.resolve()
            original = target.own_value
            if original is None and isinstance(patch.replacement, property):
                # An attribute the class reads but never sets (fsmt_decoder_config).
                self.assertFalse(hasattr(target.owner, target.attribute), patch.name)
                continue
            # A function or method, or a model module's `torch` (led_integer_window_division).
            original = getattr(target.owner, target.attribute)
            self.assertTrue(callable(original) or isinstance(original, types.ModuleType), patch.name)

    def test_every_patch_target_exists_in_this_transformers(self):
        # Tolerance of missing targets is for other transformers versions; on the tested one, no
        # patch may be skipped silently.
        self.assertEqual([p.name for p in HERE if not p.exists()], [])

    def test_a_missing_target_is_skipped_when_applied_and_reported(self):
        missing = [
            Patch("no_such_block", "transformers.models.mixtral.modeling_mixtral:NoSuchBlock.forward", "-", len),
            Patch("no_such_module", "transformers.models.no_such_model.modeling_x:Block.forward", "-", len),
            Patch("no_such_method", "transformers.cache_utils:DynamicLayer.no_such_method", "-", len),
        ]
        original = DynamicLayer.__dict__["lazy_initialization"]
        with applied([missing[0], PATCHES[0], *missing[1:]]) as done:
            self.assertIsNot(DynamicLayer.__dict__["lazy_initialization"], original)
        self.assertEqual(done.names, ["dynamic_layer_lazy_initialization"])
        self.assertEqual(list(done.skipped), ["no_such_block", "no_such_module", "no_such_method"])
        self.assertIn("NoSuchBlock", done.skipped["no_such_block"])
        self.assertIn("no_such_model", done.skipped["no_such_module"])
        self.assertIs(DynamicLayer.__dict__["lazy_initialization"], original)
        self.assertFalse(hasattr(DynamicLayer, "no_such_method"))

    def test_a_target_must_be_a_dotted_path_with_one_replacement(self):
        with self.assertRaisesRegex(ValueError, "module.path:Attribute.path"):
            Patch("bad", "transformers.cache_utils.DynamicLayer.forward", "-", len)
        with self.assertRaisesRegex(ValueError, "exactly one"):
            Patch("bad", "transformers.cache_utils:DynamicLayer.forward", "-", len, wrap=len)


class TestPerModelSelection(unittest.TestCase):
    """An export applies the environment's patches and those whose target module its classes come from."""

    def test_a_dense_model_gets_only_the_environments_patches(self):
        model = build_tiny_model("llama", "AutoModelForCausalLM")
        self.assertEqual(
            [p.name for p in for_model(PATCHES, model, "llama")],
            [
                "dynamic_layer_lazy_initialization",
                "type_promotion_number_operands",
                "multi_output_pattern_first_node",
                "rewrite_rule_root_operator_first",
                "type_promotion_recorded_values",
            ],
        )

    def test_a_moe_hybrid_gets_its_own_patches_and_no_others(self):
        model = build_tiny_model("jamba", "AutoModelForCausalLM")
        names = [p.name for p in for_model(PATCHES, model, "jamba")]
        self.assertEqual(
            names,
            [
                "dynamic_layer_lazy_initialization",
                "dense_jamba_moe",
                "jamba_unified_mixer",
                "jamba_mamba_mask",
                "jamba_cache_position_from_cache",
                "jamba_causal_mask_width",
                "type_promotion_number_operands",
                "multi_output_pattern_first_node",
                "rewrite_rule_root_operator_first",
                "type_promotion_recorded_values",
            ],
        )
        # Known without a model too (what `optimum-observer patches --model-type jamba` lists).
        self.assertEqual([p.name for p in for_model_type(PATCHES, "jamba")], names)

    def test_a_model_type_can_declare_patches_beyond_its_modules(self):
        extra = Patch("extra", "transformers.models.mixtral.modeling_mixtral:MixtralSparseMoeBlock.forward", "-", len,
                      model_types=("llama",))  # fmt: skip
        model = build_tiny_model("llama", "AutoModelForCausalLM")
        self.assertEqual([p.name for p in for_model([extra], model, "llama")], ["extra"])
        self.assertEqual([p.name for p in for_model([extra], model, "qwen2")], [])


class TestExpertLoopPatches(unittest.TestCase):
    """Each dense-experts patch: the model type's data-dependent expert loop fails torch.export without it.

    The default suite has one type per replacement function (mixtral's sparse-MoE block forward is
    in TestPatchesFixTheirFailure); the other types of a shared function, whose patched exports the
    coverage sweep validates, run with `-m slow`.
    """

    @parameterized.expand(
        [
            ("deepseek_v3", "dense_deepseek_v3_expert_mixture"),
            ("dbrx", "dense_dbrx_experts"),
            ("gpt_oss", "dense_gpt_oss_experts"),
            ("hunyuan_v1_moe", "dense_hunyuan_v1_moe"),
            ("aria_text", "dense_aria_text_moe"),
        ]
    )
    def test_fails_without_the_patch(self, model_type, patch_name):
        self.assertFailsWithout(model_type, patch_name)

    # glm4_moe: deepseek_v3's function; the others: mixtral's sparse-MoE block, each with its routing.
    @parameterized.expand(
        [
            ("glm4_moe", "dense_glm4_moe_expert_mixture"),
            ("phimoe", "dense_phimoe_moe"),
            ("jamba", "dense_jamba_moe"),
            ("qwen3_next", "dense_qwen3_next_moe"),
            ("minimax", "dense_minimax_moe"),
        ]
    )
    @pytest.mark.slow
    def test_fails_without_the_patch_of_a_shared_function(self, model_type, patch_name):
        self.assertFailsWithout(model_type, patch_name)

    def assertFailsWithout(self, model_type: str, patch_name: str) -> None:
        error = _tiny_export_error(model_type, patch_name)
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("data-dependent", str(error.__cause__))

    # Default suite: tests/test_real_shapes.py exports and validates deepseek_v2 (MLA, keys of 48
    # and values of 32 per head) with the same first cache update.
    @pytest.mark.slow
    def test_keys_and_values_of_different_head_sizes_export(self):
        # DeepSeek's multi-head latent attention caches keys of 32 and values of 16 per head:
        # the first cache update must not shape the values like the keys.
        with tempfile.TemporaryDirectory() as scratch:
            result = optimum_observer.export(build_tiny_model("deepseek_v3", "AutoModelForCausalLM"), Path(scratch) / "onnx")
        self.assertTrue(result.validation.ok, result.validation.table())


class TestRealRotaryPatches(unittest.TestCase):
    """Rotary embeddings in complex numbers: the pair of patches (embedding + apply) is needed."""

    @parameterized.expand([("llama4_text", "llama4"), ("deepseek_v2", "deepseek_v2")])
    def test_fails_without_the_patches(self, model_type, module_name):
        error = _tiny_export_error(
            model_type, f"real_{module_name}_rotary_embedding", f"real_{module_name}_apply_rotary_emb"
        )
        self.assertEqual(error.stage, Stage.ONNX_CONVERSION)
        self.assertIn("complex", str(error.__cause__))


class _RMSNorm(torch.nn.Module):
    """HeliumRMSNorm's arithmetic with its checkpoint epsilon (1e-8)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-8)


def _rms_norm_of_zeros(exact_constants: bool) -> np.ndarray:
    context = exact_no_op_constants() if exact_constants else contextlib.nullcontext()
    with context:
        program = torch.onnx.export(_RMSNorm(), (torch.randn(2, 8),), dynamo=True, optimize=True)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: np.zeros((2, 8), dtype=np.float32)})[0]


class TestExactNoOpConstants(unittest.TestCase):
    def test_a_tiny_epsilon_survives_optimisation(self):
        np.testing.assert_array_equal(_rms_norm_of_zeros(exact_constants=True), np.zeros((2, 8)))

    def test_without_it_the_epsilon_is_rewritten_away(self):
        self.assertTrue(np.isnan(_rms_norm_of_zeros(exact_constants=False)).all())

    def test_tolerances_restored_after_an_exception(self):
        def tolerances():
            return [(c._rel_tol, c._abs_tol) for c in no_op_rule_constants()]

        before = tolerances()
        self.assertTrue(before and all(t != (0.0, 0.0) for t in before))
        with self.assertRaises(KeyError):
            with exact_no_op_constants():
                self.assertTrue(all(t == (0.0, 0.0) for t in tolerances()))
                raise KeyError("boom")
        self.assertEqual(tolerances(), before)


def _assoc_op_cache():
    """sympy's cache of `AssocOp.__new__` (every `Mul` and `Add` built)."""
    from sympy.core.cache import CACHE

    return next(cached for cached in CACHE if cached.__qualname__ == "AssocOp.__new__")


class TestUnboundedSympyCache(unittest.TestCase):
    """An export builds more distinct symbolic expressions than sympy's 1,000-entry caches hold,
    each layer the same ones again: with the block's caches none is built twice."""

    def rebuild_misses(self, context) -> int:
        """Cache misses of `AssocOp.__new__` rebuilding 2 x 1,600 distinct expressions."""
        import sympy

        sizes = sympy.symbols("size0:40", positive=True, integer=True)

        def build():
            return [a * b + 1 for a in sizes for b in sizes]

        with context:
            build()
            before = _assoc_op_cache().cache_info().misses
            build()
            return _assoc_op_cache().cache_info().misses - before

    def test_without_it_every_expression_is_built_again(self):
        self.assertGreaterEqual(self.rebuild_misses(contextlib.nullcontext()), 1600)

    def test_with_it_none_is(self):
        self.assertEqual(self.rebuild_misses(unbounded_sympy_cache()), 0)

    def test_sympys_caches_and_their_entries_are_back_after_an_exception(self):
        import sympy

        x = sympy.Symbol("x_restored")
        expression = 3 * x
        cache = _assoc_op_cache()
        info = cache.cache_info()
        with self.assertRaises(KeyError):
            with unbounded_sympy_cache():
                self.assertIsNone(_assoc_op_cache().cache_info().maxsize)
                raise KeyError("boom")
        self.assertEqual(cache.cache_info().maxsize, info.maxsize)
        self.assertEqual(cache.cache_info().currsize, info.currsize)
        hits = cache.cache_info().hits
        self.assertEqual(3 * x, expression)
        self.assertEqual(cache.cache_info().hits, hits + 1)


class TestFewerGarbageCollections(unittest.TestCase):
    """An export allocates millions of objects that stay alive; in the block the collector
    starts a young collection every 50,000 allocations, not every 700."""

    def young_collections(self, context) -> int:
        """Collections started while 70,000 long-lived containers are allocated."""
        import gc

        collections = [0]

        def count(phase, info):
            if phase == "start":
                collections[0] += 1

        gc.callbacks.append(count)
        try:
            with context:
                alive = [[index] for index in range(70_000)]
        finally:
            gc.callbacks.remove(count)
        self.assertEqual(len(alive), 70_000)
        return collections[0]

    def test_without_it_the_collector_runs_every_700_allocations(self):
        self.assertGreaterEqual(self.young_collections(contextlib.nullcontext()), 70_000 // 700 - 1)

    def test_with_it_once_or_twice(self):
        self.assertLessEqual(self.young_collections(fewer_garbage_collections()), 2)

    def test_thresholds_restored_after_an_exception(self):
        import gc

        before = gc.get_threshold()
        with self.assertRaises(KeyError):
            with fewer_garbage_collections():
                self.assertNotEqual(gc.get_threshold(), before)
                raise KeyError("boom")
        self.assertEqual(gc.get_threshold(), before)


class _RotaryLike(torch.nn.Module):
    """A rotary embedding's mode switches (llama's `LlamaRotaryEmbedding.forward`), then a real one."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    @torch.no_grad()
    def rotary(self, x):
        with torch.autocast(device_type="cpu", enabled=False):
            return (x.float() * 2).cos()

    def forward(self, x):
        y = self.linear(x) + self.rotary(x)
        with torch.enable_grad():  # a switch the export's no_grad does not make: kept
            return y * 3


class TestUntracedNoOpModeSwitches(unittest.TestCase):
    """Under the export's `no_grad`, a forward's `no_grad` / `autocast(enabled=False)` changes
    nothing; torch.export records it and splits the graph at it, unless the block keeps it out."""

    @staticmethod
    def export(context) -> tuple[torch.export.ExportedProgram, int]:
        """The exported program and how many times the higher-order-op passes split a graph."""
        from torch._export.passes import replace_autocast_with_hop_pass, replace_set_grad_with_hop_pass

        splits = [0]

        def counting(split):
            def counted(*args, **kwargs):
                splits[0] += 1
                return split(*args, **kwargs)

            return counted

        with contextlib.ExitStack() as stack:
            for module in (replace_set_grad_with_hop_pass, replace_autocast_with_hop_pass):
                stack.enter_context(
                    unittest.mock.patch.object(module, "sequential_split", counting(module.sequential_split))
                )
            torch.manual_seed(0)
            with torch.no_grad(), context:
                program = torch.export.export(_RotaryLike(), (torch.randn(2, 4),))
        return program, splits[0]

    @staticmethod
    def higher_order_ops(program) -> list[str]:
        return [n.target.name() for n in program.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]

    @classmethod
    def setUpClass(cls):
        cls.upstream, cls.upstream_splits = cls.export(contextlib.nullcontext())
        cls.patched, cls.patched_splits = cls.export(untraced_no_op_mode_switches())

    def test_without_it_the_no_op_switches_split_the_graph(self):
        self.assertEqual(self.upstream_splits, 2)
        self.assertIn("wrap_with_autocast", self.higher_order_ops(self.upstream))

    def test_with_it_only_the_real_switch_does(self):
        self.assertEqual(self.patched_splits, 1)
        self.assertEqual(self.higher_order_ops(self.patched), ["wrap_with_set_grad_enabled"])

    def test_the_program_computes_the_same(self):
        x = torch.randn(2, 4)
        torch.testing.assert_close(self.patched.module()(x), self.upstream.module()(x), rtol=0, atol=0)

    def test_torch_is_restored_after_an_exception(self):
        from torch.fx.experimental.proxy_tensor import PreDispatchTorchFunctionMode

        autocast = torch.amp.autocast_mode.autocast
        before = [vars(PreDispatchTorchFunctionMode)["__torch_function__"], vars(autocast)["__enter__"],
                  vars(autocast)["__exit__"]]  # fmt: skip
        with self.assertRaises(KeyError):
            with untraced_no_op_mode_switches():
                self.assertIsNot(vars(autocast)["__enter__"], before[1])
                raise KeyError("boom")
        after = [vars(PreDispatchTorchFunctionMode)["__torch_function__"], vars(autocast)["__enter__"],
                 vars(autocast)["__exit__"]]  # fmt: skip
        self.assertEqual([a is b for a, b in zip(after, before)], [True, True, True])


class TestUncachedFakeTensorDispatch(unittest.TestCase):
    """With dynamic axes the fake-tensor cache rebuilds each output's symbolic metadata the meta
    kernel computes anyway; in the block torch.export's trace dispatches without it, and the
    ONNX file is the same."""

    @staticmethod
    def export(context) -> tuple[int, bytes]:
        """Fake-tensor cache lookups (hits + misses) during the export, and the ONNX bytes
        (less the stack traces, which name torch's generated code by a process-wide count)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        batch = torch.export.Dim("batch")
        before = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
        with context:
            program = torch.onnx.export(
                _RotaryLike(), (torch.randn(3, 4),), dynamic_shapes=({0: batch},), dynamo=True, verbose=False
            )
        lookups = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses - before
        model = program.model_proto
        for node in model.graph.node:  # the traced code's file names count torch's traces so far
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        return lookups, model.SerializeToString()

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.upstream_lookups, cls.upstream_bytes = cls.export(contextlib.nullcontext())
        torch.manual_seed(0)
        cls.patched_lookups, cls.patched_bytes = cls.export(uncached_fake_tensor_dispatch())

    def test_without_it_the_trace_looks_up_the_cache(self):
        self.assertGreater(self.upstream_lookups, 0)

    def test_with_it_the_trace_does_not(self):
        self.assertEqual(self.patched_lookups, 0)

    def test_the_onnx_file_is_the_same(self):
        self.assertEqual(self.patched_bytes, self.upstream_bytes)

    def test_the_setting_is_back_after_an_exception(self):
        before = torch._dynamo.config.fake_tensor_cache_enabled
        with self.assertRaises(KeyError):
            with uncached_fake_tensor_dispatch():
                self.assertFalse(torch._dynamo.config.fake_tensor_cache_enabled)
                raise KeyError("boom")
        self.assertEqual(torch._dynamo.config.fake_tensor_cache_enabled, before)


class _MaskedHeads(torch.nn.Module):
    """Views and a transpose (no promotion rule) and a float times an integer mask (promoted)."""

    def forward(self, hidden, mask):
        heads = hidden.reshape(hidden.shape[0], hidden.shape[1], 2, -1).transpose(1, 2).contiguous()
        return heads.sum(-1) * mask.unsqueeze(1)


class TestTypePromotionRecordedValues(unittest.TestCase):
    """torch.onnx's type-promotion pass traces every node of the decomposed graph again; with the
    patch only the nodes a promotion rule applies to are, and the ONNX file is the same."""

    @staticmethod
    def export(patches_applied) -> tuple[bytes, list[str], int]:
        """The ONNX model's bytes, its operators and the nodes the pass ran."""
        from torch.onnx._internal.fx.passes.type_promotion import _TypePromotionInterpreter

        ran, run_node = [0], torch.fx.Interpreter.run_node

        def counted(interpreter, node):
            if isinstance(interpreter, _TypePromotionInterpreter):
                ran[0] += 1
            return run_node(interpreter, node)

        inputs = (torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.int64))
        dims = ({0: "batch", 1: "length"}, {0: "batch", 1: "length"})
        with applied(patches_applied), unittest.mock.patch.object(torch.fx.Interpreter, "run_node", counted):
            program = torch.onnx.export(_MaskedHeads(), inputs, dynamic_shapes=dims, dynamo=True, optimize=False)
        return program.model_proto.SerializeToString(), [n.op_type for n in program.model.graph], ran[0]

    @classmethod
    def setUpClass(cls):
        patch = next(p for p in PATCHES if p.name == "type_promotion_recorded_values")
        cls.patched = cls.export([patch])
        cls.upstream = cls.export([])

    def test_without_it_every_node_runs_again(self):
        self.assertGreaterEqual(self.upstream[2], 25)  # 30 on torch 2.13

    def test_with_it_only_the_promoted_nodes_inputs_and_output_do(self):
        self.assertLessEqual(self.patched[2], 10)  # 9 on torch 2.13
        self.assertLess(3 * self.patched[2], self.upstream[2])

    def test_the_promotion_and_the_file_are_the_same(self):
        self.assertIn("Cast", self.upstream[1])
        self.assertEqual(self.patched[0], self.upstream[0])


class _ThreeChunks(torch.nn.Module):
    """`chunk` along a dynamic axis, as ProphetNet splits its streams."""

    def forward(self, x):
        a, b, c = x.chunk(3, dim=1)
        return a + b * c


def _export_chunks() -> torch.onnx.ONNXProgram:
    return torch.onnx.export(
        _ThreeChunks(),
        (torch.randn(2, 6, 4),),
        dynamic_shapes=({0: "batch", 1: torch.export.Dim.DYNAMIC},),
        dynamo=True,
        optimize=True,
    )


class TestSplitToSequenceFoldingGuard(unittest.TestCase):
    def test_the_graph_computes_what_torch_does(self):
        with split_to_sequence_folding_guard():
            program = _export_chunks()
        session = ort.InferenceSession(program.model_proto.SerializeToString())
        for length in (6, 9):
            x = torch.randn(3, length, 4)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            np.testing.assert_allclose(got, _ThreeChunks()(x).numpy(), rtol=0, atol=1e-6)

    def test_without_it_constant_folding_crashes(self):
        with self.assertRaises(Exception) as caught:
            _export_chunks()
        chain, error = [], caught.exception
        while error is not None:
            chain.append(f"{type(error).__name__}: {error}")
            error = error.__cause__ or error.__context__
        self.assertTrue(any("'NoneType' object has no attribute 'ndim'" in e for e in chain), chain)

    def test_the_evaluator_is_restored_after_an_exception(self):
        from onnxscript.optimizer import _constant_folding

        before = list(_constant_folding.registry.op_evaluators[("", "SplitToSequence")])
        with self.assertRaises(KeyError):
            with split_to_sequence_folding_guard():
                self.assertNotEqual(_constant_folding.registry.op_evaluators[("", "SplitToSequence")], before)
                raise KeyError("boom")
        self.assertEqual(_constant_folding.registry.op_evaluators[("", "SplitToSequence")], before)


class _OneMinusIntegerMask(torch.nn.Module):
    """The attention-mask pattern of xlnet's and prophetnet's forward: a float minus an int mask."""

    def forward(self, x, mask):
        return x * (1.0 - mask[:, None, :])


class TestTypePromotionNumberOperands(unittest.TestCase):
    """torch 2.13 regression (pytorch/pytorch#194381): `1.0 - int_tensor` fails the ONNX
    translation's type promotion; with the patch the graph computes what torch does."""

    def export(self, patches_applied):
        x, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
        with applied(patches_applied):
            program = torch.onnx.export(_OneMinusIntegerMask(), (x, mask), dynamo=True, verbose=False)
        session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        (got,) = session.run(None, dict(zip(names, (x.numpy(), mask.numpy()))))
        return got, _OneMinusIntegerMask()(x, mask).numpy()

    def test_fails_without_the_patch(self):
        with self.assertRaisesRegex(Exception, "Cannot find a compatible OpOverload for aten.sub"):
            self.export([])

    def test_the_patched_graph_computes_what_torch_does(self):
        patch = next(p for p in PATCHES if p.name == "type_promotion_number_operands")
        got, expected = self.export([patch])
        np.testing.assert_allclose(got, expected)


def _relu_chain_with_two_slices(length: int):
    """An onnx_ir model: `length` Relus in a chain, then the two halves of the last one's output
    as two Slices (what SlicesSplit rewrites to one Split), both graph outputs."""
    import onnx_ir as ir

    x = ir.Input("x", ir.Shape([2, 8]), ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18})
    value = x
    for _ in range(length):
        node = ir.node("Relu", [value])
        graph.append(node)
        value = node.outputs[0]
    value.shape, value.type = x.shape, x.type  # what the optimizer's shape inference gives the rule
    constants = {}
    for name, numbers in (("zero", [0]), ("half", [4]), ("end", [8]), ("axis", [-1])):
        tensor = ir.tensor(np.array(numbers, dtype=np.int64), name=name)
        constants[name] = ir.Value(name=name, const_value=tensor)
        graph.register_initializer(constants[name])
    halves = []
    # The second half first: onnxscript pairs each Slice with the graph's Slices in order, and
    # takes the first pair that matches the pattern, before its check (a Slice with itself fails it).
    for begin, end in (("half", "end"), ("zero", "half")):
        node = ir.node("Slice", [value, constants[begin], constants[end], constants["axis"]])
        graph.append(node)
        halves.append(node.outputs[0])
    for index, half in enumerate(halves):
        half.name = f"half{index}"
        graph.outputs.append(half)
    return ir.Model(graph, ir_version=10)


class TestMultiOutputPatternFirstNode(unittest.TestCase):
    """onnxscript 0.7.2 scans the whole graph once per node for its two-output SlicesSplit rule;
    with the patch only nodes that can start the pattern (Slices) lead to a scan, and the rule
    rewrites the same nodes."""

    LENGTH = 200

    def rewrite(self, patches_applied):
        """The rewritten model and the number of full scans of its graph."""
        import onnx_ir as ir
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _basic_rules

        model = _relu_chain_with_two_slices(self.LENGTH)
        scans, iterate = [0], ir.Graph.__iter__

        def counted(graph):
            scans[0] += 1
            return iterate(graph)

        with applied(patches_applied), unittest.mock.patch.object(ir.Graph, "__iter__", counted):
            rewriter.RewritePass([_basic_rules.slice_split_rule])(model)
        return model, scans[0]

    def test_without_the_patch_every_node_scans_the_graph(self):
        _, scans = self.rewrite([])
        self.assertGreater(scans, self.LENGTH)

    def test_with_the_patch_only_the_slices_do_and_the_rewrite_is_the_same(self):
        patch = next(p for p in PATCHES if p.name == "multi_output_pattern_first_node")
        patched, scans = self.rewrite([patch])
        self.assertLess(scans, 10)
        upstream, _ = self.rewrite([])
        ops = [[(n.op_type, [v.name for v in n.inputs]) for n in m.graph] for m in (patched, upstream)]
        self.assertEqual(ops[0], ops[1])
        self.assertIn("Split", [n.op_type for n in patched.graph])


class TestRewriteRuleRootOperatorFirst(unittest.TestCase):
    """onnxscript's rewriter takes every rule through its whole matcher on every node; with the
    patch a node of another operator than the pattern's root fails at once, with the same rewrites."""

    LENGTH = 200

    def rewrite(self, patches_applied):
        """The rewritten model (torch.onnx.export's default rules) and the matcher runs."""
        from onnxscript import rewriter
        from onnxscript.rewriter._matcher import SimplePatternMatcher

        model = _relu_chain_with_two_slices(self.LENGTH)
        runs, match = [0], SimplePatternMatcher.match

        def counted(matcher, *args, **kwargs):
            runs[0] += 1
            return match(matcher, *args, **kwargs)

        with unittest.mock.patch.object(SimplePatternMatcher, "match", counted), applied(patches_applied):
            rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES)(model)
        return model, runs[0]

    @classmethod
    def setUpClass(cls):
        cls.patch = next(p for p in PATCHES if p.name == "rewrite_rule_root_operator_first")
        cls.upstream, cls.upstream_runs = cls.rewrite(cls, [])
        cls.patched, cls.patched_runs = cls.rewrite(cls, [cls.patch])

    def test_without_it_every_rule_runs_the_matcher_on_every_node(self):
        self.assertGreater(self.upstream_runs, 10 * self.LENGTH)

    def test_with_it_only_the_nodes_of_a_rules_root_operator_do(self):
        self.assertLess(5 * self.patched_runs, self.upstream_runs)

    def test_the_rewrites_are_the_same(self):
        ops = [[(n.op_type, [v.name for v in n.inputs]) for n in m.graph] for m in (self.patched, self.upstream)]
        self.assertEqual(ops[0], ops[1])
        self.assertIn("Split", [n.op_type for n in self.patched.graph])


class TestXmodLanguageAdapterPerRow(unittest.TestCase):
    """X-MOD's per-row language adapters: split by runs of one language and looped over without
    the patch, gathered per row with it."""

    def setUp(self):
        model = build_tiny_model("xmod", "AutoModelForCausalLM").eval()
        self.output = model.roberta.encoder.layer[0].output
        for adapter in self.output.adapter_modules.values():  # distinct adapters, not their zero-bias init
            torch.nn.init.normal_(adapter.dense2.weight)
            torch.nn.init.normal_(adapter.dense1.bias)
        self.patch = next(p for p in PATCHES if p.name == "xmod_language_adapter_per_row")
        # Rows of both languages (the tiny model has two, as checkpoints have many), batch and
        # sequence dynamic as in the export.
        self.hidden, self.lang_ids = torch.randn(4, 3, 64), torch.tensor([1.0, 0.0, 0.0, 1.0])

    def export(self):
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        with torch.no_grad():
            return torch.export.export(
                _LanguageAdapter(self.output),
                (self.lang_ids, self.hidden),
                dynamic_shapes=({0: batch}, {0: batch, 1: sequence}),
            )

    def test_fails_without_the_patch(self):
        with self.assertRaisesRegex(Exception, "data-dependent expression"):
            self.export()

    def test_the_exported_adapter_gives_every_row_its_languages_adapter(self):
        with torch.no_grad():
            expected = self.output.lang_adapter(self.lang_ids, self.hidden.clone())
            with applied([self.patch]):
                exported = self.export().module()
            # Another batch size and mix of languages than the example's.
            got = exported(self.lang_ids[1:], self.hidden[1:])
        self.assertFalse(torch.allclose(expected[0], expected[1]))
        torch.testing.assert_close(got, expected[1:])

    @pytest.mark.slow
    def test_the_model_fails_without_the_patch(self):
        error = _tiny_export_error("xmod", "xmod_language_adapter_per_row")
        self.assertEqual(error.stage, Stage.TORCH_EXPORT)
        self.assertIn("data-dependent", str(error.__cause__))


class _LanguageAdapter(torch.nn.Module):
    def __init__(self, output: torch.nn.Module):
        super().__init__()
        self.output = output

    def forward(self, lang_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.output.lang_adapter(lang_ids, hidden.clone())


class _Method(torch.nn.Module):
    """One method of a submodule as a module's forward, to export it alone."""

    def __init__(self, owner: torch.nn.Module, method: str):
        super().__init__()
        self.owner, self.method = owner, method

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.method)(*tensors)


class TestGemma3nConstantsInForward(unittest.TestCase):
    """Gemma 3n's text layer: AltUp clamps its weight in place inside forward, and the sparse MLP
    computes its cutoff with erfinv; each fails its own export step without its patch."""

    @classmethod
    def setUpClass(cls):
        cls.layer = build_tiny_model("gemma3n_text", "AutoModelForCausalLM").eval().model.layers[0]
        cls.predictions, cls.activated = torch.randn(4, 2, 3, 64), torch.randn(2, 3, 64)

    def patch(self, name: str) -> Patch:
        return next(p for p in PATCHES if p.name == name)

    def test_altup_clamp_fails_torch_export_without_the_patch(self):
        with self.assertRaisesRegex(RuntimeError, "fake tensor in the exported program constant's list"):
            torch.export.export(_Method(self.layer.altup, "correct"), (self.predictions, self.activated))

    def test_altup_correct_exports_and_computes_what_torch_does(self):
        module = _Method(self.layer.altup, "correct")
        with torch.no_grad():
            expected = module(self.predictions, self.activated)
            with applied([self.patch("gemma3n_altup_clip_as_read")]):
                exported = torch.export.export(module, (self.predictions, self.activated)).module()
            torch.testing.assert_close(exported(self.predictions, self.activated), expected)

    def test_sparsity_cutoff_fails_onnx_translation_without_the_patch(self):
        self.assertGreater(self.layer.mlp.activation_sparsity, 0)  # the cutoff is on in this layer
        with self.assertRaisesRegex(Exception, "erf_inv"):
            torch.onnx.export(_Method(self.layer.mlp, "forward"), (self.activated,), dynamo=True, verbose=False)

    def test_sparse_mlp_graph_computes_what_torch_does(self):
        module = _Method(self.layer.mlp, "forward")
        with applied([self.patch("gemma3n_sparsity_cutoff_as_number")]):
            program = torch.onnx.export(module, (self.activated,), dynamo=True, verbose=False)
        session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: self.activated.numpy()})
        with torch.no_grad():
            expected = module(self.activated).numpy()
            gate = self.layer.mlp._gaussian_topk(self.layer.mlp.gate_proj(self.activated))
        self.assertGreater((gate == 0).float().mean().item(), 0.9)  # the cutoff (sparsity 0.95) is at work
        np.testing.assert_allclose(got, expected, atol=1e-5)
