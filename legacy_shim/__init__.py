"""Optimum's public ONNX API, unchanged, with a per-(model_type, task) router behind it.

`main_export`, the `ORTModelFor*` classes and `optimum-cli export onnx --exporter` send each
pair to optimum-onnx (the legacy exporter, unchanged) or to the observer stack
(`optimum_observer`); see `docs/legacy_shim.md`.

Attributes load on first use: this package is imported at interpreter start by the
unchanged-code hook, which must not pull in torch or optimum.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "main_export": ".export",
    "ORTModelForCausalLM": ".modeling",
    "ORTModelForFeatureExtraction": ".modeling",
    "ORTModelForSequenceClassification": ".modeling",
    "ORTModelForSeq2SeqLM": ".modeling",
    "ORTModelForSpeechSeq2Seq": ".modeling",
    "ORTModelForImageTextToText": ".modeling",
    "Decision": ".router",
    "DecisionSource": ".router",
    "EXPORTER_ENV_VAR": ".router",
    "Exporter": ".router",
    "RouteRequest": ".router",
    "decide": ".router",
    "explain": ".router",
    "MigrationEntry": ".registry",
    "RegistryError": ".registry",
    "add_migration": ".registry",
    "load_registry": ".registry",
    "RouteResult": ".routes",
    "legacy_exporter_status": ".optimum_compat",
    "ShimError": ".errors",
    "DISABLE_ENV_VAR": "._hook",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
