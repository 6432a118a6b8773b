"""Validation: the exported file against what torch did.

Takes: the staged ONNX files, the captures, the export examples and the runtime class.
Gives: a :class:`~optimum_observer.result.ValidationReport` with

* every observed call replayed through ONNX Runtime (through the graph it was exported into)
  and compared with the outputs torch returned during capture (max |diff| per call, fp32
  default atol 1e-4; a NaN or inf on either side, where compared, fails). generate() asks torch for the last position's logits only, so logits are
  compared on the positions torch returned;
* through the runtime class (by default the unchanged `optimum.onnxruntime` class of the task,
  imported lazily: its public API only), the checks each task family runs
  (:mod:`optimum_observer.families`) from the functions here: for generation tasks, greedy generation token for token
  against `model.generate` (:func:`optimum_observer.greedy.generate`: a greedy loop over forward
  for a model without it), batch 2 with inputs of different lengths (left padded for a decoder
  only model); on a mismatch, the check names what makes torch's tokens unreachable for the
  runtime, when it sees it (a generate that rewrites the prompt, or whose tokens change without
  its cache); for encoder tasks, every output on batches of 2 and 3 texts of different lengths
  against the torch model's, within atol;
* for a quantized export: for decoders (:func:`check_quality`) its perplexity as a ratio to the
  fp32 file's and the share of torch's greedy tokens it reproduces; for encoders
  (:func:`check_output_cosines`) the cosine of each input's output to torch's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch
import torch.utils._pytree as pytree

from . import greedy, portable_cache
from .cache_pytree import registered_caches
from .reference_inputs import encoder_batches, generation_inputs, pad_token_id, random_token_batch
from .result import CallCheck, CosineCheck, GenerationCheck, QualityCheck, RuntimeCheck, nonfinite_text
from .tasks import GraphContract, TaskContract

if TYPE_CHECKING:
    from .capture import Capture, ObservedCall
    from .synthesis import ExportExample

logger = logging.getLogger(__name__)

GENERATION_NEW_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class ValidationInputs:
    """What the runtime-class checks compare: the export in `directory`, loaded by `runtime_class`,
    against the torch `model` it came from, on the task family's reference inputs (built with the
    tokenizer or feature extractor when there is one)."""

    directory: Path
    model: Any
    contract: TaskContract
    runtime_class: Any
    tokenizer: Any | None = None
    feature_extractor: Any | None = None
    atol: float = 1e-4
    #: `from_pretrained` arguments of the runtime class (`trust_remote_code`).
    load_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: The input names of the files in `directory`, by file name, when the caller knows them (the
    #: export names them); a file not listed is read by an ONNX Runtime session.
    graph_inputs: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def load(self, **kwargs: Any) -> Any:
        """The export loaded by the runtime class."""
        return self.runtime_class.from_pretrained(self.directory, **self.load_kwargs, **kwargs)


def _leaves(value: Any) -> list[torch.Tensor]:
    return pytree.tree_flatten(value)[0]


def _feeds(call: ObservedCall, example: ExportExample, names: list[str]) -> dict[str, np.ndarray]:
    """The call's tensors by graph input name; an input the call lacked (the prefill call's
    cache) is fed empty, its unknown dimensions 0, as Optimum's runtime feeds it, except an
    absent attention mask (a Mamba decode step gets none), which means no masking: ones."""
    call_leaves = {name: _leaves(value) for name, value in call.inputs.items()}
    sizes: dict[str, int] = {}
    for leaf in example.leaves:
        if leaf.input_name in call_leaves:
            tensor = call_leaves[leaf.input_name][leaf.index]
            sizes.update({symbol: tensor.shape[axis] for axis, symbol in leaf.dims.items()})
    feeds = {}
    for leaf, name in zip(example.leaves, names):
        if leaf.input_name in call_leaves:
            tensor = call_leaves[leaf.input_name][leaf.index]
        else:
            shape = [sizes.get(leaf.dims[a], 0) if a in leaf.dims else n for a, n in enumerate(leaf.shape)]
            fill = torch.ones if leaf.input_name == "attention_mask" else torch.zeros
            tensor = fill(shape, dtype=leaf.dtype)
        feeds[name] = tensor.detach().cpu().numpy()
    return feeds


def _carried(feeds: dict[str, np.ndarray], session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """`feeds` as the graph takes them: states in the value slots of a graph that carries them
    (:func:`optimum_observer.portable_cache.carry_states_as_values`), others as they are."""
    graph_inputs = {value.name for value in session.get_inputs()}
    carried = {}
    for name, array in feeds.items():
        slot = portable_cache.carried_name(name)
        if slot != name and slot in graph_inputs:
            name, array = slot, array.reshape(portable_cache.carried_shape(array.shape))
        carried[name] = array
    return carried


def _visible(shape: torch.Size, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which positions of an output of `shape` the attention mask lets through, broadcastable to
    it; None when all are compared.

    A left-padded position attends to nothing; what a fully masked attention row yields is
    implementation-defined (torch and ONNX Runtime differ), and the cache carries it into later
    layers. The mask hides those positions from every later step, so they are not compared.
    """
    if mask is None or not shape or shape[0] != mask.shape[0]:
        return None
    mask = mask != 0
    if len(shape) == 4 and shape[2] == mask.shape[1]:  # (batch, heads, positions, head size)
        return mask[:, None, :, None]
    if len(shape) == 3 and shape[1] <= mask.shape[1]:
        # (batch, positions, features): logits of every new token, for models that do not
        # support `logits_to_keep`, are the mask's last positions.
        return mask[:, mask.shape[1] - shape[1] :, None]
    return None


