"""End-to-end: a tiny random llava exported for image-text-to-text by observing generate().

The model has real-checkpoint shapes at tiny sizes: a CLIP vision tower (24 px images, 8 px
patches: 9 image tokens after the CLS token is dropped) and a llama text model with grouped-query
attention (4 query heads, 2 key/value heads, explicit head_dim). Its processor is built locally
(CLIPImageProcessor, a BPE tokenizer trained on the fly with an `<image>` token, LlavaProcessor
putting one placeholder per image feature): no hub access. One export (about 10 s), through
Optimum's entry point `legacy_shim.main_export` from the saved model and processor (the router
sends the pair to optimum_observer.export, which validates it with
legacy_shim.ORTModelForImageTextToText), is shared by the class; it writes the three graphs of
optimum_observer.vision_language, and the runtime class generates torch's tokens from them with
the processor saved beside them.
"""

from __future__ import annotations

import functools
import tempfile
import unittest
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from parameterized import parameterized

import optimum_observer
from legacy_shim import Exporter, ORTModelForImageTextToText, main_export
from legacy_shim.tooling import tiny_configs, tiny_processors
from optimum_observer import ObserverExportError, conversion, patches, vision_language
from optimum_observer.errors import ErrorKind, Stage
from shim_helpers import export_saved_vision_language, random_images, run_cli
from tiny_models import build_tokenizer

FILES = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
NEW_TOKENS = 8
IMAGE_SIZE, PATCH_SIZE = 24, 8
PROMPTS = ("<image>\nUSER: What is this?", "<image>\nUSER: Once upon a time, the capital of France was")


def tiny_tokenizer(*image_tokens: str) -> transformers.PreTrainedTokenizerFast:
    trained = build_tokenizer()
    # As a llama tokenizer: no token_type_ids (llava takes none), padding on the left; given to the
    # constructor, so that the saved tokenizer keeps them.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        **trained.special_tokens_map,
        additional_special_tokens=list(image_tokens),
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_processor() -> transformers.LlavaProcessor:
    tokenizer = tiny_tokenizer("<image>")
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def tiny_llava(processor: transformers.LlavaProcessor) -> transformers.LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = transformers.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=len(tokenizer) + 8,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model



