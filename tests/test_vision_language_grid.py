"""End-to-end: a tiny random qwen2_vl (flattened patches with a (t, h, w) grid per image, 3-D
multimodal rotary positions) exported for image-text-to-text by observing generate().

The model has real-checkpoint shapes at tiny sizes: a vision tower of 4 px patches, 2 frames per
temporal patch and 2 x 2 merge blocks, and a text model with grouped-query attention (4 query
heads, 2 key/value heads) and mrope sections. Its inputs come from the real
`Qwen2VLImageProcessor` and a BPE tokenizer trained on the fly, with the image placeholders
expanded as `Qwen2VLProcessor` expands them (one `<|image_pad|>` per merged patch of the image's
grid): `Qwen2VLProcessor` itself cannot be built here, since its video processor requires
torchvision, which this environment does not have. One export (about 30 s), shared by the class,
through `optimum_observer.export` with its default run and validation. qwen2_5_vl (windowed vision
attention), glm4v (interpolated position embeddings, its own image processor) and glm4v_moe run the
same checks in the slow run (`TestOtherGridTypes`).
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
from legacy_shim import ORTModelForImageTextToText
from legacy_shim.vision_language import _rope_index
from optimum_observer import patches, vision_language
from tiny_models import build_tokenizer
from shim_helpers import random_images

FILES = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
NEW_TOKENS = 8
PATCH, MERGE, TEMPORAL = 4, 2, 2
SPECIAL = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = (f"{IMAGE}What is this?", f"{IMAGE}Once upon a time, the capital of France was")


def tiny_tokenizer() -> transformers.Qwen2TokenizerFast:
    trained = build_tokenizer()
    return transformers.Qwen2TokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        **trained.special_tokens_map,
        additional_special_tokens=list(SPECIAL),
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_image_processor(model_type: str = "qwen2_vl") -> transformers.BaseImageProcessor:
    # Images are resized to multiples of 8 px (patch x merge) within 16 x 16 .. 32 x 32 pixels.
    if model_type.startswith("glm4v"):
        return transformers.Glm4vImageProcessor(
            size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=PATCH, temporal_patch_size=TEMPORAL,
            merge_size=MERGE,
        )  # fmt: skip
    return transformers.Qwen2VLImageProcessor(
        min_pixels=16 * 16, max_pixels=32 * 32, patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE
    )


#: The config attributes of the tokens of SPECIAL, per type (glm4v marks an image with its own
#: begin/end tokens; the tests spell them with qwen2_vl's).
TOKEN_ATTRIBUTES = {
    "qwen2_vl": ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id"),
    "glm4v": ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id"),
    "glm4v_moe": ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id"),
}


def tiny_config(model_type: str, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PretrainedConfig:
    attributes = TOKEN_ATTRIBUTES.get(model_type, TOKEN_ATTRIBUTES["qwen2_vl"])
    ids = dict(zip(attributes, tokenizer.convert_tokens_to_ids(list(SPECIAL))))
    vision = dict(depth=2, num_heads=4, patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, in_channels=3)
    if model_type == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    elif model_type == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1], window_size=16)
    else:  # glm4v, glm4v_moe
        # A 4 x 4 table of learned positions, interpolated to each image's patch grid.
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, image_size=16)
        ids.update(video_start_token_id=len(tokenizer), video_end_token_id=len(tokenizer) + 1)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer) + 8, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        # Multimodal rotary sections (what qwen2_vl's config makes of "type": "mrope").
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    if model_type == "glm4v_moe":
        # A dense first layer, then 4 routed experts (2 per token) and a shared one; rotary on half
        # of each 16-wide head, so sections of 8 / 2.
        text.update(
            head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1,
            rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
        )  # fmt: skip
    return transformers.AutoConfig.for_model(model_type, vision_config=vision, text_config=text, **ids)


def tiny_model(model_type: str, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(tiny_config(model_type, tokenizer)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model



def batch(tokenizer, image_processor, pictures: list[np.ndarray], prompts: list[str]) -> dict[str, torch.Tensor]:
    """What Qwen2VLProcessor returns: the image processor's pixel_values and image_grid_thw, and
    each `<|image_pad|>` expanded to one per merged patch of its image's grid, images in order."""
    vision = image_processor(images=pictures, return_tensors="pt")
    tokens = iter((vision["image_grid_thw"].prod(-1) // MERGE**2).tolist())
    texts = [
        "".join(piece + ("<|image_pad|>" * next(tokens) if i < prompt.count("<|image_pad|>") else "")
                for i, piece in enumerate(prompt.split("<|image_pad|>")))
        for prompt in prompts
    ]  # fmt: skip
    return {**tokenizer(texts, padding=True, return_tensors="pt"), **vision}


class TestQwen2VLExport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tokenizer, cls.image_processor = tiny_tokenizer(), tiny_image_processor()
        cls.model = tiny_model("qwen2_vl", cls.tokenizer)
        cls.tmp = tempfile.TemporaryDirectory()
        cls.output = Path(cls.tmp.name) / "qwen2_vl-onnx"
        cls.result = optimum_observer.export(
            cls.model, cls.output, task="image-text-to-text", runtime_class=ORTModelForImageTextToText
        )
        cls.onnx_model = ORTModelForImageTextToText.from_pretrained(cls.output)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def generate_both(self, inputs: dict[str, torch.Tensor]) -> tuple[list, list]:
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            expected = self.model.generate(**inputs, **settings)
        got = self.onnx_model.generate(**inputs, **settings)
        self.assertEqual(got.shape, (len(inputs["input_ids"]), inputs["input_ids"].shape[1] + NEW_TOKENS))
        return got.tolist(), expected.tolist()

    def test_vision_encoder_takes_the_grid_and_the_decoder_3d_positions(self):
        sessions = {f: ort.InferenceSession(str(self.output / f)) for f in FILES}
        vision = sessions["vision_encoder.onnx"]
        self.assertEqual([i.name for i in vision.get_inputs()], ["pixel_values", "image_grid_thw"])
        self.assertEqual(vision.get_inputs()[0].shape, ["batch_size", 3 * TEMPORAL * PATCH**2])
        self.assertEqual(vision.get_inputs()[1].shape, ["num_images", 3])
        self.assertEqual(len(vision.get_outputs()[0].shape), 2)
        (positions,) = [i for i in sessions["decoder_model_merged.onnx"].get_inputs() if i.name == "position_ids"]
        # qwen2_vl's generate passes the text positions first, then the 3 rotary rows.
        self.assertEqual(positions.shape, [4, "batch_size", "sequence_length"])

    def test_every_observed_call_replays_and_generation_matches(self):
        calls = self.result.validation.calls
        self.assertEqual({c.graph for c in calls}, set(FILES))
        self.assertEqual(sum(c.graph == "vision_encoder.onnx" for c in calls), 2)
        self.assertTrue(all(c.ok for c in calls), self.result.validation.table())
        (generation,) = self.result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)
        self.assertIn("qwen2_vl_vision_positions_from_grid", self.result.patches)

    def test_processor_batch_generates_torchs_greedy_tokens(self):
        inputs = batch(self.tokenizer, self.image_processor, random_images(((40, 30), (24, 50))), list(PROMPTS))
        lengths = inputs["attention_mask"].sum(-1).tolist()
        self.assertNotEqual(lengths[0], lengths[1])
        # Two image sizes, so two grids and two token counts.
        self.assertNotEqual(*inputs["image_grid_thw"].prod(-1).tolist())
        got, expected = self.generate_both(inputs)
        self.assertEqual(got, expected)

    def test_two_images_in_one_prompt_generate_torchs_greedy_tokens(self):
        prompts = [f"{IMAGE}{IMAGE}Compare these two.", PROMPTS[1]]
        inputs = batch(self.tokenizer, self.image_processor, random_images(((30, 30), (24, 40), (50, 24))), prompts)
        self.assertEqual(len(inputs["image_grid_thw"]), 3)
        got, expected = self.generate_both(inputs)
        self.assertEqual(got, expected)

    def test_runtime_asks_for_the_grid(self):
        inputs = batch(self.tokenizer, self.image_processor, random_images(((24, 24),)), [PROMPTS[0]])
        with self.assertRaisesRegex(ValueError, r"takes 'image_grid_thw' beside pixel_values and none was given: pass everything the model's processor returns"):
            self.onnx_model.generate(
                input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=2
            )


class TestRopeIndex(unittest.TestCase):
    @parameterized.expand(["qwen2_vl", "glm4v"])
    def test_runtime_positions_are_the_models_on_a_left_padded_batch(self, model_type):
        tokenizer = tiny_tokenizer()
        model = tiny_model(model_type, tokenizer)
        prompts = [f"Look {IMAGE} and {IMAGE}!", f"{IMAGE}Once upon a time, the capital of France was"]
        inputs = batch(tokenizer, tiny_image_processor(model_type), random_images(((30, 30), (24, 40), (50, 24))), prompts)
        expected, deltas = model.model.get_rope_index(
            inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"]
        )
        got, got_deltas = _rope_index(
            inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), inputs["image_grid_thw"].numpy(), model.config
        )
        np.testing.assert_array_equal(got, expected.numpy())
        np.testing.assert_array_equal(got_deltas, deltas.numpy())


