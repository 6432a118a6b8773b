"""Task families: how each kind of task is run by default and checked through its runtime class.

Takes: a task contract (its :class:`~optimum_observer.tasks.Family`).
Gives: one :class:`TaskFamily` object per family (:func:`family_of`), which owns what differs
between decoder-only generation, encoder-decoder generation (text or speech) and encoders:

* :meth:`TaskFamily.reference_inputs`: the batches its runtime check feeds (and, for most
  families, the default run too);
* :meth:`TaskFamily.default_run`: how the model is run when the caller passes no `run`;
* :meth:`TaskFamily.check_runtime`: the checks validation runs through the runtime class
  (greedy generation, or every output), built from :mod:`optimum_observer.validation`;
* :meth:`TaskFamily.quality_reference` / :meth:`TaskFamily.check_quality`: how a quantized export
  is measured (perplexity against the fp32 file's, or the outputs' cosine to torch's);
* a few facts the stages ask about instead of branching on the family: the architecture it
  needs, whether it loads a feature extractor, whether one graph serves every step.

The stages look the family up once and call it; vision-language generation (issue 17) is the
fifth, :class:`VisionLanguageFamily`, whose run goes through the model's parts
(:meth:`TaskFamily.routed`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Any, ClassVar, ContextManager, NamedTuple

import torch

from . import greedy, optimization, reference_inputs, vision_language
from .errors import ObserverExportError, Stage
from .result import CosineCheck, GenerationCheck, QualityCheck, RuntimeCheck
from .tasks import Family, TaskContract
from .validation import (
    ValidationInputs,
    check_encoder_decoder_generation,
    check_generation,
    check_output_cosines,
    check_quality,
    check_runtime_outputs,
    perplexity,
)

Batch = dict[str, torch.Tensor]
#: new tokens per generate call of the default runs: at least 2 cached steps per batch.
DEFAULT_RUN_NEW_TOKENS = 3


class RuntimeChecks(NamedTuple):
    """The runtime class's checks of one export: greedy generation, or outputs (one is empty)."""

    generation: list[GenerationCheck]
    outputs: list[RuntimeCheck]


def _generate_greedily(model: Any, batch: Batch, **settings: Any) -> torch.Tensor:
    return greedy.generate(
        model,
        {k: v.to(model.device) for k, v in batch.items()},
        max_new_tokens=DEFAULT_RUN_NEW_TOKENS,
        min_new_tokens=DEFAULT_RUN_NEW_TOKENS,
        do_sample=False,
        **settings,
    )


class TaskFamily(abc.ABC):
    """What one family of tasks runs by default and checks through its runtime class."""

    family: ClassVar[Family]
    #: the default run in words, for the error of a run that fails.
    run_hint: ClassVar[str]
    #: the architecture it exports: True an encoder-decoder model, False a decoder-only one,
    #: None either (encoders).
    encoder_decoder: ClassVar[bool | None]
    #: its inputs are made by a feature extractor, loaded with the model when it has one.
    uses_feature_extractor: ClassVar[bool] = False
    #: the transformers auto class of that preprocessor (saved with the export).
    preprocessor_class: ClassVar[str] = "AutoFeatureExtractor"
    #: one graph serves the prompt and every later step (decoder-only): the run must show the
    #: sequence axis at two lengths. (Every graph fed a cache on all steps, this one or a
    #: vision-language decoder, needs at least two cached steps: capture.check_observed_sizes.)
    one_graph_for_every_step: ClassVar[bool] = False
    #: the quantize modes it offers and their settings (None: its exports are not quantized).
    quantization: ClassVar[optimization.Quantization | None] = None
    #: its runtime class takes every graph input from its caller, computing none (encoders): an
    #: input its forward takes no argument for cannot be fed.
    runtime_fed_by_caller: ClassVar[bool] = False

    @abc.abstractmethod
    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        """The batches the runtime check feeds the runtime class and torch."""

    @abc.abstractmethod
    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """The `run` used when the caller gives none: the model run the way its users run it."""

    def routed(self, model: Any, modules: dict[str, torch.nn.Module]) -> ContextManager[None]:
        """What makes the model's own run call the observed `modules` (by contract module name),
        for the capture's run; the observed modules of most families are the model's own."""
        return contextlib.nullcontext()

    def check_generation(self, inputs: ValidationInputs) -> list[GenerationCheck]:
        """Greedy generation through the runtime class against torch's; none for a family that
        does not generate."""
        return []

    def compare_outputs(self, inputs: ValidationInputs, batches: list[Batch] | None = None) -> list[RuntimeCheck]:
        """The runtime class's outputs against torch's on `batches` (default: the reference
        inputs); none where the runtime class's forward needs more than the reference inputs."""
        return []

    def check_runtime(self, inputs: ValidationInputs) -> RuntimeChecks:
        """What validation checks through the runtime class: greedy generation by default."""
        return RuntimeChecks(self.check_generation(inputs), [])

    def quality_reference(self, inputs: ValidationInputs) -> float | None:
        """What a quantized export is measured against, taken from the fp32 files before they are
        quantized (None: torch is the reference). Only families with a :attr:`quantization`
        are quantized."""
        raise NotImplementedError(f"{self.family.value} exports are not quantized")

    def check_quality(self, inputs: ValidationInputs, reference: float | None) -> QualityCheck | CosineCheck:
        """A quantized export through the runtime class, against `reference`."""
        raise NotImplementedError(f"{self.family.value} exports are not quantized")


