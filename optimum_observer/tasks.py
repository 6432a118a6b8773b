"""The tasks the observer stack exports, as data: what the runtime feeds and reads back.

A task contract describes one or more graphs (one ONNX file each). A graph contract names the
graph inputs the matching `optimum.onnxruntime` class feeds, the `forward` argument each one is
observed in, the outputs the runtime reads, which module of the model is observed (the model
itself, or its encoder), and which of the observed calls belong to it (a decoder without past
is the first step of generate, a decoder with past every later one). Observed `forward`
arguments outside the contract (for example `cache_position`, which the runtime never feeds)
are left for the model to compute itself.

Encoder-decoder models are exported as `encoder_model.onnx`, `decoder_model.onnx` and
`decoder_with_past_model.onnx`, not as one `decoder_model_merged.onnx`.
`ORTModelForConditionalGeneration._from_pretrained` looks for a merged decoder first and, when
there is none, loads exactly these two decoders (use_cache=True by default), so both layouts
load by default. The separate layout is chosen because each file is one observed kind of call
(the first generate step, whose cross-attention cache is computed from the encoder output, and
the later steps, which read it back), exported by the same stages as every other graph; a merged
file needs an `If` over two graphs that no observed call runs as one, and its first step is fed
zero-length past tensors that the runtime sizes from `hidden_size // num_attention_heads`, which
is wrong for models whose head size differs (T5's `d_kv`, for example).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Calls(str, enum.Enum):
    """Which observed calls of a module one graph is exported from."""

    ALL = "all"
    WITHOUT_PAST = "without past"
    WITH_PAST = "with past"


#: transformers 5's name of the cache argument and output field.
CACHE = "cache"


@dataclasses.dataclass(frozen=True)
class ContractInput:
    """One graph input, observed in the `forward` argument `argument` (default: its own name).

    `first_of`: the argument is a tuple or ModelOutput and the input is its first element (the
    decoder's `encoder_hidden_states` arrive as `encoder_outputs[0]`).
    """

    name: str
    argument: str | None = None
    first_of: bool = False
    #: other `forward` argument names that carry the same input in some architectures (the
    #: state-space models take their cache as `cache_params`).
    alternatives: tuple[str, ...] = ()
    #: the model's main input, named after the model's `main_input_name` (a speech model takes
    #: `input_features` or, moonshine, the raw waveform as `input_values`; the runtime class feeds
    #: the graph input of that name): :meth:`TaskContract.for_model`.
    main_input: bool = False

    @property
    def source(self) -> str:
        return self.argument or self.name

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source, *self.alternatives)

    def argument_for(self, accepted: Any) -> str:
        """The `forward` argument this input is passed as, among the `accepted` names."""
        return next((s for s in self.sources if s in accepted), self.source)


@dataclasses.dataclass(frozen=True)
class ContractOutput:
    """One graph output (a tensor, or a cache flattened into one output per leaf).

    `field`: the model output field it is read from (default: its own name); `attribute`: an
    attribute of that field (`self_attention_cache` of an `EncoderDecoderCache`); for a cache,
    `name` is the prefix of the per-layer names and `leaf_suffixes` overrides the cache class's
    own suffixes.
    """

    name: str
    field: str | None = None
    attribute: str | None = None
    leaf_suffixes: tuple[str, ...] | None = None
    #: other output fields that carry it in some architectures (`cache_params`).
    alternatives: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return self.field or self.name

    def read(self, outputs: Any) -> Any:
        """This output, read from what the model's forward returned."""
        field = next((f for f in (self.source, *self.alternatives) if outputs.get(f) is not None), self.source)
        value = outputs[field]
        return getattr(value, self.attribute) if self.attribute else value


@dataclasses.dataclass(frozen=True)
class GraphContract:
    file_name: str
    inputs: tuple[ContractInput, ...]
    outputs: tuple[ContractOutput, ...]
    #: "model" (the model's own forward), "encoder" (`model.get_encoder()`) or a part of a
    #: vision-language model (:data:`VISION_ENCODER`, :data:`TEXT_EMBEDDING`, :data:`TEXT_DECODER`).
    module: str = "model"
    calls: Calls = Calls.ALL
    #: `use_cache` passed to forward at export; None for modules that do not take it.
    use_cache: bool | None = False
    #: (input name, axis) pairs dynamic in the graph even when the observed run never varied
    #: them: generate() starts every decoder on one start token, but a caller may feed several
    #: (forced decoder ids, a prompt), as the legacy `decoder_model.onnx` allows.
    dynamic_axes: tuple[tuple[str, int], ...] = ()
    #: the tensors the module's forward receives beside `inputs` are graph inputs too, under
    #: their argument names, as observed (:meth:`with_observed_inputs`): a vision encoder takes
    #: whatever the model's `get_image_features` is called with (a pixel attention mask, image
    #: sizes, a patch grid), which differs per model.
    observed_inputs: bool = False
    #: The export example is one of the observed calls, values kept, rather than synthesized:
    #: the inputs describe each other (a grid's t * h * w per image sums to the patch count, which
    #: the vision tower reshapes by), so random values of the synthesized sizes would not fit.
    observed_example: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def with_observed_inputs(self, names: Any) -> GraphContract:
        """This contract with the argument `names` (observed tensors) added as inputs after its own,
        in the order given; unchanged unless :attr:`observed_inputs`."""
        if not self.observed_inputs:
            return self
        known = {s for i in self.inputs for s in i.sources}
        added = tuple(ContractInput(name) for name in dict.fromkeys(names) if name not in known)
        return dataclasses.replace(self, inputs=self.inputs + added)


class Family(str, enum.Enum):
    """How a task is run by default and checked through its runtime class."""

    DECODER = "decoder-only generation"
    SEQ2SEQ = "encoder-decoder generation"
    SPEECH_SEQ2SEQ = "speech encoder-decoder generation"
    ENCODER = "encoder"
    VISION_LANGUAGE = "vision-language generation"


#: The parts of a vision-language model its graphs are observed on (GraphContract.module; the
#: modules are in :mod:`optimum_observer.vision_language`).
VISION_ENCODER, TEXT_EMBEDDING, TEXT_DECODER = "vision_encoder", "text_embedding", "text_decoder"


@dataclasses.dataclass(frozen=True)
class TaskContract:
    name: str
    auto_model_class: str
    runtime_class: str
    graphs: tuple[GraphContract, ...]
    family: Family
    with_past: bool

    @property
    def generates(self) -> bool:
        return self.family is not Family.ENCODER

    @property
    def observed_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.module for g in self.graphs))

    def for_model(self, model: Any) -> TaskContract:
        """This contract with its main inputs named as `model.main_input_name` says."""
        main_input_name = getattr(model, "main_input_name", None)
        if not main_input_name:
            return self

        def renamed(graph: GraphContract) -> GraphContract:
            inputs = tuple(
                dataclasses.replace(i, name=main_input_name, argument=None) if i.main_input else i for i in graph.inputs
            )
            return dataclasses.replace(graph, inputs=inputs)

        return dataclasses.replace(self, graphs=tuple(renamed(g) for g in self.graphs))