class TestLlavaExport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.processor = tiny_processor()
        cls.model = tiny_llava(cls.processor)
        export_saved_vision_language(cls, "llava")

    def test_main_export_routes_the_task_to_the_observer(self):
        self.assertEqual(self.route.route, Exporter.OBSERVER)
        self.assertIn("no OnnxConfig for llava / image-text-to-text", self.route.decision.reason)

    def test_writes_three_graphs_with_optimum_names_and_the_processor(self):
        self.assertEqual(self.result.onnx_files, list(FILES))
        for saved in ("config.json", "tokenizer.json", "preprocessor_config.json"):
            self.assertTrue((self.output / saved).is_file(), saved)
        names = {}
        for file in FILES:
            session = ort.InferenceSession(str(self.output / file), providers=["CPUExecutionProvider"])
            names[file] = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        self.assertEqual(names["vision_encoder.onnx"], (["pixel_values"], ["image_features"]))
        self.assertEqual(names["embed_tokens.onnx"], (["input_ids"], ["inputs_embeds"]))
        past = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
        present = [name.replace("past_key_values", "present") for name in past]
        self.assertEqual(
            names["decoder_model_merged.onnx"],
            (["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]),
        )

    def test_image_and_sequence_axes_are_dynamic(self):
        axes = self.result.dynamic_axes
        self.assertEqual(axes["vision_encoder.onnx:pixel_values"], {0: "batch_size"})
        self.assertEqual(axes["embed_tokens.onnx:input_ids"], {0: "batch_size", 1: "sequence_length"})
        self.assertEqual(
            axes["decoder_model_merged.onnx:attention_mask"], {0: "batch_size", 1: "past_sequence_length + sequence_length"}
        )
        self.assertEqual(axes["decoder_model_merged.onnx:past_key_values.0.key"][2], "past_sequence_length")

    def test_every_observed_call_replays_within_atol(self):
        calls = self.result.validation.calls
        self.assertEqual({c.graph for c in calls}, set(FILES))
        # generate() over batches of 2 and 3: the vision tower once per batch, the embedding and
        # the decoder once per step (prompt, then 2 cached steps of the 3 new tokens).
        self.assertEqual(sum(c.graph == "vision_encoder.onnx" for c in calls), 2)
        self.assertEqual(sum(c.graph == "decoder_model_merged.onnx" for c in calls), 6)
        self.assertTrue(all(c.ok for c in calls), self.result.validation.table())
        self.assertTrue(self.result.validation.ok)

    def test_processor_batch_generates_torchs_greedy_tokens(self):
        processor = transformers.AutoProcessor.from_pretrained(self.output)
        self.assertIsInstance(processor, transformers.LlavaProcessor)
        batch = processor(
            images=random_images(((40, 30), (24, 50))), text=list(PROMPTS), padding=True, return_tensors="pt"
        )
        lengths = batch["attention_mask"].sum(-1).tolist()
        self.assertNotEqual(lengths[0], lengths[1])
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        onnx_model = ORTModelForImageTextToText.from_pretrained(self.output)
        got = onnx_model.generate(**batch, **settings)
        self.assertEqual(got.shape, (2, batch["input_ids"].shape[1] + NEW_TOKENS))
        self.assertEqual(got.tolist(), expected.tolist())

    def test_from_pretrained_with_export_generates_torchs_greedy_tokens(self):
        # A second export (about 10 s), through the runtime class's own entry point.
        onnx_model = ORTModelForImageTextToText.from_pretrained(self.source, export=True)
        self.assertTrue((onnx_model.model_save_dir / "decoder_model_merged.onnx").is_file())
        batch = self.processor(images=random_images(((30, 30), (24, 40))), text=list(PROMPTS), padding=True, return_tensors="pt")
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        self.assertEqual(onnx_model.generate(**batch, **settings).tolist(), expected.tolist())

    def test_optimum_cli_exports_the_task_and_the_runtime_generates_torchs_tokens(self):
        # Optimum's command line, unchanged (a fresh interpreter: the installed hook routes it).
        out = Path(self.tmp.name) / "llava-cli"
        done = run_cli("export", "onnx", "--model", str(self.source), "--task", "image-text-to-text", str(out), cwd=Path(self.tmp.name))
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        for file in FILES:
            self.assertTrue((out / file).is_file(), file)
        batch = self.processor(images=random_images(((30, 30), (24, 40))), text=list(PROMPTS), padding=True, return_tensors="pt")
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        self.assertEqual(ORTModelForImageTextToText.from_pretrained(out).generate(**batch, **settings).tolist(), expected.tolist())

    def test_two_images_in_one_prompt_generate_torchs_greedy_tokens(self):
        # Three images for two prompts: the features go to the image tokens in order.
        text = ["<image><image>\nUSER: Compare these two.", PROMPTS[1]]
        batch = self.processor(images=random_images(((30, 30), (24, 40), (50, 24))), text=text, padding=True, return_tensors="pt")
        self.assertEqual(tuple(batch["pixel_values"].shape), (3, 3, IMAGE_SIZE, IMAGE_SIZE))
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        got = ORTModelForImageTextToText.from_pretrained(self.output).generate(**batch, **settings)
        self.assertEqual(got.tolist(), expected.tolist())

    def test_runtime_refuses_text_without_the_image_placeholders(self):
        batch = self.processor(images=random_images(((24, 24),)), text=[PROMPTS[0]], return_tensors="pt")
        text_only = self.processor.tokenizer(["USER: What is this?"], return_tensors="pt")
        onnx_model = ORTModelForImageTextToText.from_pretrained(self.output)
        with self.assertRaisesRegex(ValueError, r"tokens: 0, features 9; build the prompt with the model's processor"):
            onnx_model.generate(**text_only, pixel_values=batch["pixel_values"], max_new_tokens=2)

    def test_the_model_is_given_back_unrouted(self):
        self.assertIs(type(self.model.get_decoder()), transformers.LlamaModel)
        self.assertIs(type(self.model.get_output_embeddings()), torch.nn.Linear)
        self.assertIs(type(self.model.get_input_embeddings()), torch.nn.Embedding)
        self.assertNotIn("get_image_features", vars(self.model.model))
        self.assertNotIn("forward", vars(self.model))

    def test_runtime_refuses_an_image_of_the_wrong_channel_count(self):
        batch = self.processor(images=random_images(((24, 24),)), text=[PROMPTS[0]], return_tensors="pt")
        onnx_model = ORTModelForImageTextToText.from_pretrained(self.output)
        with self.assertRaisesRegex(ValueError, r"pixel_values of shape \(1, 1, 24, 24\).*image processor"):
            onnx_model.generate(
                input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:, :1], max_new_tokens=2
            )


#: llava_next's tile grids: one tile, two side by side or stacked, and four.
PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
PINPOINTS += [[2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


#: Image placeholder ids of the tiny text vocabulary (300): as checkpoints, the tokenizer built for
#: a config puts the processor's tokens at the config's ids (legacy_shim.tooling.tiny_processors).
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 290, 291


def tiny_llava_next_config() -> transformers.LlavaNextConfig:
    return transformers.LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        ),
        text_config=dict(model_type="llama", **_TEXT, pad_token_id=0),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
    )  # fmt: skip


def tiny_llava_next_processor() -> transformers.LlavaNextProcessor:
    """The LlavaNextProcessor the coverage sweep builds for a tiny config (CLIP's 24 px tiles of
    8 px patches, the config's tile grids, `<image>` at the config's id)."""
    return tiny_processors.tiny_processor("llava_next", tiny_llava_next_config())


def tiny_llava_next(processor: transformers.LlavaNextProcessor) -> transformers.LlavaNextForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = tiny_llava_next_config()
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    # image_newline starts uninitialised (torch.empty): random values, as a trained one would be.
    model.model.image_newline.data.normal_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class TestVariableTokensPerImage(unittest.TestCase):
    """llava_next: each image is split in tiles by its size (image_sizes, pixel_values of [images,
    tiles, C, H, W]) and takes as many placeholder tokens as its unpadded tile grid has features.
    One export (about 15 s) from the saved model and its processor, through main_export."""

    @classmethod
    def setUpClass(cls):
        cls.processor = tiny_llava_next_processor()
        cls.model = tiny_llava_next(cls.processor)
        export_saved_vision_language(cls, "llava_next")
        cls.onnx_model = ORTModelForImageTextToText.from_pretrained(cls.output)

    def generate_both(self, batch: transformers.BatchFeature) -> tuple[list, list]:
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**batch, **settings)
        return self.onnx_model.generate(**batch, **settings).tolist(), expected.tolist()

    def test_the_vision_graph_takes_what_get_image_features_is_called_with(self):
        session = ort.InferenceSession(str(self.output / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
        self.assertEqual([i.name for i in session.get_inputs()], ["pixel_values", "image_sizes"])
        self.assertEqual(len(session.get_inputs()[0].shape), 5)
        (features,) = session.get_outputs()
        self.assertEqual((features.name, len(features.shape)), ("image_features", 2))
        axes = self.result.dynamic_axes
        self.assertEqual(set(axes["vision_encoder.onnx:pixel_values"]), {0, 1})
        self.assertEqual(axes["vision_encoder.onnx:image_sizes"], {0: "batch_size"})

    def test_every_observed_call_replays_within_atol(self):
        self.assertTrue(self.result.validation.ok, self.result.validation.table())
        (generation,) = self.result.validation.generation
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)

    def test_images_of_sizes_never_observed_generate_torchs_greedy_tokens(self):
        # Two prompts of different lengths; a tall image (two tiles stacked, unpadded on the sides)
        # and a wide one (unpadded at the top and bottom): different token counts.
        pictures = random_images(((70, 30), (30, 55)))
        batch = self.processor(images=pictures, text=list(PROMPTS), padding=True, return_tensors="pt")
        tokens = (batch["input_ids"] == self.model.config.image_token_id).sum(-1).tolist()
        self.assertNotEqual(tokens[0], tokens[1])
        self.assertNotEqual(*batch["attention_mask"].sum(-1).tolist())
        got, expected = self.generate_both(batch)
        self.assertEqual(got, expected)

    def test_two_images_in_one_prompt_generate_torchs_greedy_tokens(self):
        text = ["<image><image>\nUSER: Compare these two.", PROMPTS[1]]
        pictures = random_images(((30, 30), (24, 60), (50, 40)))
        batch = self.processor(images=pictures, text=text, padding=True, return_tensors="pt")
        got, expected = self.generate_both(batch)
        self.assertEqual(got, expected)

    def test_runtime_names_a_missing_vision_input(self):
        batch = self.processor(images=random_images(((30, 30),)), text=[PROMPTS[0]], return_tensors="pt")
        with self.assertRaisesRegex(ValueError, r"takes 'image_sizes' beside pixel_values.*\*\*processor\("):
            self.onnx_model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=2)

    def test_runtime_refuses_images_of_the_wrong_rank(self):
        batch = self.processor(images=random_images(((30, 30),)), text=[PROMPTS[0]], return_tensors="pt")
        expected = (
            r"pixel_values of shape \(\d+, 3, 24, 24\).*"
            r"takes pixel_values of \[batch_size, pixel_values_dim_1, 3, 24, 24\]"
        )
        with self.assertRaisesRegex(ValueError, expected):
            self.onnx_model.generate(**{**batch, "pixel_values": batch["pixel_values"][0]}, max_new_tokens=2)