class DecoderFamily(TaskFamily):
    family = Family.DECODER
    run_hint = (
        "model.generate on a batch of token ids (for a model without generate(), a greedy loop over "
        "forward feeding back its cache)"
    )
    encoder_decoder = False
    one_graph_for_every_step = True
    quantization = optimization.DECODER_QUANTIZATION

    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        return reference_inputs.generation_inputs(model, tokenizer)

    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """`generate` over prompts of different lengths with batch 2 then 3, left padded; without a
        cache (a task without past), every step recomputes the whole prefix, as the runtime then does.
        A model without `generate` runs the greedy loop over forward that stands in for it
        (:func:`optimum_observer.greedy.generate`)."""
        padding_tokenizer = reference_inputs.left_padding_copy(tokenizer)
        prompts = reference_inputs.DEFAULT_PROMPTS

        def run(model: Any) -> list[torch.Tensor]:
            # Two short prompts, then all three: the batches differ in size and in padded length.
            batches = [[prompts[0], prompts[2]], list(prompts)]
            generator = torch.Generator().manual_seed(0)
            results = []
            for texts in batches:
                if padding_tokenizer is not None:
                    encoded = padding_tokenizer(texts, return_tensors="pt", padding=True)
                    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
                else:
                    lengths = [4 + 2 * i for i in range(len(texts))]
                    batch = reference_inputs.random_token_batch(model, lengths, generator, True)
                pad = reference_inputs.pad_token_id(model, tokenizer)
                results.append(_generate_greedily(model, batch, pad_token_id=pad, use_cache=contract.with_past))
            return results

        return run

    def check_generation(self, inputs: ValidationInputs) -> list[GenerationCheck]:
        return check_generation(inputs)

    def compare_outputs(self, inputs: ValidationInputs, batches: list[Batch] | None = None) -> list[RuntimeCheck]:
        """Logits on the positions the attention mask lets through (a padded row's are
        implementation-defined)."""
        model = inputs.model
        onnx_model = inputs.load()
        checks = []
        for index, batch in enumerate(self.reference_inputs(model, inputs.tokenizer) if batches is None else batches):
            with torch.no_grad():
                expected = model(**batch).logits
            got = torch.as_tensor(onnx_model(**batch).logits)
            diff = ((got.float() - expected.float()).abs() * batch["attention_mask"][..., None]).max().item()
            checks.append(RuntimeCheck(index, "logits", diff, diff <= inputs.atol))
        return checks

    def quality_reference(self, inputs: ValidationInputs) -> float:
        """The fp32 file's perplexity on :data:`~optimum_observer.validation.QUALITY_TEXT`."""
        return perplexity(inputs)

    def check_quality(self, inputs: ValidationInputs, reference: float | None) -> QualityCheck:
        assert reference is not None
        return check_quality(inputs, reference)


