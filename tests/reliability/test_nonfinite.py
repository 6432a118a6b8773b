"""A NaN or inf anywhere validation compares is a failure, never "ok" (issue 13, item 1)."""

from __future__ import annotations

import pytest
import torch
import transformers

import optimum_observer
from optimum_observer import ObserverExportError, Stage


def _poisoned_checkpoint(tiny_llama, directory, value: float):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = value
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("value", [float("nan"), pytest.param(float("inf"), marks=pytest.mark.slow)])
def test_a_model_with_one_non_finite_weight_fails_validation(tiny_llama, tmp_path, value):
    source = _poisoned_checkpoint(tiny_llama, tmp_path / "poisoned", value)
    with pytest.raises(ObserverExportError) as caught:
        optimum_observer.export(source, tmp_path / "out")
    error = caught.value
    assert (error.model_type, error.stage) == ("llama", Stage.VALIDATION)
    assert "NaN or inf in the outputs of torch" in str(error)
    assert "non-finite weights" in error.remedy
    assert not (tmp_path / "out").exists()


def test_nan_only_in_onnx_runtime_outputs_is_named():
    from optimum_observer.validation import nonfinite_sides

    want = torch.zeros(2, 3, 5)
    have = want.clone()
    have[1, 2, 4] = float("nan")
    assert nonfinite_sides(want, have) == ("ONNX Runtime",)


def test_nan_at_positions_the_mask_hides_is_not_compared():
    from optimum_observer.validation import nonfinite_sides

    want = torch.zeros(2, 3, 5)
    have = want.clone()
    have[0, 0] = float("nan")  # left padding of row 0
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert nonfinite_sides(want, have, mask) == ()
