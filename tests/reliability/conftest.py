"""Shared fixtures of the reliability suite: one tiny llama checkpoint and one observer export.

The llama has grouped-query attention (2 key/value heads of 4) with head_dim == hidden // heads
(optimum-onnx's unchanged runtime sizes llama's cache from hidden // heads) and one layer, to
keep every export of the suite to a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_helpers import SHARED_EXPORT_OPSET, TINY_LLAMA
from tiny_models import save_causal_lm


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_causal_lm("llama", tmp_path_factory.mktemp("checkpoints") / "llama", **TINY_LLAMA)


@pytest.fixture(scope="session")
def two_threads(tiny_llama, tmp_path_factory):
    """Two exports at once in two threads of this process: one of the checkpoint (at
    SHARED_EXPORT_OPSET; the suite inspects its output), one of a loaded model in training mode."""
    import threading

    import transformers

    import optimum_observer
    from failure_case import patched_attributes

    output = tmp_path_factory.mktemp("threads")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    originals = patched_attributes()
    start = threading.Barrier(2)
    results, errors = {}, {}

    def work(name, source, **kwargs):
        start.wait()
        try:
            results[name] = optimum_observer.export(source, output / name, validate=False, **kwargs)
        except BaseException as error:  # noqa: B036 - recorded for the assertions
            errors[name] = error

    threads = [
        threading.Thread(target=work, args=("path", tiny_llama), kwargs=dict(opset=SHARED_EXPORT_OPSET)),
        threading.Thread(target=work, args=("model", model)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(output=output, model=model, originals=originals, results=results, errors=errors)


@pytest.fixture(scope="session")
def llama_export(two_threads) -> Path:
    """An observer export of the tiny llama, not validated (only inspected)."""
    if "path" in two_threads["errors"]:
        raise two_threads["errors"]["path"]
    return two_threads["output"] / "path"
