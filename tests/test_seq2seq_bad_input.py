"""Bad input for the encoder-decoder and speech tasks: a clear error naming the model type, the
stage and what to try; no finished-looking output; every registration and patch restored."""

from __future__ import annotations


import torch
import transformers

from optimum_observer import Stage
from optimum_observer.reference_inputs import synthetic_waveforms
from failure_case import ExportFailureCase
from tiny_families import save_seq2seq_lm, save_whisper, whisper_feature_extractor
from tiny_models import save_causal_lm

TEXT2TEXT = "text2text-generation-with-past"
SPEECH = "automatic-speech-recognition-with-past"


class TestSeq2SeqBadInput(ExportFailureCase):
    export_kwargs = {"validate": False}

    def test_encoder_decoder_checkpoint_for_a_decoder_only_task(self):
        error = self.export_error(save_seq2seq_lm("t5", self.scratch / "t5", with_tokenizer=False))
        self.assertFailsCleanly(error, "t5", Stage.LOAD)
        self.assertIn("AutoModelForCausalLM", str(error))

    def test_encoder_decoder_model_object_for_a_decoder_only_task(self):
        source = save_seq2seq_lm("bart", self.scratch / "bart", with_tokenizer=False)
        model = transformers.BartForConditionalGeneration.from_pretrained(source)
        error = self.export_error(model, task="text-generation-with-past")
        self.assertFailsCleanly(error, "bart", Stage.LOAD)
        self.assertIn("an encoder-decoder model cannot be exported", str(error))
        self.assertIn(TEXT2TEXT, error.remedy)

    def test_decoder_only_checkpoint_for_an_encoder_decoder_task(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)
        error = self.export_error(source, task=TEXT2TEXT)
        self.assertFailsCleanly(error, "llama", Stage.LOAD)
        self.assertIn("AutoModelForSeq2SeqLM", str(error))

    def test_decoder_only_model_object_for_an_encoder_decoder_task(self):
        source = save_causal_lm("llama", self.scratch / "llama", with_tokenizer=False)
        error = self.export_error(transformers.AutoModelForCausalLM.from_pretrained(source), task=TEXT2TEXT)
        self.assertFailsCleanly(error, "llama", Stage.LOAD)
        self.assertIn("text-generation-with-past", error.remedy)

    def test_run_that_calls_only_the_encoder(self):
        source = save_seq2seq_lm("t5", self.scratch / "t5", with_tokenizer=False)

        def run(model):
            ids = torch.randint(3, 200, (2, 6))
            return model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))

        error = self.export_error(source, task=TEXT2TEXT, run=run)
        self.assertFailsCleanly(error, "t5", Stage.CAPTURE)
        self.assertIn("never called the model's forward", str(error))

    def test_run_that_never_reaches_a_decoding_step_with_past(self):
        source = save_seq2seq_lm("t5", self.scratch / "t5", with_tokenizer=False)

        def run(model):
            ids = torch.randint(3, 200, (2, 6))
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1)

        error = self.export_error(source, task=TEXT2TEXT, run=run)
        self.assertFailsCleanly(error, "t5", Stage.CAPTURE)
        self.assertIn("decoder_with_past_model.onnx", str(error))
        self.assertIn("model.generate", error.remedy)

    def test_audio_at_the_wrong_sampling_rate(self):
        source = save_whisper(self.scratch / "whisper")
        feature_extractor = whisper_feature_extractor()

        def run(model):
            audio = synthetic_waveforms(8000, (1.0, 1.5))
            features = feature_extractor(audio, sampling_rate=8000, return_tensors="pt").input_features
            return model.generate(input_features=features, max_new_tokens=3)

        error = self.export_error(source, task=SPEECH, run=run)
        self.assertFailsCleanly(error, "whisper", Stage.CAPTURE)
        self.assertIn("sampling rate", str(error))
        self.assertIn("sampling_rate", error.remedy)

    def test_features_of_the_wrong_shape(self):
        source = save_whisper(self.scratch / "whisper")
        # 40 mel bins for an encoder built for 80.
        error = self.export_error(source, task=SPEECH, feature_extractor=whisper_feature_extractor(feature_size=40))
        self.assertFailsCleanly(error, "whisper", Stage.CAPTURE)
        self.assertIn("feature extractor", error.remedy)
