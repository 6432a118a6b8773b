"""End-to-end: vision-language models that take each prompt's images as tiles, [prompts, images,
C, H, W] with a `pixel_attention_mask` (idefics3, smolvlm, idefics2).

The fast class exports a tiny random idefics3 with real-checkpoint shapes at tiny sizes: a
SigLIP-style vision tower of 32 px tiles and 8 px patches (4 x 4 patches, pixel-shuffled by 2: 4
image tokens per tile) and a llama text model with grouped-query attention (4 query heads, 2
key/value heads, explicit head_dim). Its processor is built locally: Idefics3ImageProcessor
splitting every image into 32 px tiles plus a global image (an image of 40 x 30 px gives 5 tiles,
one of 24 x 50 px gives 3, so the prompts of a batch have different numbers of tiles and the
processor pads them with all-zero images, masked out), a BPE tokenizer trained on the fly with
the processor's tokens, and Idefics3Processor laying the placeholders out (`<fake_token_around_image>`,
`<row_i_col_j>`, `<global-img>`, 4 `<image>` per tile). One export (through
`legacy_shim.main_export`, from the saved model and processor) is shared by the class.
"""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from parameterized import parameterized

import optimum_observer
from legacy_shim import Exporter, ORTModelForImageTextToText
from optimum_observer import patches, vision_language
from shim_helpers import export_saved_vision_language, random_images
from tiny_models import build_tokenizer

NEW_TOKENS = 8
IMAGE_SIZE, PATCH_SIZE = 32, 8
PROMPTS = ("<image>User: What is this?", "<image>User: Once upon a time, the capital of France was")
_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256,
)  # fmt: skip
_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)  # fmt: skip
#: the processor's own tokens: placeholders and tile positions (a 6 x 6 grid at most).
_SPECIAL_TOKENS = [
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]  # fmt: skip


def tiny_processor() -> transformers.Idefics3Processor:
    trained = build_tokenizer()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        **trained.special_tokens_map,
        additional_special_tokens=_SPECIAL_TOKENS,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    image_processor = transformers.Idefics3ImageProcessor(
        size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    tokens_per_tile = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4
    return transformers.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_tile
    )


def tiny_idefics3(processor: transformers.Idefics3Processor) -> transformers.Idefics3ForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = transformers.Idefics3Config(
        vision_config=dict(_VISION),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer) + 8, pad_token_id=tokenizer.pad_token_id, **_TEXT
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model



SETTINGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


