"""Task contracts: which forward argument and output field carry each graph input and output."""

from __future__ import annotations

import inspect
import unittest

from optimum_observer.tasks import CACHE, get_task

DECODER = get_task("text-generation-with-past").graphs[0]
SEQ2SEQ_WITH_PAST = get_task("text2text-generation-with-past").graphs[2]


def _forward_4_57(input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
    """transformers 4.57's causal-LM forward."""


def _forward_5(input_ids=None, attention_mask=None, cache=None, use_cache=None):
    """transformers 5's: the cache argument is `cache` (`past_key_values` an alias until 5.40)."""


class TestCacheArgument(unittest.TestCase):
    def _past(self, graph):
        return next(i for i in graph.inputs if i.name == "past_key_values")

    def test_the_cache_is_passed_as_the_argument_forward_takes(self):
        for graph in (DECODER, SEQ2SEQ_WITH_PAST):
            past = self._past(graph)
            self.assertEqual(past.argument_for(inspect.signature(_forward_4_57).parameters), "past_key_values")
            self.assertEqual(past.argument_for(inspect.signature(_forward_5).parameters), CACHE)

    def test_the_cache_is_read_from_the_field_forward_returns(self):
        present = next(o for o in DECODER.outputs if o.name == "present")
        cache = object()
        self.assertIs(present.read({"logits": None, "past_key_values": cache}), cache)
        self.assertIs(present.read({"logits": None, CACHE: cache}), cache)