class EncoderDecoderFamily(TaskFamily):
    """Text in, text out: the encoder reads the input once, the decoder generates."""

    family = Family.SEQ2SEQ
    run_hint = "model.generate on a batch of token ids"
    encoder_decoder = True

    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        return reference_inputs.text_batches(model, tokenizer)

    def prompt_lengths(self, batch: Batch) -> tuple[int, ...]:
        """How the generation table names a batch's inputs."""
        return tuple(int(n) for n in batch["attention_mask"].sum(-1))

    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """`generate` with batch 2 then 3 over the reference inputs (different lengths)."""

        def run(model: Any) -> list[torch.Tensor]:
            return [_generate_greedily(model, b) for b in self.reference_inputs(model, tokenizer, feature_extractor)]

        return run

    def check_generation(self, inputs: ValidationInputs) -> list[GenerationCheck]:
        """The first reference batch (two inputs of different lengths)."""
        batch = self.reference_inputs(inputs.model, inputs.tokenizer, inputs.feature_extractor)[0]
        return check_encoder_decoder_generation(inputs, batch, self.prompt_lengths(batch))


class SpeechFamily(EncoderDecoderFamily):
    """Audio in, text out: waveforms of different durations through the feature extractor
    (the model's main input: `input_features`, or moonshine's raw `input_values`)."""

    family = Family.SPEECH_SEQ2SEQ
    run_hint = (
        "model.generate(**feature_extractor(waveforms, sampling_rate=feature_extractor.sampling_rate, "
        "padding=True, return_tensors='pt')) with the model's own feature extractor (its main input, "
        "input_features or input_values, and the attention mask when it makes one)"
    )
    uses_feature_extractor = True

    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        return reference_inputs.speech_batches(model, feature_extractor)

    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """`generate` with batch 2 then 3 over the reference inputs, built first, outside the
        observed run: a model whose inputs they cannot be built for fails there, which is a gap of
        this run, not a failure of the model's own run."""
        try:
            batches = self.reference_inputs(model, tokenizer, feature_extractor)
        except Exception as error:
            raise ObserverExportError(
                model.config.model_type,
                Stage.CAPTURE,
                f"the default run cannot build speech inputs for this model ({type(error).__name__}: {error})",
                "pass the model's feature extractor (feature_extractor=...; saved with a checkpoint as "
                "preprocessor_config.json), or a `run` callable that calls model.generate on the inputs "
                "the model's processor makes from audio.",
            ) from error

        def run(model: Any) -> list[torch.Tensor]:
            return [_generate_greedily(model, b) for b in batches]

        return run

    def prompt_lengths(self, batch: Batch) -> tuple[int, ...]:
        # The waveforms' lengths in milliseconds: the features are all padded to one length.
        rows = len(next(iter(batch.values())))
        seconds = next(b for b in reference_inputs.SPEECH_BATCH_SECONDS if len(b) == rows)
        return tuple(int(1000 * duration) for duration in seconds)


class EncoderFamily(TaskFamily):
    """One forward: texts, images or waveforms (the model's main input) in, every output checked."""

    family = Family.ENCODER
    run_hint = (
        "model(**tokenizer(sentences, padding=True, return_tensors='pt')), or model(pixel_values=...) / "
        "model(input_values=...) for a model whose main input is an image or a waveform"
    )
    encoder_decoder = None
    runtime_fed_by_caller = True
    quantization = optimization.ENCODER_QUANTIZATION

    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        return reference_inputs.encoder_batches(model, tokenizer)

    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """A plain forward over the reference inputs (batches of 2 and 3 of different sizes)."""

        def run(model: Any) -> list[Any]:
            with torch.no_grad():
                batches = self.reference_inputs(model, tokenizer)
                return [model(**{k: v.to(model.device) for k, v in b.items()}) for b in batches]

        return run

    def compare_outputs(self, inputs: ValidationInputs, batches: list[Batch] | None = None) -> list[RuntimeCheck]:
        """Every output of the contract, within atol."""
        return check_runtime_outputs(inputs, batches)

    def check_runtime(self, inputs: ValidationInputs) -> RuntimeChecks:
        return RuntimeChecks([], self.compare_outputs(inputs))

    def quality_reference(self, inputs: ValidationInputs) -> None:
        """None: a quantized encoder is measured against torch's outputs directly."""
        return None

    def check_quality(self, inputs: ValidationInputs, reference: float | None) -> CosineCheck:
        return check_output_cosines(inputs)


