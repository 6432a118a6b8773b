"""Bad input: a clear error naming the model type, the stage and what to try; no output left."""

from __future__ import annotations

import torch
import transformers
from transformers import DynamicCache

import optimum_observer
from failure_case import ExportFailureCase
from optimum_observer import ObserverExportError, Stage
from tiny_models import save_causal_lm


class DataDependentLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward branches on tensor values, which torch.export rejects."""

    def forward(self, input_ids=None, **kwargs):
        outputs = super().forward(input_ids=input_ids, **kwargs)
        if outputs.logits.sum() > 0:
            outputs.logits = outputs.logits * 2
        return outputs


class TestBadInput(ExportFailureCase):
    def test_path_that_does_not_exist(self):
        missing = str(self.scratch / "no-such-model")
        error = self.export_error(missing, local_files_only=True)
        self.assertFailsCleanly(error, missing, Stage.LOAD)
        self.assertIn("no such local directory", str(error))

    def test_model_type_without_a_causal_lm_head(self):
        source = self.scratch / "distilbert"
        transformers.DistilBertModel(
            transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2)
        ).save_pretrained(source)
        error = self.export_error(source)
        self.assertFailsCleanly(error, "distilbert", Stage.LOAD)
        self.assertIn("no AutoModelForCausalLM head", str(error))

    def test_run_that_never_calls_the_model(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)
        error = self.export_error(source, run=lambda model: None)
        self.assertFailsCleanly(error, "llama", Stage.CAPTURE)
        self.assertIn("never called", str(error))

    def test_calls_whose_structures_cannot_be_reconciled(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)

        def run(model):
            ids = torch.randint(3, 100, (2, 4))
            for layers in (1, 2):
                cache = DynamicCache()
                for layer in range(layers):
                    size = (2, model.config.num_key_value_heads, 3, model.config.head_dim)
                    cache.update(torch.randn(size), torch.randn(size), layer)
                mask = torch.ones(2, 7, dtype=torch.long)
                model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)

        error = self.export_error(source, run=run)
        self.assertFailsCleanly(error, "llama", Stage.SYNTHESIS)
        self.assertIn("cannot be reconciled", str(error))

    def test_export_that_torch_export_rejects(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)
        model = DataDependentLlama.from_pretrained(source)
        error = self.export_error(model)
        self.assertFailsCleanly(error, "llama", Stage.TORCH_EXPORT)
        self.assertIsNotNone(error.__cause__)

    def test_a_failed_export_leaves_an_existing_output_untouched(self):
        self.output.mkdir()
        (self.output / "keep.txt").write_text("mine")
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)
        with self.assertRaises(ObserverExportError):
            optimum_observer.export(source, self.output, run=lambda model: None)
        self.assertEqual([p.name for p in self.output.iterdir()], ["keep.txt"])

    def test_run_that_never_returns_the_cache_the_task_needs(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)

        def run(model):
            for length in (4, 6):
                ids = torch.randint(3, 100, (2, length))
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

        error = self.export_error(source, run=run)
        # Refused before the export: no call read a cache, so the graph would have no past inputs.
        self.assertFailsCleanly(error, "llama", Stage.SYNTHESIS)
        self.assertIn("the run made 0, so the graph would have no past inputs", str(error))