def _llava_next_for_patch_test() -> tuple[Any, Any]:
    processor = tiny_llava_next_processor()
    return tiny_llava_next(processor), processor


def _mistral3_for_patch_test() -> tuple[Any, Any]:
    config, processor = _mistral3()
    torch.manual_seed(0)
    return transformers.Mistral3ForConditionalGeneration(config).eval(), processor


#: patch -> (model and processor, image sizes exported from, image sizes checked).
IMAGE_SIZE_PATCHES = {
    "llava_next_image_features_packed": (
        _llava_next_for_patch_test, ((30, 30), (24, 60)), ((70, 30), (30, 55), (24, 24))
    ),
    "mistral3_image_features_on_a_grid": (
        _mistral3_for_patch_test, ((128, 128), (64, 128)), ((96, 48), (40, 120), (128, 80))
    ),
}


class TestImageSizePatches(unittest.TestCase):
    """The patches that compute, with tensor ops, what upstream computes from `image_sizes` read
    as Python numbers: needed by torch.export, and equal to upstream on image sizes not exported."""

    @parameterized.expand(sorted(IMAGE_SIZE_PATCHES))
    def test_exports_only_with_the_patch_and_matches_upstream_on_new_sizes(self, name):
        build, exported_sizes, new_sizes = IMAGE_SIZE_PATCHES[name]
        model, processor = build()
        image_token = processor.image_token
        # The vision graph's module as the export builds it: keyword inputs pixel_values, image_sizes.
        graph = optimum_observer.tasks.get_task("image-text-to-text").graphs[0].with_observed_inputs(["image_sizes"])
        module = conversion.contract_module(model, graph, ["pixel_values", "image_sizes"])
        seen = processor(images=random_images(exported_sizes), text=[image_token] * 2, padding=True, return_tensors="pt")
        kwargs = {"pixel_values": seen["pixel_values"], "image_sizes": seen["image_sizes"]}
        pixel_axes = range(2) if seen["pixel_values"].dim() == 5 else (0, 2, 3)
        dynamic = {
            "pixel_values": {axis: torch.export.Dim.DYNAMIC for axis in pixel_axes},
            "image_sizes": {0: torch.export.Dim.DYNAMIC},
        }
        with self.assertRaisesRegex(Exception, "data-dependent"):
            torch.export.export(module, (), kwargs, dynamic_shapes=dynamic)
        (patch,) = [p for p in patches.PATCHES if p.name == name]
        with patches.applied([patch]), torch.no_grad():
            program = torch.export.export(module, (), kwargs, dynamic_shapes=dynamic)
        new = processor(images=random_images(new_sizes), text=[image_token] * 3, padding=True, return_tensors="pt")
        new_inputs = {"pixel_values": new["pixel_values"], "image_sizes": new["image_sizes"]}
        with torch.no_grad():
            (expected,) = module(**new_inputs)
            (got,) = program.module()(**new_inputs)
        image_tokens = int((new["input_ids"] == model.config.image_token_id).sum())
        self.assertEqual(got.shape, (image_tokens, model.config.text_config.hidden_size))
        torch.testing.assert_close(got, expected)


