"""Vision-language models whose outer model builds the decoder's mask: gemma3, paligemma.

gemma3's `Gemma3Model` turns the 2-D padding mask into one mask per attention kind (full and
sliding), in which the tokens of one image attend to each other both ways (`token_type_ids` 1 at
image tokens); paligemma's turns it into a 4-D prefix-LM mask (the whole prompt both ways). The
decoder graph takes the runtime's 2-D `attention_mask` (and `token_type_ids`) and builds that mask
inside with the model's own hook (`vision_language.DECODER_MASK_HOOKS`).

The gemma3 model has real-checkpoint shapes at tiny sizes: a SigLIP vision tower (32 px images,
8 px patches, pooled to 4 tokens per image), a gemma3 text model with grouped-query attention (4
query heads, 2 key/value heads, explicit head_dim 32) and a sliding (window 16) and a full attention
layer; the processor's prompts and their new tokens run past the window.
Its processor is built locally (Gemma3ImageProcessor, a BPE tokenizer trained on the fly with the
image tokens, Gemma3Processor, which returns token_type_ids). One export through
`legacy_shim.main_export` (about 30 s on a loaded machine) is shared by the class.
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

import optimum_observer
from legacy_shim import Exporter, ORTModelForImageTextToText
from optimum_observer import vision_language
from shim_helpers import export_saved_vision_language, random_images
from tiny_models import build_tokenizer

NEW_TOKENS = 8
IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE = 32, 8, 4
PROMPTS = ("<start_of_image>Hello, my dog", "<start_of_image>The capital of France is Paris, and the capital of")
#: Above the default run's longest sequence (4 image + 7 text + 3 new tokens; docs/vision_language.md,
#: "Not done yet"), below the processor batches' prompts with their new tokens.
SLIDING_WINDOW = 16
SETTINGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def tiny_gemma3_processor() -> transformers.Gemma3Processor:
    trained = build_tokenizer()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        **trained.special_tokens_map,
        extra_special_tokens={
            "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"
        },
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    image_processor = transformers.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=TOKENS_PER_IMAGE
    )


def gemma3_towers(**text_settings) -> dict[str, dict]:
    """gemma3's tiny vision and text configs (a SigLIP tower; a text model with grouped-query
    attention, an explicit head_dim and both attention kinds); `text_settings`: the vocabulary
    and what else the caller's text config states."""
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        ),
        text_config=dict(
            model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            layer_types=["sliding_attention", "full_attention"], **text_settings,
        ),
    )  # fmt: skip


