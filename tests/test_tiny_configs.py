"""The tiny-config factory: any model type of the causal-LM mapping, small, consistent, runnable."""

from __future__ import annotations

import unittest

import torch
import transformers
from parameterized import parameterized

from optimum_observer import tiny_configs

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
    def test_sizes_the_unchanged_runtime_can_feed(self, model_type):
        config = tiny_configs.tiny_config(model_type, "AutoModelForCausalLM").get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        if heads is None:  # state-space models have no attention heads
            return
        self.assertEqual(heads, tiny_configs.HEADS)
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
        config = tiny_configs.tiny_config("llama", "AutoModelForCausalLM", num_key_value_heads=2)
        self.assertEqual(config.num_key_value_heads, 2)

    def test_every_override_names_a_known_type(self):
        for model_type in tiny_configs.OVERRIDES:
            self.assertIn(model_type, transformers.CONFIG_MAPPING)

    def test_backbone_stages_follow_the_cut_depths(self):
        # swin's 4 stages are cut to 2; its default output stage "stage4" would then not exist
        # ("out_features must be a subset of stage_names").
        config = tiny_configs.tiny_config("swin", "AutoModel")
        self.assertEqual(len(config.depths), tiny_configs.LAYERS)
        self.assertEqual(config.out_features, [config.stage_names[-1]])

    def test_encoder_decoder_configs_can_start_generating(self):
        config = tiny_configs.tiny_config("t5", "AutoModelForSeq2SeqLM")
        self.assertIsNotNone(config.decoder_start_token_id)
        self.assertEqual(config.d_kv * config.num_heads, config.d_model)