class TestVisionLanguageBadInput(unittest.TestCase):
    def test_a_run_with_one_channel_images_names_model_stage_and_remedy(self):
        processor = tiny_processor()
        model = tiny_llava(processor)
        batch = vision_language.reference_batches(model, processor.tokenizer.pad_token_id)[0]
        batch["pixel_values"] = batch["pixel_values"][:, :1]

        def run(model):
            return model.generate(**batch, max_new_tokens=3, do_sample=False)

        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(ObserverExportError) as caught:
                optimum_observer.export(model, Path(tmp) / "out", task="image-text-to-text", run=run)
            self.assertFalse((Path(tmp) / "out").exists())
        error = caught.exception
        self.assertEqual((error.model_type, error.stage), ("llava", Stage.CAPTURE))
        self.assertIn("fails in plain PyTorch as well", str(error))
        self.assertIn("processor(images=", str(error))


    def test_a_run_with_one_cached_step_is_refused_before_export(self):
        processor = tiny_processor()
        model = tiny_llava(processor)
        batch = vision_language.reference_batches(model, processor.tokenizer.pad_token_id)[0]

        def run(model):
            return model.generate(**batch, max_new_tokens=2, do_sample=False)

        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(ObserverExportError) as caught:
                optimum_observer.export(model, Path(tmp) / "out", task="image-text-to-text", run=run)
        error = caught.exception
        self.assertEqual(error.stage, Stage.SYNTHESIS)
        self.assertIn("needs calls that read a cache (past_key_values), seen at two lengths", str(error))
        self.assertIn("max_new_tokens=3", str(error))


    def test_a_model_whose_images_need_their_sizes_needs_its_processor(self):
        # Without its processor, the default run cannot make llava_next's tiles and image_sizes:
        # a gap of the default run (with its remedy), not the model's failure.
        model = tiny_llava_next(tiny_llava_next_processor())
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(ObserverExportError) as caught:
                optimum_observer.export(model, Path(tmp) / "out", task="image-text-to-text")
        error = caught.exception
        self.assertEqual((error.model_type, error.stage, error.kind), ("llava_next", Stage.CAPTURE, ErrorKind.FAILED))
        self.assertIn(
            "the default run cannot build image-text inputs for this model (ValueError: get_image_features "
            "requires image_sizes, which the default run does not build)",
            error.reason,
        )
        self.assertIn("pass the model's processor (feature_extractor=", error.remedy)


