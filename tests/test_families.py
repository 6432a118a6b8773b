"""Task families: one object per family owns its default run, reference inputs and runtime check."""

from __future__ import annotations

import ast
import importlib.util
import unittest
from pathlib import Path

import torch

from legacy_shim.tooling import tiny_configs
from optimum_observer import optimization
from optimum_observer.families import FAMILIES, RuntimeChecks, family_of
from optimum_observer.tasks import TASKS, Family, get_task
from optimum_observer.validation import ValidationInputs

PACKAGE = Path(importlib.util.find_spec("optimum_observer").origin).parent
#: The modules that may name a family: where families are declared and where they are implemented.
FAMILY_MODULES = ("tasks.py", "families.py")


class _TorchAsRuntime:
    """A runtime class whose model is the torch model itself (no ONNX file needed)."""

    def __init__(self, model):
        self.model = model
        self.__name__ = "TorchAsRuntime"

    def from_pretrained(self, directory, **kwargs):
        self.loaded_with = kwargs
        return self

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.model(**inputs)

    def generate(self, **inputs):
        with torch.no_grad():
            return self.model.generate(**inputs)


class TestRegistry(unittest.TestCase):
    def test_every_family_has_one_object(self):
        self.assertEqual(set(FAMILIES), set(Family))
        for family, family_object in FAMILIES.items():
            self.assertIs(family_object.family, family)

    def test_every_task_finds_its_family(self):
        for contract in TASKS.values():
            self.assertIs(family_of(contract).family, contract.family)

    def test_no_stage_branches_on_the_family(self):
        """Stages call the family object; only the modules declaring families name a member."""
        found = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path.name in FAMILY_MODULES:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Family":
                    found.append(f"{path.name}: Family.{node.attr}")
        self.assertEqual(found, [])


class TestEncoderFamily(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.contract = get_task("feature-extraction")
        cls.model = tiny_configs.build_tiny_model("bert", cls.contract.auto_model_class).eval()
        cls.family = family_of(cls.contract)

    def test_the_default_run_feeds_the_reference_inputs(self):
        fed = []
        handle = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape), with_kwargs=True
        )
        self.addCleanup(handle.remove)
        self.family.default_run(self.model, self.contract)(self.model)
        self.assertEqual(fed, [b["input_ids"].shape for b in self.family.reference_inputs(self.model)])

    def test_its_runtime_check_compares_every_output_and_generates_nothing(self):
        inputs = ValidationInputs(Path("unused"), self.model, self.contract, _TorchAsRuntime(self.model))
        checks = self.family.check_runtime(inputs)
        self.assertIsInstance(checks, RuntimeChecks)
        self.assertEqual(checks.generation, [])
        compared = [(c.index, c.output, c.ok) for c in checks.outputs]
        self.assertEqual(compared, [(0, "last_hidden_state", True), (1, "last_hidden_state", True)])


