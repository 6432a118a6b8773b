"""The tiny-config factory: any model type of the causal-LM mapping, small, consistent, runnable."""

from __future__ import annotations

import functools
import json
import unittest
from pathlib import Path

import torch
import transformers
from parameterized import parameterized

from legacy_shim.tooling import tiny_configs, tiny_processors
from optimum_observer import vision_language

#: A sample per family: dense decoders, MoE, multi-head latent attention, encoders used as
#: decoders, decoders of encoder-decoder models, state-space / hybrid, composite configs whose
#: causal-LM head takes the text part, and types with a per-type override.
SAMPLE = [
    "llama", "gpt2", "gpt_neox", "phi3", "gemma2",
    "mixtral", "qwen2_moe", "deepseek_v3",
    "bert", "roberta",
    "bart", "marian",
    "mamba", "jamba", "falcon_h1",
    "gemma3", "llama4", "mllama",
    "gpt_neo", "reformer", "granitemoehybrid",
]  # fmt: skip

MAX_PARAMETERS = 3_000_000


def _text_config(model: torch.nn.Module) -> transformers.PretrainedConfig:
    return model.config.get_text_config()


class TestTinyModels(unittest.TestCase):
    @parameterized.expand([(t,) for t in SAMPLE])
    def test_model_is_tiny_and_runs(self, model_type):
        model = tiny_configs.build_tiny_model(model_type, "AutoModelForCausalLM").eval()

        self.assertLess(sum(p.numel() for p in model.parameters()), MAX_PARAMETERS)
        vocab = _text_config(model).vocab_size
        self.assertEqual(vocab, tiny_configs.VOCAB)
        input_ids = torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        self.assertEqual(logits.shape[:2], (2, 5))
        self.assertTrue(torch.isfinite(logits).all())

    @parameterized.expand([(t,) for t in SAMPLE])
    def test_real_checkpoint_shapes_where_the_config_has_them(self, model_type):
        config = tiny_configs.tiny_config(model_type, "AutoModelForCausalLM").get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        if heads is None:  # state-space models have no attention heads
            return
        self.assertEqual(heads, tiny_configs.HEADS)
        keys = config.to_dict()
        if "qk_rope_head_dim" in keys:  # MLA: keys and values of different sizes, no key/value groups
            self.assertNotEqual(config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim)
            self.assertEqual(config.num_key_value_heads, heads)
            return
        if keys.get("num_key_value_heads") is not None:
            self.assertEqual(config.num_key_value_heads, tiny_configs.KV_HEADS)
        if keys.get("head_dim") is not None:
            self.assertEqual(config.head_dim, tiny_configs.REAL_HEAD_DIM)
            self.assertNotEqual(config.head_dim, config.hidden_size // heads)

    @parameterized.expand([(t,) for t in SAMPLE])
    def test_mha_shapes_on_request(self, model_type):
        config = tiny_configs.tiny_config(model_type, "AutoModelForCausalLM", shapes="mha").get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        if heads is None:
            return
        self.assertIn(getattr(config, "num_key_value_heads", heads), (heads, None))
        self.assertIn(getattr(config, "head_dim", None), (tiny_configs.HEAD_DIM, None))
        self.assertEqual(config.hidden_size // heads, tiny_configs.HEAD_DIM)

    @parameterized.expand([(t,) for t in SAMPLE])
    def test_special_tokens_fit_the_vocabulary(self, model_type):
        config = tiny_configs.tiny_config(model_type, "AutoModelForCausalLM").get_text_config()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(config, name, None)
            for token in ids if isinstance(ids, list) else [ids]:
                if token is not None:
                    self.assertLess(token, config.vocab_size, name)


class TestShrinkRules(unittest.TestCase):
    def test_per_layer_lists_follow_the_layer_count(self):
        config = tiny_configs.tiny_config("qwen3_next", "AutoModelForCausalLM")
        self.assertEqual(config.num_hidden_layers, tiny_configs.LAYERS)
        self.assertEqual(len(config.layer_types), tiny_configs.LAYERS)

    def test_settings_by_layer_index_follow_the_kept_layers_and_keep_their_ratio(self):
        # transformers 5's `per_layer_config` (gemma4: every sixth layer is full attention with
        # twice the head_dim), written by to_dict() with zero-padded string keys. Its indices
        # must follow the layers kept, or the config refuses them ("keys must be integer layer
        # indices in the range [0, 2)").
        kinds = ["sliding_attention"] * 5 + ["full_attention"]
        config = {"num_hidden_layers": 12, "head_dim": 256, "layer_types": kinds * 2,
                  "per_layer_config": {"05": {"head_dim": 512}, "11": {"head_dim": 512}}}  # fmt: skip
        shrunk = tiny_configs._shrink(config)
        self.assertEqual(shrunk["layer_types"], ["sliding_attention", "full_attention"])
        self.assertEqual(shrunk["per_layer_config"], {1: {"head_dim": 2 * shrunk["head_dim"]}})

    def test_nested_configs_shrink(self):
        config = tiny_configs.tiny_config("gemma3", "AutoModelForCausalLM")
        self.assertEqual(config.text_config.hidden_size, tiny_configs.HIDDEN)
        self.assertEqual(config.vision_config.num_hidden_layers, tiny_configs.LAYERS)

    def test_head_class_config_is_used(self):
        # llama4's causal-LM head takes the text config, not the composite one.
        config = tiny_configs.tiny_config("llama4", "AutoModelForCausalLM")
        self.assertIsInstance(config, transformers.Llama4TextConfig)

    def test_encoders_are_built_as_decoders(self):
        self.assertTrue(tiny_configs.tiny_config("bert", "AutoModelForCausalLM").is_decoder)

    def test_caller_overrides_win(self):
        config = tiny_configs.tiny_config("llama", "AutoModelForCausalLM", num_key_value_heads=1)
        self.assertEqual(config.num_key_value_heads, 1)

    def test_every_override_names_a_known_type(self):
        # A type only transformers 5 has is listed as such (and known there).
        newer = tiny_configs.TRANSFORMERS_5_TYPES if transformers.__version__.startswith("4.") else frozenset()
        for model_type in tiny_configs.OVERRIDES:
            if model_type not in newer:
                self.assertIn(model_type, transformers.CONFIG_MAPPING)
        for model_type in newer:
            self.assertNotIn(model_type, transformers.CONFIG_MAPPING)

    def test_backbone_stages_follow_the_cut_depths(self):
        # swin's 4 stages are cut to 2; its default output stage "stage4" would then not exist
        # ("out_features must be a subset of stage_names").
        config = tiny_configs.tiny_config("swin", "AutoModel")
        self.assertEqual(len(config.depths), tiny_configs.LAYERS)
        self.assertEqual(config.out_features, [config.stage_names[-1]])

    def test_encoder_decoder_configs_can_start_generating(self):
        config = tiny_configs.tiny_config("t5", "AutoModelForSeq2SeqLM")
        self.assertIsNotNone(config.decoder_start_token_id)
        # mt5 / umt5 checkpoints: d_kv 64 with d_model 512 and 6 heads.
        self.assertEqual(config.d_kv, tiny_configs.REAL_HEAD_DIM)
        self.assertNotEqual(config.d_kv * config.num_heads, config.d_model)

    def test_decoder_sequence_classifiers_take_padded_batches(self):
        model = tiny_configs.build_tiny_model("gpt2", "AutoModelForSequenceClassification").eval()
        ids = torch.tensor([[5, 6, 7], [5, 6, model.config.pad_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])).logits
        self.assertEqual(tuple(logits.shape), (2, model.config.num_labels))
        self.assertIsNone(tiny_configs.tiny_config("gpt2", "AutoModelForCausalLM").pad_token_id)

    def test_every_layer_kind_is_kept(self):
        # gemma3: five sliding-window layers, then one full-attention layer, repeated.
        config = tiny_configs.tiny_config("gemma3", "AutoModelForCausalLM").get_text_config()
        self.assertEqual(sorted(set(config.layer_types)), ["full_attention", "sliding_attention"])
        mha = tiny_configs.tiny_config("gemma3", "AutoModelForCausalLM", shapes="mha").get_text_config()
        self.assertEqual(mha.layer_types, ["sliding_attention", "sliding_attention"])

    def test_composites_get_the_parts_their_defaults_lack(self):
        # EncoderDecoderConfig() refuses to build without an encoder and a decoder.
        config = tiny_configs.tiny_config("encoder-decoder", "AutoModelForSeq2SeqLM")
        self.assertEqual((config.encoder.model_type, config.encoder.hidden_size), ("bert", tiny_configs.HIDDEN))
        self.assertTrue(config.decoder.is_decoder and config.decoder.add_cross_attention)

    def test_head_sizes_a_type_derives_stay_derived(self):
        config = tiny_configs.tiny_config("xlnet", "AutoModelForCausalLM")
        self.assertEqual(config.d_head, config.d_model // config.n_head)

    def test_unknown_shapes_are_refused(self):
        with self.assertRaisesRegex(ValueError, "shapes must be one of"):
            tiny_configs.tiny_config("llama", "AutoModelForCausalLM", shapes="gqa")


VISION_HEAD = "AutoModelForImageTextToText"
#: The coverage sweep's image-text-to-text rows: what the tests below hold the tiny models to.
VISION_TABLE = Path(__file__).resolve().parents[1] / "docs" / "coverage-data" / "coverage-image-text-to-text.json"
#: Sweep stages reached only after the model ran its own generate with an image.
_RAN_WITH_AN_IMAGE = ("torch.export", "ONNX conversion", "numerical parity", "generation parity")


def _swept_rows() -> dict[str, dict]:
    return {t: r["observer"] for t, r in json.loads(VISION_TABLE.read_text())["results"].items()}


@functools.lru_cache(maxsize=None)
def _tiny_vision_model(model_type: str) -> torch.nn.Module:
    return tiny_configs.build_tiny_model(model_type, VISION_HEAD).eval()


class TestTinyVisionLanguageModels(unittest.TestCase):
    """Every type of the image-text-to-text mapping, held to what the sweep's table says of it."""

    @classmethod
    def setUpClass(cls):
        cls.rows = _swept_rows()

    def test_the_table_has_every_type_of_the_mapping(self):
        mapping = transformers.AutoModelForImageTextToText._model_mapping._model_mapping
        self.assertEqual(sorted(self.rows), sorted(mapping))

    @parameterized.expand([(t,) for t in sorted(transformers.AutoModelForImageTextToText._model_mapping._model_mapping)])
    def test_builds_tiny_where_the_sweep_says_it_builds(self, model_type):
        row = self.rows[model_type]
        if row["stage"] == "config build":
            with self.assertRaises(Exception) as caught:
                _tiny_vision_model(model_type)
            self.assertIn(type(caught.exception).__name__, row["error"])
            return
        model = _tiny_vision_model(model_type)
        self.assertLess(sum(p.numel() for p in model.parameters()), MAX_PARAMETERS)
        if model_type in tiny_configs.VISION_OVERRIDES:  # florence2 sets its own per-stage patch sizes
            return
        vision = getattr(model.config, "vision_config", None)
        for key in ("image_size", "patch_size"):
            size = getattr(vision, key, None)
            if size is not None:
                expected = tiny_configs.VISION_SIZES[key]
                self.assertIn(size, (expected, [expected] * 2), key)

    def test_a_forward_with_an_image_runs_where_the_sweep_ran_the_model(self):
        ran = sorted(t for t, r in self.rows.items() if r["status"] == "pass" or r["stage"] in _RAN_WITH_AN_IMAGE)
        self.assertIn("llava", ran)
        for model_type in ran:
            with self.subTest(model_type):
                model = _tiny_vision_model(model_type)
                # Through its tiny processor where the type has one (images that need their sizes).
                processor = tiny_configs.tiny_feature_extractor(model_type, model.config, model)
                batch = vision_language.reference_batches(model, 0, processor)[0]
                with torch.no_grad():
                    logits = model(**batch).logits
                self.assertEqual(tuple(logits.shape[:2]), tuple(batch["input_ids"].shape))
                self.assertTrue(torch.isfinite(logits).all())

    def test_text_models_have_real_checkpoint_shapes(self):
        for model_type in ("llava", "gemma3", "internvl", "paligemma", "qwen2_vl"):
            with self.subTest(model_type):
                text = tiny_configs.tiny_config(model_type, VISION_HEAD).get_text_config()
                self.assertEqual((text.num_attention_heads, text.num_key_value_heads), (tiny_configs.HEADS, tiny_configs.KV_HEADS))
                if getattr(text, "head_dim", None) is not None:
                    self.assertEqual(text.head_dim, tiny_configs.REAL_HEAD_DIM)

    def test_image_tokens_fit_the_text_vocabulary_and_take_no_special_id_of_it(self):
        config = tiny_configs.tiny_config("gemma3", VISION_HEAD)
        text = config.get_text_config()
        image_ids = {config.image_token_id, config.boi_token_index, config.eoi_token_index}
        self.assertEqual(len(image_ids), 3)
        self.assertTrue(all(0 <= token < text.vocab_size for token in image_ids))
        self.assertFalse(image_ids & {text.bos_token_id, text.eos_token_id, text.pad_token_id})

    def test_image_token_counts_follow_the_tiny_tower(self):
        # gemma3 pools its patches to mm_tokens_per_image: 4 x 4 patches to 2 x 2 tokens.
        model = _tiny_vision_model("gemma3")
        # One image of the model's layout through the vision part: its placeholder count.
        self.assertEqual(vision_language.tokens_per_image(model), [model.config.mm_tokens_per_image])
        self.assertEqual(
            vision_language.tokens_per_image(_tiny_vision_model("llava")), [tiny_configs.VISION_SIZES["image_seq_length"]]
        )

    def test_other_heads_keep_their_vision_sizes(self):
        # The other tasks' tables were measured with the vision models' own image sizes.
        self.assertEqual(tiny_configs.tiny_config("clip", "AutoModel").vision_config.image_size, 224)
        self.assertEqual(tiny_configs.tiny_config("gemma3", "AutoModelForCausalLM").vision_config.image_size, 224)


#: The image-text-to-text types the sweep gives a processor built locally (their images need it).
PROCESSOR_TYPES = ("deepseek_vl_hybrid", "llava_next", "llava_next_video", "mistral3")


class TestTinyProcessors(unittest.TestCase):
    """The processors of the types whose images need theirs, built from the tiny config alone."""

    @classmethod
    def setUpClass(cls):
        cls.rows = _swept_rows()

    def test_types_whose_images_need_their_processor_get_one_by_its_class(self):
        mapping = transformers.AutoModelForImageTextToText._model_mapping._model_mapping
        built = [t for t in mapping if self.rows[t]["stage"] != "config build"]
        needing = [t for t in built if tiny_processors.needs_processor(_tiny_vision_model(t))]
        with_one = [t for t in needing if tiny_configs.tiny_feature_extractor(t, _tiny_vision_model(t).config, _tiny_vision_model(t))]
        self.assertEqual(sorted(with_one), sorted(PROCESSOR_TYPES))
        # Not built here: lfm2_vl's image processor exists only as a fast one, and llava_onevision's
        # processor requires a video processor, both torchvision (not installed); emu3 not tried.
        self.assertEqual(sorted(set(needing) - set(with_one)), ["emu3", "lfm2_vl", "llava_onevision"])
        # The `pixtral` type's llava (a CLIP tower by default) maps to PixtralProcessor too, but
        # its images are built by the default run: it gets none.
        self.assertIsNotNone(tiny_processors.processor_class("pixtral"))
        self.assertFalse(tiny_processors.needs_processor(_tiny_vision_model("pixtral")))
        # Without the model (other tasks' heads), no processor.
        self.assertIsNone(tiny_configs.tiny_feature_extractor("llava_next", _tiny_vision_model("llava_next").config))

    @parameterized.expand([(t,) for t in PROCESSOR_TYPES])
    def test_the_processors_tokens_sit_at_the_configs_ids_and_its_batches_run_the_model(self, model_type):
        model = _tiny_vision_model(model_type)
        processor = tiny_configs.tiny_feature_extractor(model_type, model.config, model)
        tokenizer = processor.tokenizer
        self.assertEqual(tokenizer.convert_tokens_to_ids(processor.image_token), model.config.image_token_id)
        self.assertLessEqual(len(tokenizer), model.config.get_text_config().vocab_size)
        self.assertEqual(tokenizer.padding_side, "left")
        batches = vision_language.processor_batches(model, processor)
        for batch in batches:
            with torch.no_grad():
                logits = model(**batch).logits
            self.assertEqual(tuple(logits.shape[:2]), tuple(batch["input_ids"].shape))
        # The image placeholders the processor wrote: more for the larger image of the first batch
        # where the token count grows with the image (tiles, patches), never none.
        counts = (batches[0]["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        self.assertTrue(all(counts), counts)

    def test_a_token_the_config_places_inside_the_trained_vocabulary_keeps_its_id(self):
        # mistral3's [IMG] is 10, as in Mistral's tokenizer: a special token of the trainer.
        tokenizer = tiny_processors.tiny_tokenizer({"[IMG]": 10, "[IMG_END]": None, "<image>": 255})
        self.assertEqual(tokenizer.convert_tokens_to_ids(["[IMG]", "<image>"]), [10, 255])
        # [IMG_END], which the config gives no id, takes the first reserved slot above the trained ones.
        self.assertEqual(len(tokenizer), 256)
        self.assertLess(tokenizer.convert_tokens_to_ids("[IMG_END]"), 255)
        with self.assertRaisesRegex(ValueError, "would take the ids of"):
            tiny_processors.tiny_tokenizer({"<image>": 0})

    def test_tile_grids_are_in_tiles_of_the_tiny_tower(self):
        config = tiny_configs.tiny_config("llava_next", VISION_HEAD)
        # llava-v1.6: 336 px tiles, grids of 1 x 2 up to 3 x 1.
        self.assertEqual(config.image_grid_pinpoints[:3], [[32, 64], [64, 32], [64, 64]])
        self.assertTrue(all(side % tiny_configs.IMAGE == 0 for p in config.image_grid_pinpoints for side in p))