class TestVisionParts(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_llava(tiny_processor())

    def export_vision_encoder(self) -> torch.export.ExportedProgram:
        pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
        return torch.export.export(
            vision_language.VisionEncoder(self.model),
            (),
            {"pixel_values": pixel_values},
            dynamic_shapes={"pixel_values": {0: torch.export.Dim.DYNAMIC}},
        )

    def test_the_image_axis_needs_the_llava_features_patch(self):
        # torch.export's wording of what torch.onnx.export reports as "inferred a static shape".
        with self.assertRaisesRegex(Exception, r"pixel_values'\].size\(\)\[0\] as dynamic but your code specialized it"):
            self.export_vision_encoder()
        (patch,) = [p for p in patches.PATCHES if p.name == "llava_image_features_in_one_tensor"]
        with patches.applied([patch]):
            program = self.export_vision_encoder()
        one_image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad():
            expected = vision_language.VisionEncoder(self.model)(pixel_values=one_image).image_features
            got = program.module()(pixel_values=one_image).image_features
        self.assertEqual(got.shape, ((IMAGE_SIZE // PATCH_SIZE) ** 2, 64))
        torch.testing.assert_close(got, expected)

    def test_routing_is_undone_when_the_run_raises(self):
        parts = {name: part(self.model) for name, part in vision_language.PARTS.items()}
        with self.assertRaises(RuntimeError):
            with vision_language.routed(self.model, parts):
                self.assertIs(self.model.get_decoder(), parts["text_decoder"])
                raise RuntimeError("run failed")
        self.assertIs(type(self.model.get_decoder()), transformers.LlamaModel)
        self.assertIs(type(self.model.get_output_embeddings()), torch.nn.Linear)
        self.assertIs(type(self.model.get_input_embeddings()), torch.nn.Embedding)
        self.assertNotIn("get_image_features", vars(self.model.model))

    def test_routing_hands_back_one_tensor_where_the_model_returns_one(self):
        # gemma3's get_image_features returns one tensor (llava's a list): under the routing its
        # own generate gives the same tokens (the export: tests/test_vision_language_masks.py).
        config = transformers.Gemma3Config(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
            ),
            text_config=dict(
                model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
            ),
            mm_tokens_per_image=4, image_token_index=290, boi_token_index=291, eoi_token_index=292,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
        batch = vision_language.reference_batches(model, 0)[0]
        settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            expected = model.generate(**batch, **settings)
            parts = {name: part(model) for name, part in vision_language.PARTS.items()}
            with vision_language.routed(model, parts):
                got = model.generate(**batch, **settings)
        self.assertEqual(got.tolist(), expected.tolist())


#: Other types whose image features replace their placeholder tokens one to one, at tiny sizes
#: (grouped-query attention in every text model).
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=300, max_position_embeddings=256,
)  # fmt: skip
_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
ONE_TO_ONE_CONFIGS = {
    "internvl": lambda: transformers.InternVLConfig(
        vision_config=dict(
            model_type="internvl_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=[56, 56], patch_size=[14, 14],
        ),
        text_config=dict(model_type="qwen2", **_TEXT),
        image_token_id=290,
        downsample_ratio=0.5,
    ),  # fmt: skip
    "vipllava": lambda: transformers.VipLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=5,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        ),
        text_config=dict(model_type="llama", **_TEXT),
        image_token_index=290,
        vision_feature_layers=[-1, -2, -3, -4, -5],
    ),  # fmt: skip
    "deepseek_vl": lambda: transformers.DeepseekVLConfig(
        vision_config=dict(model_type="siglip_vision_model", **_VISION),
        text_config=dict(model_type="llama", **_TEXT),
        image_token_id=290,
    ),
    "janus": lambda: transformers.JanusConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
            projection_dim=64, mlp_ratio=2.0,
        ),
        # The image-generation half (a VQ-VAE, unused by image-text-to-text), shrunk: GroupNorm
        # takes 32 groups, so 32 channels.
        vq_config=dict(
            embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
            num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, num_patches=4,
        ),
        text_config=dict(model_type="llama", **_TEXT),
        image_token_id=290,
    ),  # fmt: skip
    "cohere2_vision": lambda: transformers.Cohere2VisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **_VISION),
        # cohere2's default special tokens (eos 255001) are outside the tiny vocabulary.
        text_config=dict(model_type="cohere2", bos_token_id=1, eos_token_id=2, pad_token_id=0, **_TEXT),
        image_token_id=290,
        downsample_factor=2,
        alignment_intermediate_size=128,
    ),
}


