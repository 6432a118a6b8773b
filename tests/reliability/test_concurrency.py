"""Two exports in two threads of one process, and a caller's model given back as it was
(issue 13, items 2 and 12). The exports run once, in the `two_threads` fixture (conftest)."""

from __future__ import annotations

import optimum_observer
import optimum_observer.pipeline
from failure_case import patched_attributes
from optimum_observer.cache_pytree import is_registered, registered_cache_classes


def test_both_exports_succeed(two_threads):
    assert two_threads["errors"] == {}
    for name in ("path", "model"):
        assert (two_threads["output"] / name / "model.onnx").is_file()


def test_global_state_is_restored_after_both(two_threads):
    assert [c.__name__ for c in registered_cache_classes() if is_registered(c)] == []
    assert patched_attributes() == two_threads["originals"]


def test_the_callers_model_is_back_in_training_mode(two_threads):
    model = two_threads["model"]
    assert model.training and all(module.training for module in model.modules())


def test_the_callers_model_has_no_instance_forward_left(two_threads):
    assert "forward" not in vars(two_threads["model"])


def test_the_export_lock_is_reentrant():
    with optimum_observer.pipeline.EXPORT_LOCK:
        assert optimum_observer.pipeline.EXPORT_LOCK.acquire(blocking=False)
        optimum_observer.pipeline.EXPORT_LOCK.release()