def _max_visible_diff(want: torch.Tensor, have: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Max |diff| over the positions the attention mask lets through (see :func:`_visible`);
    NaN when either side has a NaN or inf there."""
    if not want.numel():
        return 0.0
    diff = (have.float() - want.float()).abs()
    visible = _visible(diff.shape, mask)
    if visible is not None:
        diff = torch.where(visible, diff, torch.zeros((), dtype=diff.dtype))
    return diff.max().item()


def nonfinite_sides(want: torch.Tensor, have: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[str, ...]:
    """"torch" and/or "ONNX Runtime" when its output has a NaN or inf where it is compared."""
    sides = []
    for side, tensor in (("torch", want), ("ONNX Runtime", have)):
        if not tensor.numel() or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        visible = _visible(tensor.shape, mask)
        if visible is not None:
            finite = finite | ~visible
        if not bool(finite.all()):
            sides.append(side)
    return tuple(sides)


def _expected(call: ObservedCall, graph: GraphContract) -> list[torch.Tensor]:
    expected = []
    for output in graph.outputs:
        expected.extend(_leaves(output.read(call.outputs)))
    return expected


def replay_calls(
    onnx_path: Path,
    capture: Capture,
    example: ExportExample,
    input_names: list[str],
    atol: float,
) -> list[CallCheck]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    checks = []
    with registered_caches():
        for index, call in enumerate(capture.calls):
            try:
                got = session.run(None, _carried(_feeds(call, example, input_names), session))
            except Exception as error:
                checks.append(
                    CallCheck(index, float("inf"), False, f"{type(error).__name__}: {error}", onnx_path.name)
                )
                continue
            expected = _expected(call, capture.graph)
            worst, error, nonfinite = 0.0, "", set()
            if len(got) != len(expected):
                error = f"{len(got)} outputs, torch returned {len(expected)}"
            mask = call.inputs.get("attention_mask")
            for output, want, have in zip(session.get_outputs(), expected, got):
                have = torch.from_numpy(have)
                if portable_cache.is_carried_state(output.name):
                    want = want.reshape(portable_cache.carried_shape(tuple(want.shape)))
                if want.dim() == 3 and have.dim() == 3 and want.shape[1] < have.shape[1]:
                    have = have[:, -want.shape[1] :]
                if have.shape != want.shape:
                    error = f"shape {tuple(have.shape)} != torch {tuple(want.shape)}"
                    break
                nonfinite.update(nonfinite_sides(want, have, mask))
                # max() keeps its first argument against a NaN: a NaN difference is the worst.
                diff = _max_visible_diff(want, have, mask)
                worst = max(worst, math.inf if math.isnan(diff) else diff)
            ordered = tuple(side for side in ("torch", "ONNX Runtime") if side in nonfinite)
            if ordered:
                error = f"{error} {nonfinite_text(ordered)}"
            ok = not error and worst <= atol
            if not ok and call.unfed:
                unfed = ", ".join(call.unfed)
                error = f"{error} (torch's forward also got {unfed}, which the runtime does not feed)"
            checks.append(CallCheck(index, worst, ok, error.strip(), onnx_path.name, nonfinite=ordered))
    return checks


def _first_forward_input_ids(
    model: Any, inputs: dict[str, torch.Tensor], settings: dict[str, Any]
) -> torch.Tensor | None:
    """The `input_ids` generate's first call to forward received."""
    seen: list[torch.Tensor | None] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append(kwargs.get("input_ids", args[0] if args else None))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            greedy.generate(model, inputs, **settings)
    finally:
        handle.remove()
    return seen[0] if seen else None


def torch_reference_caveat(
    model: Any, inputs: dict[str, torch.Tensor], settings: dict[str, Any], expected: torch.Tensor
) -> str:
    """Why torch's greedy tokens are not tokens the runtime class can give, when that is
    observable, or "": the runtime feeds forward the prompt, then one token at a time with the
    cache, so it matches neither a generate that rewrites the prompt before forward sees it nor
    one whose tokens change with and without its own cache."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    first = _first_forward_input_ids(model, inputs, settings)
    if isinstance(first, torch.Tensor) and not torch.equal(first.cpu(), inputs["input_ids"].cpu()):
        return (
            f"(torch's generate fed forward input_ids of shape {tuple(first.shape)}, not the prompt's "
            f"{tuple(inputs['input_ids'].shape)}: its prepare_inputs_for_generation rewrites the prompt)"
        )
    with torch.no_grad():
        without_cache = greedy.generate(model, inputs, **{**settings, "use_cache": False})
    if not torch.equal(without_cache.cpu(), expected.cpu()):
        return "(torch itself generates other tokens without its cache)"
    return ""


def _has_past_inputs(inputs: ValidationInputs, file_name: str = "model.onnx") -> bool:
    names = inputs.graph_inputs.get(file_name)
    if names is None:
        session = ort.InferenceSession(str(inputs.directory / file_name), providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in session.get_inputs())
    return any(name.startswith("past_key_values") for name in names)


def check_generation(inputs: ValidationInputs) -> list[GenerationCheck]:
    """Greedy generation of a decoder-only export through the runtime class against torch's, on
    left-padded batches (:func:`~optimum_observer.reference_inputs.generation_inputs`)."""
    model = inputs.model
    # The runtime defaults to use_cache=True and refuses a graph without past inputs (a model
    # exported for `text-generation`); such a graph recomputes the whole prefix every step, and
    # torch is asked to do the same.
    use_cache = _has_past_inputs(inputs)
    onnx_model = inputs.load(**({} if use_cache else {"use_cache": False}))
    checks = []
    for batch in generation_inputs(model, inputs.tokenizer):
        settings = dict(
            max_new_tokens=GENERATION_NEW_TOKENS,
            min_new_tokens=GENERATION_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_token_id(model, inputs.tokenizer),
            use_cache=use_cache,
        )
        with torch.no_grad():
            expected = greedy.generate(model, {k: v.to(model.device) for k, v in batch.items()}, **settings)
        got = onnx_model.generate(**batch, **settings)
        prompt_length = batch["input_ids"].shape[1]
        check = GenerationCheck(
            prompt_lengths=tuple(int(n) for n in batch["attention_mask"].sum(-1)),
            torch_tokens=expected[:, prompt_length:].tolist(),
            onnx_tokens=got[:, prompt_length:].tolist(),
        )
        if not check.ok:
            check = dataclasses.replace(check, caveat=torch_reference_caveat(model, batch, settings, expected))
        checks.append(check)
    return checks


def default_runtime_class(contract: TaskContract) -> Any:
    """The unchanged optimum runtime class for the task, or None when it cannot be imported:
    optimum-onnx not installed, or (transformers 5) installed but failing at import, which its
    lazy module raises only when the class is read."""
    try:
        import optimum.onnxruntime as optimum_runtime

        return getattr(optimum_runtime, contract.runtime_class)
    except (ImportError, AttributeError) as error:  # AttributeError: a class optimum-onnx lacks
        logger.warning(
            "optimum.onnxruntime.%s cannot be imported (%s): generation parity is not checked. Pass "
            "runtime_class= (legacy_shim's classes load on transformers 5), or export through "
            "legacy_shim (optimum-cli export onnx), which validates with them.",
            contract.runtime_class,
            error,
        )
        return None


def check_encoder_decoder_generation(
    inputs: ValidationInputs, batch: dict[str, torch.Tensor], prompt_lengths: tuple[int, ...]
) -> list[GenerationCheck]:
    """Greedy generate of an encoder-decoder export through the runtime class against torch's on
    one batch (`prompt_lengths`: what the table shows of its inputs' lengths)."""
    model = inputs.model
    onnx_model = inputs.load()
    settings = dict(
        max_new_tokens=GENERATION_NEW_TOKENS, min_new_tokens=GENERATION_NEW_TOKENS, do_sample=False
    )
    with torch.no_grad():
        expected = model.generate(**{k: v.to(model.device) for k, v in batch.items()}, **settings)
    got = onnx_model.generate(**batch, **settings)
    return [GenerationCheck(prompt_lengths=prompt_lengths, torch_tokens=expected.tolist(), onnx_tokens=got.tolist())]


def check_runtime_outputs(
    inputs: ValidationInputs, batches: list[dict[str, torch.Tensor]] | None = None
) -> list[RuntimeCheck]:
    """Every output of the runtime class against the torch model's, batch by batch; `batches`
    defaults to the encoder batches of the default run (a caller adds inputs the runtime class
    takes from its caller, as the legacy runner does with `position_ids`)."""
    model = inputs.model
    onnx_model = inputs.load()
    (graph,) = inputs.contract.graphs
    checks = []
    for index, batch in enumerate(encoder_batches(model, inputs.tokenizer) if batches is None else batches):
        with torch.no_grad():
            expected = model(**{k: v.to(model.device) for k, v in batch.items()})
        got = onnx_model(**batch)
        for output in graph.outputs:
            want, have = output.read(expected), torch.as_tensor(getattr(got, output.name))
            diff = (have.float() - want.float()).abs().max().item() if want.shape == have.shape else math.inf
            nonfinite = nonfinite_sides(want, have) if want.shape == have.shape else ()
            ok = not nonfinite and diff <= inputs.atol
            checks.append(RuntimeCheck(index, output.name, diff, ok, nonfinite=nonfinite))
    return checks


#: The text whose perplexity the quantization check measures (plain English, about 120 tokens
#: for a BPE tokenizer); random ids of :data:`QUALITY_RANDOM_TOKENS` without a tokenizer.
QUALITY_TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "built wooden machines that riders pushed along with their feet. Pedals attached to the front "
    "wheel came later, and the large front wheels of the high-wheelers made riding fast but "
    "dangerous. The safety bicycle, with two wheels of equal size and a chain driving the rear "
    "wheel, changed everything: it was stable, easy to learn, and cheap enough for workers to buy. "
    "Within a few years, millions of people used bicycles to travel to work, to visit friends, and "
    "to explore the countryside on weekends."
)
QUALITY_RANDOM_TOKENS = 64


def _quality_ids(model: Any, tokenizer: Any | None) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(QUALITY_TEXT, return_tensors="pt")["input_ids"]
    batch = random_token_batch(model, [QUALITY_RANDOM_TOKENS], torch.Generator().manual_seed(2), left_padding=True)
    return batch["input_ids"]


def perplexity(inputs: ValidationInputs) -> float:
    """Perplexity of the export, through the runtime class, on :data:`QUALITY_TEXT`."""
    onnx_model = inputs.load()
    ids = _quality_ids(inputs.model, inputs.tokenizer)
    logits = torch.as_tensor(onnx_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(loss.item())


def check_quality(inputs: ValidationInputs, reference_perplexity: float) -> QualityCheck:
    """The quantized export against the fp32 file's perplexity and torch's greedy tokens (the
    left-padded batches of :func:`check_generation`)."""
    return QualityCheck(
        reference_perplexity=reference_perplexity,
        perplexity=perplexity(inputs),
        generation=check_generation(inputs),
    )


def check_output_cosines(
    inputs: ValidationInputs, batches: list[dict[str, torch.Tensor]] | None = None
) -> CosineCheck:
    """A quantized encoder export through the runtime class against the torch model, on `batches`
    (default: the encoder reference batches): per output, the cosine similarity of each input's
    output, flattened, to torch's. Positions the attention mask pads are left out (what a padded
    position holds is not an output anyone reads); a NaN or inf gives a NaN cosine."""
    model = inputs.model
    onnx_model = inputs.load()
    (graph,) = inputs.contract.graphs
    cosines: dict[str, list[float]] = {output.name: [] for output in graph.outputs}
    for batch in encoder_batches(model, inputs.tokenizer) if batches is None else batches:
        with torch.no_grad():
            expected = model(**{k: v.to(model.device) for k, v in batch.items()})
        got = onnx_model(**batch)
        for output in graph.outputs:
            # float64: the cosine of a 8-bit file's outputs differs from 1 below float32's resolution.
            want = output.read(expected).double().cpu()
            have = torch.as_tensor(getattr(got, output.name)).double()
            visible = _visible(want.shape, batch.get("attention_mask"))
            if visible is not None:
                want, have = want * visible, have * visible
            similarity = torch.nn.functional.cosine_similarity(want.flatten(1), have.flatten(1), dim=-1)
            finite = torch.isfinite(want.flatten(1)).all(-1) & torch.isfinite(have.flatten(1)).all(-1)
            cosines[output.name].extend(torch.where(finite, similarity, math.nan).tolist())
    return CosineCheck({name: tuple(values) for name, values in cosines.items()})
