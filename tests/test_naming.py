"""Naming: dimension names torch leaves as expressions come out as Optimum names them."""

from __future__ import annotations

import unittest

import onnx_ir as ir
from parameterized import parameterized

from optimum_observer.naming import _rename_dims, _simplified


CROSS = "((encoder_sequence_length*batch_size)//batch_size)"
TOTAL = "past_sequence_length + sequence_length"


class TestDimensionNames(unittest.TestCase):
    @parameterized.expand([
        ("cross_attention_reshape", CROSS, "encoder_sequence_length"),
        ("plain_name", "sequence_length", "sequence_length"),
        ("sum_left_alone", TOTAL, TOTAL),
        ("product_kept", "2*sequence_length", "2*sequence_length"),
        ("unreadable_kept", "batch_size)(", "batch_size)("),
    ])
    def test_simplified(self, _, name, expected):
        self.assertEqual(_simplified(name), expected)

    def test_rename_dims_simplifies_then_names_sums_as_the_example(self):
        value = ir.Value(name="present.0.encoder.key", shape=ir.Shape(["batch_size", 4, CROSS, 8]))
        reordered = "(sequence_length + past_sequence_length)"
        total = ir.Value(name="present.0.key", shape=ir.Shape(["batch_size", 4, reordered, 8]))
        sums = {frozenset({"past_sequence_length", "sequence_length"}): TOTAL}
        self.assertEqual(_rename_dims(value, sums), {0: "batch_size", 2: "encoder_sequence_length"})
        self.assertEqual(_rename_dims(total, sums)[2], TOTAL)
        self.assertEqual(value.shape[2].value, "encoder_sequence_length")

    def test_an_expression_of_a_static_size_becomes_static(self):
        frames = "((1500*batch_size)//batch_size)"
        value = ir.Value(name="present.0.encoder.key", shape=ir.Shape(["batch_size", 4, frames, 8]))
        self.assertEqual(_rename_dims(value, {}), {0: "batch_size"})
        self.assertEqual(value.shape[2], 1500)


if __name__ == "__main__":
    unittest.main()