def tiny_gemma3(processor: transformers.Gemma3Processor) -> transformers.Gemma3ForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = transformers.Gemma3Config(
        **gemma3_towers(vocab_size=len(tokenizer) + 8, sliding_window=SLIDING_WINDOW, pad_token_id=tokenizer.pad_token_id),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.convert_tokens_to_ids(tokenizer.boi_token),
        eoi_token_index=tokenizer.convert_tokens_to_ids(tokenizer.eoi_token),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def images(count: int) -> list[np.ndarray]:
    return random_images(((30, 40), (24, 50), (50, 24))[:count])


class TestGemma3Export(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.processor = tiny_gemma3_processor()
        cls.model = tiny_gemma3(cls.processor)
        export_saved_vision_language(cls, "gemma3")
        cls.onnx_model = ORTModelForImageTextToText.from_pretrained(cls.output)

    def batch(self, prompts=PROMPTS, image_lists=None) -> transformers.BatchFeature:
        image_lists = image_lists or [[image] for image in images(len(prompts))]
        return self.processor(images=image_lists, text=list(prompts), padding=True, return_tensors="pt")

    def test_the_decoder_takes_the_2d_mask_and_token_types(self):
        self.assertEqual(self.route.route, Exporter.OBSERVER)
        session = self.onnx_model.decoder
        inputs = {i.name: i.shape for i in session.get_inputs()}
        self.assertEqual(
            list(inputs)[:4], ["inputs_embeds", "attention_mask", "position_ids", "token_type_ids"]
        )
        self.assertEqual(inputs["attention_mask"], ["batch_size", "past_sequence_length + sequence_length"])
        self.assertEqual(inputs["token_type_ids"], ["batch_size", "sequence_length"])

    def test_every_observed_call_replays_within_atol(self):
        calls = self.result.validation.calls
        self.assertEqual(sum(c.graph == "decoder_model_merged.onnx" for c in calls), 6)
        self.assertTrue(all(c.ok for c in calls), self.result.validation.table())
        self.assertTrue(self.result.validation.ok)

    def test_processor_batch_generates_torchs_greedy_tokens(self):
        batch = self.batch()
        self.assertIn("token_type_ids", batch)
        lengths = batch["attention_mask"].sum(-1).tolist()
        self.assertNotEqual(lengths[0], lengths[1])
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        got = self.onnx_model.generate(**batch, **SETTINGS)
        self.assertEqual(got.shape, (2, batch["input_ids"].shape[1] + NEW_TOKENS))
        self.assertEqual(got.tolist(), expected.tolist())

    def test_generation_past_the_sliding_window_gives_torchs_tokens(self):
        # transformers' cache keeps the last window of a sliding layer; the graph keeps every
        # position and its sliding mask leaves out the same ones.
        batch = self.batch((PROMPTS[1] + " Germany is Paris, and the capital of France is", PROMPTS[0]))
        self.assertGreater(batch["input_ids"].shape[1], SLIDING_WINDOW)
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        self.assertEqual(self.onnx_model.generate(**batch, **SETTINGS).tolist(), expected.tolist())

    def test_two_images_in_one_prompt_generate_torchs_greedy_tokens(self):
        prompts = ("<start_of_image><start_of_image>Compare these two.", PROMPTS[1])
        first, second, third = images(3)
        batch = self.batch(prompts, [[first, second], [third]])
        self.assertEqual(tuple(batch["pixel_values"].shape), (3, 3, IMAGE_SIZE, IMAGE_SIZE))
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        self.assertEqual(self.onnx_model.generate(**batch, **SETTINGS).tolist(), expected.tolist())

    def test_the_tokens_of_an_image_attend_to_each_other_in_the_graph(self):
        # The same prompt with and without its token types: the image block is bidirectional
        # only with them, and the graph's logits follow torch's in both cases.
        batch = self.batch()
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        embeds = self.onnx_model.merged_embeddings(ids, {"pixel_values": batch["pixel_values"].numpy()})
        past = self.onnx_model._empty_past(ids.shape[0])
        positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
        logits = {}
        cases = (("image blocks", batch["token_type_ids"]), ("causal", torch.zeros_like(batch["input_ids"])))
        for name, types in cases:
            feeds = dict(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, token_type_ids=types.numpy()
            )
            got = self.onnx_model.decoder.run(["logits"], {**feeds, **past})[0]
            with torch.no_grad():
                expected = self.model(
                    **{**batch, "token_type_ids": types}, position_ids=torch.from_numpy(positions)
                ).logits
            np.testing.assert_allclose(got[mask == 1], expected[mask == 1].numpy(), atol=1e-4)
            logits[name] = got
        image_tokens = ids == self.model.config.image_token_id
        self.assertGreater(np.abs(logits["image blocks"] - logits["causal"])[image_tokens].max(), 1e-3)

    def test_the_model_is_given_back_unrouted(self):
        self.assertIs(type(self.model.get_decoder()), transformers.Gemma3TextModel)
        self.assertIs(type(self.model.get_output_embeddings()), torch.nn.Linear)
        self.assertFalse(self.model.model._forward_pre_hooks)
        self.assertNotIn("get_image_features", vars(self.model.model))


class TestDecoderMaskHooks(unittest.TestCase):
    def test_each_model_builds_its_mask_with_its_own_hook(self):
        gemma3 = tiny_gemma3(tiny_gemma3_processor())
        self.assertEqual(vision_language.decoder_mask_hook(gemma3), ("outer", "create_masks_for_generate"))
        self.assertEqual(vision_language.decoder_mask_hook(tiny_paligemma()), ("inner", "_update_causal_mask"))

    def test_a_hook_the_model_only_inherits_is_not_its_mask(self):
        # mllama's base class defines _update_causal_mask for its text model; its inner model
        # hands the decoder the 2-D mask.
        self.assertTrue(hasattr(transformers.MllamaModel, "_update_causal_mask"))
        classes = (transformers.MllamaForConditionalGeneration, transformers.MllamaModel)
        self.assertIsNone(vision_language.class_mask_hook(*classes))
        classes = (transformers.PaliGemmaForConditionalGeneration, transformers.PaliGemmaModel)
        self.assertEqual(vision_language.class_mask_hook(*classes), ("inner", "_update_causal_mask"))

    def test_routing_is_undone_when_the_run_raises(self):
        model = tiny_gemma3(tiny_gemma3_processor())
        parts = {name: part(model) for name, part in vision_language.PARTS.items()}
        with self.assertRaises(RuntimeError):
            with vision_language.routed(model, parts):
                self.assertTrue(model.model._forward_pre_hooks)
                self.assertIs(model.get_decoder().part, parts["text_decoder"])
                raise RuntimeError("run failed")
        self.assertFalse(model.model._forward_pre_hooks)
        self.assertIs(type(model.get_decoder()), transformers.Gemma3TextModel)

    def test_the_reference_batches_carry_token_types_where_forward_takes_them(self):
        model = tiny_gemma3(tiny_gemma3_processor())
        batch = vision_language.reference_batches(model, 0)[0]
        image_tokens = batch["input_ids"] == model.config.image_token_id
        self.assertEqual(batch["token_type_ids"].tolist(), image_tokens.long().tolist())


def tiny_paligemma_processor() -> transformers.PaliGemmaProcessor:
    trained = build_tokenizer()
    # The processor takes a gemma tokenizer only.
    tokenizer = transformers.GemmaTokenizerFast(
        tokenizer_object=trained.backend_tokenizer,
        **trained.special_tokens_map,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    image_processor = transformers.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_paligemma(
    processor: transformers.PaliGemmaProcessor | None = None,
) -> transformers.PaliGemmaForConditionalGeneration:
    processor = processor or tiny_paligemma_processor()
    tokenizer = processor.tokenizer
    config = transformers.PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
        ),
        text_config=dict(
            model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=len(tokenizer) + 8, max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=processor.image_token_id,
        projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.mark.slow
class TestPaliGemmaExport(unittest.TestCase):
    """The default run and validation (every observed call replayed, 8 greedy tokens through
    ORTModelForImageTextToText on batch 2 with different prompt lengths, one image each), a
    PaliGemmaProcessor batch, and the prefix-LM mask inside the graph; about 30 s, so in the slow
    run."""

    @classmethod
    def setUpClass(cls):
        cls.processor = tiny_paligemma_processor()
        cls.model = tiny_paligemma(cls.processor)
        export_saved_vision_language(cls, "paligemma")

    def test_exports_and_generates_torchs_greedy_tokens(self):
        self.assertTrue(self.result.validation.ok, self.result.validation.table())
        (generation,) = self.result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)

    def test_processor_batch_generates_torchs_greedy_tokens(self):
        # The processor puts the image tokens and bos before each prompt and returns no token
        # types (only with a suffix, for training): the runtime feeds zeros, unused at inference.
        prompts = ["Hello, my dog", "The capital of France is Paris, and the capital of"]
        batch = self.processor(images=images(2), text=prompts, padding=True, return_tensors="pt")
        self.assertNotIn("token_type_ids", batch)
        self.assertNotEqual(*batch["attention_mask"].sum(-1).tolist())
        with torch.no_grad():
            expected = self.model.generate(**batch, **SETTINGS)
        got = ORTModelForImageTextToText.from_pretrained(self.output).generate(**batch, **SETTINGS)
        self.assertEqual(got.tolist(), expected.tolist())

    def test_the_prompt_attends_both_ways_in_the_graph(self):
        # Changing the last prompt token changes the logits of the first text token: the prompt
        # is a prefix seen both ways, in the graph as in torch. On the unpadded prompt, whose
        # positions torch's forward counts as the runtime does (paligemma's from 1, as the graph).
        batch = {k: v[1:] for k, v in vision_language.reference_batches(self.model, 0)[0].items()}
        onnx_model = ORTModelForImageTextToText.from_pretrained(self.output)
        session = onnx_model.decoder
        mask = batch["attention_mask"].numpy()
        self.assertTrue(mask.all())
        positions = np.cumsum(mask, -1) - 1
        first_text = vision_language.image_layout(self.model).tokens_per_image
        logits = []
        for last in (5, 6):
            ids = batch["input_ids"].clone()
            ids[:, -1] = last
            embeds = onnx_model.merged_embeddings(ids.numpy(), {"pixel_values": batch["pixel_values"].numpy()})
            feeds = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            if onnx_model.takes_token_type_ids:
                feeds["token_type_ids"] = np.zeros_like(ids.numpy())
            got = session.run(["logits"], {**feeds, **onnx_model._empty_past(ids.shape[0])})[0]
            with torch.no_grad():
                expected = self.model(**{**batch, "input_ids": ids}).logits
            np.testing.assert_allclose(got[mask == 1], expected[mask == 1].numpy(), atol=1e-4)
            logits.append(got[0, first_text])
        self.assertGreater(np.abs(logits[0] - logits[1]).max(), 1e-4)

@pytest.mark.slow
class TestShieldGemma2Export(unittest.TestCase):
    """shieldgemma2 is gemma3's classes under its own config type (AutoModelForImageTextToText
    builds a Gemma3ForConditionalGeneration): the default run and validation as for paligemma."""

    def test_exports_and_generates_torchs_greedy_tokens(self):
        config = transformers.ShieldGemma2Config(
            **gemma3_towers(vocab_size=300),
            mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=290, boi_token_index=291, eoi_token_index=292,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
        self.assertIsInstance(model, transformers.Gemma3ForConditionalGeneration)
        with tempfile.TemporaryDirectory() as tmp:
            result = optimum_observer.export(
                model, Path(tmp) / "out", task="image-text-to-text", runtime_class=ORTModelForImageTextToText
            )
        self.assertEqual(result.model_type, "shieldgemma2")
        self.assertTrue(result.validation.ok, result.validation.table())
        (generation,) = result.validation.generation
        self.assertEqual(len(set(generation.prompt_lengths)), 2)
        self.assertEqual(generation.onnx_tokens, generation.torch_tokens)