class _GridVision(torch.nn.Module):
    """The vision part with its grid as a named parameter (the part takes it as **vision_inputs)."""

    def __init__(self, part: torch.nn.Module):
        super().__init__()
        self.part = part

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        return self.part(pixel_values=pixel_values, image_grid_thw=image_grid_thw).image_features


def check_grid_patches(test: unittest.TestCase, model_type: str) -> None:
    """The vision tower of `model_type` fails at torch.export without each of its grid patches
    and exports with them to a program giving the model's own features on other images."""
    model = tiny_model(model_type, tiny_tokenizer())
    part = _GridVision(vision_language.VisionEncoder(model))
    grids = torch.tensor([[1, 4, 4], [1, 4, 6]])
    example = {"pixel_values": torch.randn(40, 3 * TEMPORAL * PATCH**2), "image_grid_thw": grids}
    dims = {"pixel_values": {0: torch.export.Dim.DYNAMIC}, "image_grid_thw": {0: torch.export.Dim.DYNAMIC}}
    # The tower's forward and what it calls differently (its attention takes the forward's chunk
    # mask instead of cu_seqlens; glm4v's position embeddings each patch's image size): one fix in
    # several targets; then the features in one tensor.
    selected = [p for p in patches.PATCHES if p.name.startswith(f"{model_type}_")]
    test.assertEqual(selected[-1].name, f"{model_type}_image_features_in_one_tensor")
    # Without either fix, torch.export reads a tensor's value or fixes the number of images.
    for left_out in (selected[:-1], selected[-1:]):
        with patches.applied([p for p in selected if p not in left_out]):
            with test.assertRaisesRegex(Exception, "data-dependent|specialized it to be a constant", msg=left_out):
                torch.export.export(part, (), example, dynamic_shapes=dims)
    with patches.applied(selected):
        program = torch.export.export(part, (), example, dynamic_shapes=dims)
    # Three images of other sizes (several windows; one of two frames, except for glm4v(_moe), whose
    # own tower indexes its images' sizes by frame and fails on that): the model's features.
    grids = torch.tensor([[1, 2, 2], [1, 8, 6], [1 if model_type.startswith("glm4v") else 2, 4, 8]])
    other = {"pixel_values": torch.randn(int(grids.prod(-1).sum()), 3 * TEMPORAL * PATCH**2), "image_grid_thw": grids}
    with torch.no_grad():
        expected = part(**other)
        got = program.module()(**other)
    torch.testing.assert_close(got, expected)