class TestDecoderFamily(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.contract = get_task("text-generation-with-past")
        cls.model = tiny_configs.build_tiny_model("llama", cls.contract.auto_model_class).eval()
        cls.family = family_of(cls.contract)

    def test_its_outputs_are_the_logits_on_the_reference_inputs(self):
        inputs = ValidationInputs(Path("unused"), self.model, self.contract, _TorchAsRuntime(self.model))
        checks = self.family.compare_outputs(inputs)
        self.assertEqual([(c.output, c.max_abs_diff) for c in checks], [("logits", 0.0), ("logits", 0.0)])

    def test_its_generation_check_reads_the_cache_inputs_from_the_names_it_is_given(self):
        """The export hands validation its files' input names: no file is opened to learn whether
        the graph takes a cache (here there is none), and a graph without one is generated from
        without the runtime's cache, as torch is."""
        for names, use_cache in (
            (("input_ids", "attention_mask", "position_ids", "past_key_values.0.key"), True),
            (("input_ids", "attention_mask", "position_ids"), False),
        ):
            runtime = _TorchAsRuntime(self.model)
            inputs = ValidationInputs(
                Path("unused"), self.model, self.contract, runtime, graph_inputs={"model.onnx": names}
            )
            checks = self.family.check_runtime(inputs)
            self.assertEqual(runtime.loaded_with, {} if use_cache else {"use_cache": False})
            self.assertEqual(len(checks.generation), 2)
            self.assertTrue(all(check.ok for check in checks.generation))

    def test_the_stages_ask_it_instead_of_naming_it(self):
        self.assertTrue(self.family.one_graph_for_every_step)
        self.assertIs(self.family.quantization, optimization.DECODER_QUANTIZATION)
        self.assertFalse(self.family.encoder_decoder)
        self.assertIsNone(family_of(get_task("text2text-generation-with-past")).quantization)
        self.assertTrue(family_of(get_task("automatic-speech-recognition-with-past")).uses_feature_extractor)


if __name__ == "__main__":
    unittest.main()


SPEECH = "automatic-speech-recognition-with-past"


class TestSpeechInputs(unittest.TestCase):
    """The speech family feeds a model its own inputs (its main input, made by the feature extractor
    its checkpoints ship, from audio of two lengths), not whisper's features."""

    @staticmethod
    def build(model_type):
        model = tiny_configs.build_tiny_model(model_type, "AutoModelForSpeechSeq2Seq").eval()
        return model, tiny_configs.tiny_feature_extractor(model_type, model.config)

    def test_speech_to_text_is_fed_filter_banks_of_the_audio_length_with_their_mask(self):
        model, feature_extractor = self.build("speech_to_text")
        batches = family_of(get_task(SPEECH)).reference_inputs(model, feature_extractor=feature_extractor)
        self.assertEqual([sorted(b) for b in batches], [["attention_mask", "input_features"]] * 2)
        features = [b["input_features"] for b in batches]
        self.assertEqual([f.shape[0] for f in features], [2, 3])
        self.assertEqual({f.shape[2] for f in features}, {model.config.input_feat_per_channel})
        # Padded to each batch's longest waveform: the export sees the frame axis at two lengths.
        self.assertNotEqual(features[0].shape[1], features[1].shape[1])
        self.assertEqual(batches[0]["attention_mask"].sum(-1).unique().numel(), 2)
        with torch.no_grad():
            self.assertEqual(model.generate(**batches[0], max_new_tokens=2).shape[0], 2)

    def test_moonshine_is_fed_the_raw_waveform(self):
        model, feature_extractor = self.build("moonshine")
        family = family_of(get_task(SPEECH))
        with_extractor = family.reference_inputs(model, feature_extractor=feature_extractor)
        self.assertEqual([sorted(b) for b in with_extractor], [["attention_mask", "input_values"]] * 2)
        self.assertEqual(with_extractor[1]["input_values"].shape, (3, int(1.6 * feature_extractor.sampling_rate)))
        without = family.reference_inputs(model)
        self.assertEqual([sorted(b) for b in without], [["input_values"]] * 2)
        self.assertEqual(without[0]["input_values"].dim(), 2)

    def test_the_encoder_graph_takes_the_main_input_of_the_model(self):
        contract = get_task(SPEECH)
        moonshine, _ = self.build("moonshine")
        encoder = contract.for_model(moonshine).graphs[0]
        self.assertEqual(encoder.input_names, ("input_values", "attention_mask"))
        self.assertEqual(contract.graphs[0].input_names, ("input_features", "attention_mask"))
        self.assertEqual(contract.for_model(moonshine).graphs[1:], contract.graphs[1:])

    def test_a_model_without_feature_extractor_nor_whisper_sizes_is_a_gap_of_the_default_run(self):
        from optimum_observer.errors import ObserverExportError, Stage

        model, _ = self.build("speech_to_text")
        with self.assertRaises(ObserverExportError) as caught:
            family_of(get_task(SPEECH)).default_run(model, get_task(SPEECH))
        self.assertEqual(caught.exception.stage, Stage.CAPTURE)
        self.assertIn("cannot build speech inputs", str(caught.exception))
        self.assertIn("feature_extractor=", str(caught.exception))
