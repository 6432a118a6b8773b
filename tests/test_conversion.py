"""Export stage: an axis the example declares dynamic must cover every observed size.

The model's code can bound an axis (LED's and Longformer's padded attention mask, before
`patches/sliding_window.py` padded it by its own length: 1..5 while the run fed 13 tokens); ONNX
Runtime does not check torch's guards, so the file would load and compute for sizes torch never
traced. `restricted_axes` finds such axes; `check_axes` (the pipeline's export stage) refuses them.
"""

from __future__ import annotations

import unittest

import torch

from optimum_observer.conversion import ContractModule, check_axes, restricted_axes
from optimum_observer.errors import ObserverExportError, Stage
from optimum_observer.synthesis import ExportExample, LeafSpec
from optimum_observer.tasks import ContractOutput, GraphContract, get_task


class _BoundedLength(torch.nn.Module):
    def forward(self, input_ids):
        torch._check(input_ids.shape[1] <= 5)
        return input_ids * 2


class _FreeLength(torch.nn.Module):
    def forward(self, input_ids):
        return input_ids * 2


def _example(observed_length: int) -> ExportExample:
    dims = {0: "batch_size", 1: "sequence_length"}
    leaf = LeafSpec("input_ids", 0, "input_ids", torch.float32, (2, 3), dims, largest=(3, observed_length))
    return ExportExample({"input_ids": torch.ones(2, 3)}, {"input_ids": dims}, [leaf], {})


def _program(module: torch.nn.Module, example: ExportExample) -> torch.onnx.ONNXProgram:
    return torch.onnx.export(
        module, (), kwargs=example.kwargs, dynamic_shapes=example.dynamic_shapes, dynamo=True, verbose=False
    )


def _problems(module: torch.nn.Module, observed_length: int) -> list[str]:
    example = _example(observed_length)
    return restricted_axes(_program(module, example).exported_program, example)


class TestSpecialisedAxes(unittest.TestCase):
    def test_an_axis_bounded_below_an_observed_size_is_reported(self):
        self.assertEqual(_problems(_BoundedLength(), observed_length=7), ["input_ids axis 1 (sequence_length) <= 5, observed 7"])

    def test_a_bound_every_observed_size_respects_is_not_reported(self):
        self.assertEqual(_problems(_BoundedLength(), observed_length=4), [])

    def test_a_free_axis_is_not_reported(self):
        self.assertEqual(_problems(_FreeLength(), observed_length=7), [])

    def test_the_export_stage_refuses_a_bounded_axis(self):
        example = _example(observed_length=7)
        program = _program(_BoundedLength(), example)
        with self.assertRaises(ObserverExportError) as caught:
            check_axes(program, example, "bounded", "model.onnx")
        self.assertEqual(caught.exception.stage, Stage.TORCH_EXPORT)
        self.assertIn("input_ids axis 1 (sequence_length) <= 5, observed 7", caught.exception.reason)
        check_axes(_program(_FreeLength(), example), example, "free", "model.onnx")  # no bound: no error


class _ReadsEncoderOutputsByName(torch.nn.Module):
    """A decoder that reads `encoder_outputs.last_hidden_state`, as T5Gemma's does."""

    def forward(self, decoder_input_ids, encoder_outputs=None, return_dict=True):
        return {"logits": encoder_outputs.last_hidden_state.sum(-1) + decoder_input_ids}


class TestEncoderOutputsArgument(unittest.TestCase):
    def test_the_graph_passes_encoder_outputs_as_generate_does(self):
        # A tuple here failed T5Gemma's decoder: "'tuple' object has no attribute 'last_hidden_state'".
        decoder = get_task("text2text-generation-with-past").graphs[1]
        graph = GraphContract(decoder.file_name, decoder.inputs, (ContractOutput("logits"),), use_cache=None)
        module = ContractModule(_ReadsEncoderOutputsByName(), graph)
        (logits,) = module(input_ids=torch.zeros(2, 1), encoder_hidden_states=torch.ones(2, 3, 4))
        torch.testing.assert_close(logits, torch.full((2, 3), 4.0))