class TestGridVisionPatches(unittest.TestCase):
    def test_the_qwen2_vl_vision_tower_exports_only_with_its_grid_patches(self):
        check_grid_patches(self, "qwen2_vl")


@pytest.mark.slow
class TestOtherGridTypes(unittest.TestCase):
    """The same default run and validation (every observed call replayed, 8 greedy tokens through
    ORTModelForImageTextToText on batch 2 with different prompt lengths), then a batch of the
    image processor with two image sizes and one with two images in a prompt, for the other types
    of the grid layout; about 45 s each (`python -m pytest -m slow tests/test_vision_language_grid.py`)."""

    @parameterized.expand(["qwen2_5_vl", "glm4v", "glm4v_moe"])
    def test_exports_and_generates_torchs_greedy_tokens(self, model_type):
        tokenizer, image_processor = tiny_tokenizer(), tiny_image_processor(model_type)
        model = tiny_model(model_type, tokenizer)
        settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with tempfile.TemporaryDirectory() as tmp:
            result = optimum_observer.export(
                model, Path(tmp) / "out", task="image-text-to-text", runtime_class=ORTModelForImageTextToText
            )
            self.assertTrue(result.validation.ok, result.validation.table())
            (generation,) = result.validation.generation
            self.assertEqual(generation.onnx_tokens, generation.torch_tokens)
            onnx_model = ORTModelForImageTextToText.from_pretrained(Path(tmp) / "out")
            for sizes, prompts in (
                (((40, 30), (24, 50)), list(PROMPTS)),
                (((30, 30), (24, 40), (50, 24)), [f"{IMAGE}{IMAGE}Compare these two.", PROMPTS[1]]),
            ):
                inputs = batch(tokenizer, image_processor, random_images(sizes), prompts)
                with torch.no_grad():
                    expected = model.generate(**inputs, **settings)
                self.assertEqual(onnx_model.generate(**inputs, **settings).tolist(), expected.tolist())

    @parameterized.expand(["qwen2_5_vl", "glm4v", "glm4v_moe"])
    def test_the_vision_tower_exports_only_with_its_grid_patches(self, model_type):
        check_grid_patches(self, model_type)

    def test_glm4v_moe_experts_export_only_densely(self):
        model = tiny_model("glm4v_moe", tiny_tokenizer())
        block = model.model.language_model.layers[1].mlp
        tokens = torch.randn(2, 5, 64)
        dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
        with self.assertRaisesRegex(Exception, "data-dependent"):
            torch.export.export(block, (tokens,), dynamic_shapes=dims)
        (dense,) = [p for p in patches.PATCHES if p.name == "dense_glm4v_moe_expert_mixture"]
        with patches.applied([dense]):
            program = torch.export.export(block, (tokens,), dynamic_shapes=dims)
        other = torch.randn(3, 7, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(other), block(other))
