"""Maintainer tooling: the coverage sweep and the compare/migrate workflow.

It depends on both product packages (the observer stack and legacy_shim's router, runtime classes
and optimum-onnx access); nothing in `optimum_observer` or in legacy_shim's product modules imports
it (tests/test_layering.py checks both). Its commands reach `optimum-observer` through the
`optimum_observer.commands` entry points (:mod:`legacy_shim.tooling.commands`).

- :mod:`~legacy_shim.tooling.sweep`: every model type of a task exported both ways, docs/coverage.md.
- :mod:`~legacy_shim.tooling.tiny_configs`: the sweep's tiny random model of any model type.
- :mod:`~legacy_shim.tooling.without_observer`: the runtime check in an interpreter without
  optimum-observer (the sweep's level (a)).
- :mod:`~legacy_shim.tooling.legacy_runner`: the sweep's legacy path, in its own process.
- :mod:`~legacy_shim.tooling.migration`: `compare` and `migrate` one model type.
"""