@pytest.mark.slow
class TestOneToOneTypes(unittest.TestCase):
    """The default run and validation (every observed call replayed, 8 greedy tokens through
    ORTModelForImageTextToText on batch 2 with different prompt lengths, one image each); about
    10 s each, so in the slow run (`python -m pytest -m slow tests/test_vision_language.py`)."""

    @parameterized.expand(sorted(ONE_TO_ONE_CONFIGS))
    def test_exports_and_generates_torchs_greedy_tokens(self, model_type):
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(ONE_TO_ONE_CONFIGS[model_type]()).eval()
        with tempfile.TemporaryDirectory() as tmp:
            result = optimum_observer.export(
                model, Path(tmp) / "out", task="image-text-to-text", runtime_class=ORTModelForImageTextToText
            )
        self.assertEqual(result.model_type, model_type)
        self.assertTrue(result.validation.ok)
        (generation,) = result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)


#: Types whose image count per prompt is variable (tiles by image size), each with its processor
#: built locally: (config, processor) factories.
AYA_TOKENS = ("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")


def _aya_vision() -> tuple[transformers.PretrainedConfig, Any]:
    tokenizer = tiny_tokenizer(*AYA_TOKENS)
    # aya-vision-8b's layout at tiny sizes: 364 px tiles of 14 px patches, 2x2 pixel shuffle
    # (13 x 13 tokens per tile) -> 32 px tiles of 8 px patches (2 x 2 tokens per tile).
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = transformers.AyaVisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, img_size=32, downsample_factor=2
    )
    config = transformers.AyaVisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=32, patch_size=8,
        ),
        text_config=dict(
            model_type="cohere2", **{**_TEXT, "vocab_size": len(tokenizer) + 8}, pad_token_id=tokenizer.pad_token_id
        ),
        downsample_factor=2,
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
    )  # fmt: skip
    return config, processor