class VisionLanguageFamily(TaskFamily):
    """Images and text in, text out: generate() over prompts of two lengths with one image each,
    observed on the model's three parts (:mod:`optimum_observer.vision_language`)."""

    family = Family.VISION_LANGUAGE
    run_hint = (
        "model.generate(**processor(images=..., text=..., padding=True, return_tensors='pt')) with one "
        "image per prompt, on batches of 2 and 3 prompts of different lengths"
    )
    encoder_decoder = False
    # The processor (tokenizer and image processor) is saved with the export for its users; the
    # default run builds its batches with it where it has one (vision_language.reference_batches).
    uses_feature_extractor = True
    preprocessor_class = "AutoProcessor"

    def reference_inputs(
        self, model: Any, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> list[Batch]:
        return vision_language.reference_batches(
            model, reference_inputs.pad_token_id(model, tokenizer), feature_extractor
        )

    def default_run(
        self, model: Any, contract: TaskContract, tokenizer: Any | None = None, feature_extractor: Any | None = None
    ) -> Callable[[Any], Any]:
        """`generate` with batch 2 then 3 over the reference inputs (left padded, one image each).

        The inputs are built first, outside the observed run: without a processor, a model whose
        images take more than the layouts this run builds (image sizes, grids) fails there, which is
        a gap of this run, not a failure of the model's own run."""
        pad = reference_inputs.pad_token_id(model, tokenizer)
        try:
            batches = self.reference_inputs(model, tokenizer, feature_extractor)
        except Exception as error:
            raise ObserverExportError(
                model.config.model_type,
                Stage.CAPTURE,
                f"the default run cannot build image-text inputs for this model ({type(error).__name__}: "
                f"{error}): without the model's processor it feeds pixel_values of [images, channels, height, "
                "width] or [prompts, images, channels, height, width] (the first the model runs on), the other "
                "inputs of get_image_features it knows (vision_language.VISION_INPUT_BUILDERS) and one "
                "placeholder token per image feature",
                "pass the model's processor (feature_extractor=AutoProcessor.from_pretrained(...); a checkpoint "
                "directory that holds it is read by itself), which knows the images' layout, their sizes and "
                "placeholder counts, or a `run` callable that calls model.generate(**processor(images=..., "
                "text=..., return_tensors='pt')).",
            ) from error

        def run(model: Any) -> list[torch.Tensor]:
            return [_generate_greedily(model, b, pad_token_id=pad) for b in batches]

        return run

    def routed(self, model: Any, modules: dict[str, torch.nn.Module]) -> ContextManager[None]:
        return vision_language.routed(model, modules)

    def check_generation(self, inputs: ValidationInputs) -> list[GenerationCheck]:
        """The first reference batch (two prompts of different lengths, one image each); the
        generate call is the same as an encoder-decoder model's."""
        batch = self.reference_inputs(inputs.model, inputs.tokenizer, inputs.feature_extractor)[0]
        lengths = tuple(int(n) for n in batch["attention_mask"].sum(-1))
        return check_encoder_decoder_generation(inputs, batch, lengths)


FAMILIES: dict[Family, TaskFamily] = {
    family.family: family
    for family in (DecoderFamily(), EncoderDecoderFamily(), SpeechFamily(), EncoderFamily(), VisionLanguageFamily())
}


def family_of(contract: TaskContract) -> TaskFamily:
    """The family object of a task."""
    return FAMILIES[contract.family]

