"""Runs that cannot show the export what the runtime will feed are refused or warned about,
naming the cause, with validation or without (issue 13, item 9)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import optimum_observer
from optimum_observer import ObserverExportError, Stage
from optimum_observer import capture as capture_stage
from optimum_observer.cache_pytree import registered_caches
from optimum_observer.tasks import get_task


def capture(*args):
    with registered_caches():
        return capture_stage.capture(*args)


def _generate(batch: int, length: int, new_tokens: int):
    def run(model):
        ids = torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(0))
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    return run


def _forward_once(model):
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("validate", [False, True])
def test_one_length_for_a_decoder_is_refused_naming_the_axis_and_the_fix(tiny_llama, tmp_path, validate):
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(tiny_llama, tmp_path / "out", run=_forward_once, validate=validate)
    error = caught.value
    assert (error.model_type, error.stage) == ("llama", Stage.SYNTHESIS)
    assert "input_ids of one length (7)" in str(error)
    assert "two batch sizes and two prompt lengths" in error.remedy
    assert not (tmp_path / "out").exists()


def test_a_with_past_task_whose_run_read_no_cache_is_refused(tiny_llama, tmp_path):
    def two_lengths_without_cache(model):
        for length in (4, 6):
            ids = torch.randint(3, 200, (2, length))
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)

    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(tiny_llama, tmp_path / "out", run=two_lengths_without_cache, validate=False)
    assert caught.value.stage is Stage.SYNTHESIS
    assert "the run made 0, so the graph would have no past inputs" in str(caught.value)
    assert "max_new_tokens=3" in caught.value.remedy


def test_one_cached_step_is_refused_as_a_fixed_past_length(tiny_llama, tmp_path):
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(tiny_llama, tmp_path / "out", run=_generate(2, 5, 2), validate=False)
    assert "the run made 1, so the graph would have its past length fixed" in str(caught.value)


@pytest.fixture(scope="module")
def short_position_model(tiny_llama):
    config = transformers.AutoConfig.from_pretrained(tiny_llama, max_position_embeddings=16)
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, config=config).eval()


@pytest.mark.parametrize("prompt, warned", [(20, True), (8, False)])
def test_a_run_past_the_position_limit_is_warned_about(short_position_model, caplog, prompt, warned):
    with caplog.at_level(logging.WARNING, "optimum_observer.capture"):
        capture(short_position_model, get_task("text-generation-with-past"), "llama", _generate(2, prompt, 3))
    message = f"fed {prompt + 2} positions, more than the model's max_position_embeddings (16)"
    assert (message in caplog.text) is warned


def test_one_batch_size_is_warned_about(tiny_llama, caplog):
    from optimum_observer.capture import check_observed_sizes

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    contract = get_task("text-generation-with-past")

    def one_batch_two_lengths(model):
        _generate(1, 5, 3)(model)
        _generate(1, 8, 3)(model)

    captures = capture(model, contract, "llama", one_batch_two_lengths)
    with caplog.at_level(logging.WARNING, "optimum_observer.capture"):
        check_observed_sizes(captures, contract, "llama")
    assert "the run showed one batch size (1)" in caplog.text