class TestIdefics3Export(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.processor = tiny_processor()
        cls.model = tiny_idefics3(cls.processor)
        export_saved_vision_language(cls, "idefics3")
        cls.onnx_model = ORTModelForImageTextToText.from_pretrained(cls.output)

    def batch(self, sizes_per_prompt: tuple[tuple[tuple[int, int], ...], ...], text: tuple[str, ...] = PROMPTS):
        per_prompt = [random_images(sizes) for sizes in sizes_per_prompt]
        return self.processor(images=per_prompt, text=list(text), padding=True, return_tensors="pt")

    def test_main_export_routes_the_task_to_the_observer(self):
        self.assertEqual(self.route.route, Exporter.OBSERVER)
        self.assertIn("idefics3_navit_position_ids_at_once", self.result.patches)

    def test_vision_encoder_takes_the_tiles_and_their_mask(self):
        session = ort.InferenceSession(str(self.output / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in session.get_inputs()}
        self.assertEqual(list(inputs), ["pixel_values", "pixel_attention_mask"])
        self.assertEqual(inputs["pixel_values"].shape[2:], [3, IMAGE_SIZE, IMAGE_SIZE])
        self.assertEqual(inputs["pixel_attention_mask"].shape[2:], [IMAGE_SIZE, IMAGE_SIZE])
        # Prompts and tiles per prompt vary; the features of every real tile come out concatenated.
        axes = self.result.dynamic_axes
        for name in ("pixel_values", "pixel_attention_mask"):
            self.assertEqual(sorted(axes[f"vision_encoder.onnx:{name}"]), [0, 1], name)
        (output,) = session.get_outputs()
        self.assertEqual((output.name, len(output.shape), output.shape[1]), ("image_features", 2, 64))

    def test_every_observed_call_replays_within_atol(self):
        calls = self.result.validation.calls
        self.assertEqual(sum(c.graph == "vision_encoder.onnx" for c in calls), 2)
        self.assertTrue(all(c.ok for c in calls), self.result.validation.table())
        (generation,) = self.result.validation.generation
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)

    def test_processor_batch_of_tiled_images_generates_torchs_greedy_tokens(self):
        batch = self.batch((((40, 30),), ((24, 50),)))
        # 5 tiles and 3 tiles: the second prompt's last two are padding images.
        self.assertEqual(tuple(batch["pixel_values"].shape), (2, 5, 3, IMAGE_SIZE, IMAGE_SIZE))
        self.assertEqual(batch["pixel_attention_mask"][1].flatten(1).any(-1).tolist(), [True] * 3 + [False] * 2)
        lengths = batch["attention_mask"].sum(-1).tolist()
        self.assertNotEqual(lengths[0], lengths[1])
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        got = self.onnx_model.generate(**batch, **SETTINGS)
        self.assertEqual(got.shape, (2, batch["input_ids"].shape[1] + NEW_TOKENS))
        self.assertEqual(got.tolist(), expected.tolist())

    def test_two_images_in_one_prompt_generate_torchs_greedy_tokens(self):
        text = ("<image><image>User: Compare these two.", PROMPTS[1])
        batch = self.batch((((30, 30), (24, 50)), ((50, 24),)), text)
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        self.assertEqual(self.onnx_model.generate(**batch, **SETTINGS).tolist(), expected.tolist())

    def test_runtime_needs_the_pixel_attention_mask(self):
        batch = self.batch((((24, 24),),), PROMPTS[:1])
        del batch["pixel_attention_mask"]
        with self.assertRaisesRegex(ValueError, r"takes 'pixel_attention_mask' beside pixel_values and none was"):
            self.onnx_model.generate(**batch, max_new_tokens=2)

    def test_runtime_refuses_pixel_values_of_another_rank(self):
        batch = self.batch((((24, 24),),), PROMPTS[:1])
        batch["pixel_values"] = batch["pixel_values"][0]
        with self.assertRaisesRegex(
            ValueError, r"pixel_values of shape \(5, 3, 32, 32\): the vision encoder takes pixel_values of .*\(5 axes"
        ):
            self.onnx_model.generate(**batch, max_new_tokens=2)

    def test_the_model_is_given_back_unrouted(self):
        self.assertIs(type(self.model.model.text_model), transformers.LlamaModel)
        self.assertIs(type(self.model.get_output_embeddings()), torch.nn.Linear)
        self.assertNotIn("get_image_features", vars(self.model.model))


def tiled_config(model_type: str, vocab_size: int = 300) -> transformers.PretrainedConfig:
    """A tiny config of a type whose images are tiles, with the idefics3 test's shapes."""
    text = dict(model_type="mistral" if model_type == "idefics2" else "llama", vocab_size=vocab_size, **_TEXT)
    extra = {"scale_factor": 2} if model_type != "idefics2" else {
        "perceiver_config": dict(
            hidden_size=64, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16,
            num_key_value_heads=2,
        ),
    }  # fmt: skip
    return transformers.AutoConfig.for_model(
        model_type, vision_config=dict(_VISION), text_config=text, image_token_id=290, pad_token_id=0, **extra
    )


#: the patches the vision part of each type needs at torch.export, in the order they are met.
TILE_PATCHES = {
    "idefics3": ("idefics3_navit_position_ids_at_once",),
    "smolvlm": ("smolvlm_image_features_as_idefics3", "smolvlm_navit_position_ids_at_once"),
    "idefics2": ("idefics2_navit_position_ids_at_once", "idefics2_vision_mask_always_built"),
}
_FAILURES = {
    "idefics2_navit_position_ids_at_once": "enumerate\\(patch_attention_mask\\)",
    "idefics3_navit_position_ids_at_once": "enumerate\\(patch_attention_mask\\)",
    "smolvlm_navit_position_ids_at_once": "enumerate\\(patch_attention_mask\\)",
    "smolvlm_image_features_as_idefics3": "any\\(real_images_inds\\)",
    "idefics2_vision_mask_always_built": "torch.any\\(~patch_attention_mask\\)",
}


class _Tiles(torch.nn.Module):
    """The vision part with its two inputs named (torch.export maps dynamic shapes by name)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.part = vision_language.VisionEncoder(model)

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        return self.part(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask).image_features


class TestTilePatches(unittest.TestCase):
    """The vision part of each tiled type exports only with its patches, each removing the
    failure it names; with all of them the graph gives the eager features."""

    @staticmethod
    def export_vision_encoder(model: torch.nn.Module) -> torch.export.ExportedProgram:
        pixel_values = torch.randn(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
        mask = torch.ones(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
        axes = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
        return torch.export.export(
            _Tiles(model),
            (pixel_values, mask),
            dynamic_shapes={"pixel_values": axes, "pixel_attention_mask": axes},
        )

    @parameterized.expand(sorted(TILE_PATCHES))
    def test_each_patch_removes_its_failure(self, model_type):
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(tiled_config(model_type)).eval()
        by_name = {p.name: p for p in patches.PATCHES}
        needed = TILE_PATCHES[model_type]
        for count, name in enumerate(needed):
            with patches.applied([by_name[n] for n in needed[:count]]):
                with self.assertRaisesRegex(Exception, _FAILURES[name]):
                    self.export_vision_encoder(model)
        with patches.applied([by_name[n] for n in needed]):
            program = self.export_vision_encoder(model)
        # Two prompts of 2 and 1 images: the second prompt's second image is padding.
        pixel_values = torch.randn(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
        pixel_values[1, 1] = 0
        mask = torch.ones(2, 2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
        mask[1, 1] = 0
        with torch.no_grad():
            expected = _Tiles(model)(pixel_values, mask)
            got = program.module()(pixel_values, mask)
        # The three real images' features, concatenated; the padding image gives none.
        self.assertEqual(got.shape[0], 3 * vision_language.image_layout(model).tokens_per_image)
        torch.testing.assert_close(got, expected)

    def test_position_ids_at_once_equal_upstreams_on_padded_images(self):
        # Images padded at the bottom and right (as the processors pad them): 3 x 2 and 4 x 4 patches.
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(tiled_config("idefics3")).eval()
        embeddings = model.model.vision_model.embeddings
        pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
        patch_mask = torch.zeros(2, IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE, dtype=torch.bool)
        patch_mask[0, :3, :2] = True
        patch_mask[1] = True
        with torch.no_grad():
            expected = embeddings(pixel_values, patch_mask)
            (patch,) = [p for p in patches.PATCHES if p.name == "idefics3_navit_position_ids_at_once"]
            with patches.applied([patch]):
                got = embeddings(pixel_values, patch_mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
class TestTiledTypes(unittest.TestCase):
    """The default run (pixel values of rank 5 with padding images, pixel_attention_mask) and
    validation (every observed call replayed, 8 greedy tokens through ORTModelForImageTextToText
    on batch 2 with different prompt lengths, one image each); about 20 s each."""

    @parameterized.expand(sorted(TILE_PATCHES))
    def test_exports_and_generates_torchs_greedy_tokens(self, model_type):
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(tiled_config(model_type)).eval()
        with tempfile.TemporaryDirectory() as tmp:
            result = optimum_observer.export(
                model, Path(tmp) / "out", task="image-text-to-text", runtime_class=ORTModelForImageTextToText
            )
        self.assertEqual(result.model_type, model_type)
        self.assertTrue(result.validation.ok)
        self.assertTrue(set(TILE_PATCHES[model_type]) <= set(result.patches))
        (generation,) = result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)