def _inputs(*names: str) -> tuple[ContractInput, ...]:
    return tuple(ContractInput(name) for name in names)


def _outputs(*names: str) -> tuple[ContractOutput, ...]:
    return tuple(ContractOutput(name) for name in names)


def _decoder_only(name: str, with_past: bool) -> TaskContract:
    inputs = _inputs("input_ids", "attention_mask", "position_ids")
    outputs: tuple[ContractOutput, ...] = (ContractOutput("logits"),)
    if with_past:
        # State-space models (mamba...) pass their states as `cache_params`; they are exported
        # under the same names, one `.conv_state` and one `.ssm_state` per layer. transformers 5
        # names the cache argument and output `cache` (`past_key_values` stays an alias until 5.40).
        inputs += (ContractInput("past_key_values", alternatives=("cache_params", CACHE)),)
        outputs += (ContractOutput("present", "past_key_values", alternatives=("cache_params", CACHE)),)
    return TaskContract(
        name=name,
        auto_model_class="AutoModelForCausalLM",
        runtime_class="ORTModelForCausalLM",
        graphs=(GraphContract("model.onnx", inputs, outputs, use_cache=with_past),),
        family=Family.DECODER,
        with_past=with_past,
    )


def _encoder_task(name: str, auto_model_class: str, runtime_class: str, *outputs: str) -> TaskContract:
    # The runtime feeds token_type_ids only when the graph has it; the graph has it only when
    # the observed run passed it (the tokenizer returns it and forward takes it). Image and audio
    # encoders are observed on their main input, which the runtime classes feed by these names.
    inputs = _inputs("input_ids", "attention_mask", "token_type_ids", "pixel_values", "input_values")
    graph = GraphContract("model.onnx", inputs, _outputs(*outputs), use_cache=None)
    return TaskContract(name, auto_model_class, runtime_class, (graph,), Family.ENCODER, with_past=False)