def _llava_next_video() -> tuple[transformers.PretrainedConfig, Any]:
    # llava_next's images (its video input is not exported: issue 17), made by LlavaNextProcessor
    # (the tooling's stand-in: LlavaNextVideoProcessor's video processor needs torchvision).
    config = transformers.LlavaNextVideoConfig(
        **{
            k: v
            for k, v in tiny_llava_next_config().to_dict().items()
            if k in ("vision_config", "image_grid_pinpoints", "vision_feature_layer")
        },
        text_config=dict(model_type="llama", **_TEXT, pad_token_id=0),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
    )
    return config, tiny_processors.tiny_processor("llava_next_video", config)


def _mistral3() -> tuple[transformers.PretrainedConfig, Any]:
    # Mistral-Small-3.1's layout at tiny sizes: pixtral tower of 16 px patches, images up to the
    # tower's size (1540 -> 128 px), 2 x 2 patches merged into one token, GQA text model; [IMG] is
    # 10 as in Mistral's tokenizer.
    config = transformers.Mistral3Config(
        vision_config=dict(
            model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, head_dim=8, image_size=128, patch_size=16,
        ),
        text_config=dict(model_type="mistral", **_TEXT, pad_token_id=0),
        image_token_index=10,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )  # fmt: skip
    return config, tiny_processors.tiny_processor("mistral3", config)


def _swept(model_type: str) -> tuple[transformers.PretrainedConfig, Any]:
    """The coverage sweep's tiny config and processor of `model_type`."""
    config = tiny_configs.tiny_config(model_type, "AutoModelForImageTextToText")
    return config, tiny_processors.tiny_processor(model_type, config)


VARIABLE_TOKEN_TYPES = {
    "aya_vision": _aya_vision,
    "llava_next_video": _llava_next_video,
    "mistral3": _mistral3,
    # Images at the sizes of two towers (high_res_pixel_values beside pixel_values).
    "deepseek_vl_hybrid": functools.partial(_swept, "deepseek_vl_hybrid"),
}


@pytest.mark.slow
class TestVariableTokenTypes(unittest.TestCase):
    """The default run through each type's processor (images of two sizes, tiles or tokens per
    image varying with the size) and validation (every observed call replayed, 8 greedy tokens
    through ORTModelForImageTextToText on batch 2 with different prompt lengths)."""

    @parameterized.expand(sorted(VARIABLE_TOKEN_TYPES))
    def test_exports_and_generates_torchs_greedy_tokens(self, model_type):
        config, processor = VARIABLE_TOKEN_TYPES[model_type]()
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        with tempfile.TemporaryDirectory() as tmp:
            result = optimum_observer.export(
                model, Path(tmp) / "out", task="image-text-to-text", tokenizer=processor.tokenizer,
                feature_extractor=processor, runtime_class=ORTModelForImageTextToText,
            )  # fmt: skip
        self.assertEqual(result.model_type, model_type)
        self.assertTrue(result.validation.ok, result.validation.table())
        (generation,) = result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)