def _seq2seq(name: str, auto_model_class: str, runtime_class: str, encoder_input: str, family: Family) -> TaskContract:
    decoder_inputs = (
        ContractInput("input_ids", "decoder_input_ids"),
        ContractInput("encoder_attention_mask", "attention_mask"),
        ContractInput("encoder_hidden_states", "encoder_outputs", first_of=True),
    )
    return TaskContract(
        name=name,
        auto_model_class=auto_model_class,
        runtime_class=runtime_class,
        graphs=(
            GraphContract(
                "encoder_model.onnx",
                (ContractInput(encoder_input, main_input=True), ContractInput("attention_mask")),
                _outputs("last_hidden_state"),
                module="encoder",
                use_cache=None,
            ),
            GraphContract(
                "decoder_model.onnx",
                decoder_inputs,
                (ContractOutput("logits"), ContractOutput("present", "past_key_values", alternatives=(CACHE,))),
                calls=Calls.WITHOUT_PAST,
                use_cache=True,
                dynamic_axes=(("input_ids", 1),),
            ),
            GraphContract(
                "decoder_with_past_model.onnx",
                decoder_inputs + (ContractInput("past_key_values", alternatives=(CACHE,)),),
                (
                    ContractOutput("logits"),
                    # The cross-attention cache only passes through; the runtime keeps its own.
                    ContractOutput(
                        "present", "past_key_values", "self_attention_cache", ("decoder.key", "decoder.value"),
                        alternatives=(CACHE,),
                    ),
                ),
                calls=Calls.WITH_PAST,
                use_cache=True,
            ),
        ),
        family=family,
        with_past=True,
    )


def _image_text_to_text() -> TaskContract:
    """Three graphs, one per part of the model (file names and roles: see
    :mod:`optimum_observer.vision_language`); the runtime merges the image features into the
    embeddings between the first two and the third."""
    return TaskContract(
        name="image-text-to-text",
        auto_model_class="AutoModelForImageTextToText",
        runtime_class="ORTModelForImageTextToText",
        graphs=(
            GraphContract(
                "vision_encoder.onnx",
                # The other tensors get_image_features is called with (image_sizes,
                # pixel_attention_mask, image_grid_thw) are added as observed (observed_inputs).
                _inputs("pixel_values"),
                _outputs("image_features"),
                module=VISION_ENCODER,
                use_cache=None,
                observed_inputs=True,
                observed_example=True,
            ),
            GraphContract(
                "embed_tokens.onnx", _inputs("input_ids"), _outputs("inputs_embeds"), module=TEXT_EMBEDDING, use_cache=None
            ),
            GraphContract(
                "decoder_model_merged.onnx",
                # token_type_ids: only where the decoder part builds the model's own mask from
                # them (gemma3's image blocks); the graph has it only when the run passed it.
                _inputs("inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
                + (ContractInput("past_key_values", alternatives=(CACHE,)),),
                (
                    # The decoder part returns its logits as `last_hidden_state` (it stands in for
                    # the model's decoder during the run, see vision_language.TextDecoder).
                    ContractOutput("logits", "last_hidden_state"),
                    ContractOutput("present", "past_key_values", alternatives=(CACHE,)),
                ),
                module=TEXT_DECODER,
                use_cache=True,
            ),
        ),
        family=Family.VISION_LANGUAGE,
        with_past=True,
    )


TASKS: dict[str, TaskContract] = {
    contract.name: contract
    for contract in (
        _decoder_only("text-generation-with-past", with_past=True),
        _decoder_only("text-generation", with_past=False),
        _seq2seq(
            "text2text-generation-with-past",
            "AutoModelForSeq2SeqLM",
            "ORTModelForSeq2SeqLM",
            "input_ids",
            Family.SEQ2SEQ,
        ),
        _seq2seq(
            "automatic-speech-recognition-with-past",
            "AutoModelForSpeechSeq2Seq",
            "ORTModelForSpeechSeq2Seq",
            "input_features",
            Family.SPEECH_SEQ2SEQ,
        ),
        _encoder_task("feature-extraction", "AutoModel", "ORTModelForFeatureExtraction", "last_hidden_state"),
        _encoder_task(
            "text-classification", "AutoModelForSequenceClassification", "ORTModelForSequenceClassification", "logits"
        ),
        _encoder_task(
            "token-classification", "AutoModelForTokenClassification", "ORTModelForTokenClassification", "logits"
        ),
        _encoder_task(
            "question-answering",
            "AutoModelForQuestionAnswering",
            "ORTModelForQuestionAnswering",
            "start_logits",
            "end_logits",
        ),
        _encoder_task("fill-mask", "AutoModelForMaskedLM", "ORTModelForMaskedLM", "logits"),
        _image_text_to_text(),
    )
}


def supported_tasks() -> tuple[str, ...]:
    """The task names :func:`optimum_observer.export` accepts."""
    return tuple(TASKS)


def get_task(name: str) -> TaskContract:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"Unknown task {name!r} for the observer exporter; supported: {', '.join(TASKS)}."
        ) from None
