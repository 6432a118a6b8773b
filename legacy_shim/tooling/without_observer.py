"""An export checked through optimum-onnx's unchanged runtime class where optimum-observer is not installed.

Takes: an exported directory, the torch model it came from, its task contract.
Gives: :func:`check_without_observer`, the validation's runtime-class checks (the task family's
:meth:`~optimum_observer.families.TaskFamily.check_runtime`, the same functions, not a copy) whose
runtime class runs in another interpreter of this environment, one where optimum-observer cannot
be imported and its hook never ran: `python -I -S` (no .pth file processed, so neither the
editable install nor the hook exists) with site-packages put back on `sys.path`
(:func:`run_without_observer`). That interpreter can import neither this package nor
`legacy_shim`, so the checks run twice here: once recording what they feed the runtime class
(answered meanwhile by the torch model itself), then once more replaying what the unchanged class
returned for those same calls in the other interpreter, where :data:`RUNTIME_SCRIPT` made them.
"""

from __future__ import annotations

import dataclasses
import json
import site
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimum_observer import greedy
from optimum_observer.families import family_of
from optimum_observer.patches import PATCHES, applied, for_model_runs
from optimum_observer.result import ValidationReport
from optimum_observer.tasks import TaskContract
from optimum_observer.validation import ValidationInputs

#: Runs first in that interpreter: site-packages back on the path (its .pth files unprocessed),
#: and a refusal to go on if optimum-observer is importable after all.
_PROLOGUE = """
import sys
sys.path.extend({site_packages!r})
for _name in ("legacy_shim", "optimum_observer"):
    try:
        __import__(_name)
    except ImportError:
        pass
    else:
        raise SystemExit(_name + " is importable: this interpreter has optimum-observer")
"""

#: The runtime side, self-contained (the package is not importable there) and data-driven: each
#: spec (argv[1:], one interpreter for several exports) names the class of `optimum.onnxruntime`,
#: its `from_pretrained` arguments and the calls to make (method, tensors saved in an .npz, other
#: arguments); every tensor returned is saved to another .npz, keyed "{call}.{field}"
#: ("{call}.output" for a bare tensor).
RUNTIME_SCRIPT = """
import json
import numpy as np
import torch
import optimum.onnxruntime

for spec_path in sys.argv[1:]:
    spec = json.loads(open(spec_path).read())
    runtime_class = getattr(optimum.onnxruntime, spec["runtime_class"])
    model = runtime_class.from_pretrained(spec["directory"], **spec["from_pretrained"])
    arrays = np.load(spec["inputs"])
    outputs = {}
    for index, call in enumerate(spec["calls"]):
        tensors = {name: torch.from_numpy(arrays[f"{index}.{name}"]) for name in call["tensors"]}
        returned = getattr(model, call["method"])(**tensors, **call["arguments"])
        fields = {"output": returned} if isinstance(returned, torch.Tensor) else dict(returned.items())
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                outputs[f"{index}.{field}"] = value.numpy()
    np.savez(spec["outputs"], **outputs)
"""


def run_without_observer(
    code: str,
    *arguments: str,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess:
    """Runs `code` (with `sys.argv[1:] == arguments`) in an interpreter of this environment as it
    is without optimum-observer: `-I` (no PYTHONPATH, no current directory on the path), `-S`
    (no .pth file: no hook, no editable install), site-packages on the path."""
    prologue = _PROLOGUE.format(site_packages=site.getsitepackages())
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prologue + code, *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RuntimeWithoutObserverError(RuntimeError):
    """The unchanged runtime class raised in the interpreter without optimum-observer."""


@dataclasses.dataclass
class _Call:
    method: str
    tensors: dict[str, torch.Tensor]
    arguments: dict[str, Any]


class _Recording:
    """Stands for the runtime class on the first pass: records each call, answers with torch's."""

    def __init__(self, model: Any):
        self._model = model
        self.from_pretrained_arguments: dict[str, Any] = {}
        self.calls: list[_Call] = []

    def from_pretrained(self, directory: Path, **arguments: Any) -> _Recording:
        self.from_pretrained_arguments = arguments
        return self

    def _record(self, method: str, arguments: dict[str, Any]) -> None:
        tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
        self.calls.append(_Call(method, tensors, {k: v for k, v in arguments.items() if k not in tensors}))

    def generate(self, **arguments: Any) -> torch.Tensor:
        self._record("generate", arguments)
        tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            return greedy.generate(self._model, tensors, **{k: v for k, v in arguments.items() if k not in tensors})

    def __call__(self, **arguments: Any) -> Any:
        self._record("__call__", arguments)
        with torch.no_grad():
            return self._model(**arguments)


class _Replaying:
    """Stands for the runtime class on the second pass: answers each call with what the unchanged
    class returned for it in the other interpreter."""

    def __init__(self, calls: list[_Call], outputs: dict[str, np.ndarray]):
        self._calls = calls
        self._outputs = outputs
        self._next = 0

    def from_pretrained(self, directory: Path, **arguments: Any) -> _Replaying:
        return self

    def _returned(self, method: str) -> dict[str, torch.Tensor]:
        index, self._next = self._next, self._next + 1
        if index >= len(self._calls) or self._calls[index].method != method:
            raise RuntimeError(f"the checks made other calls on the second pass (call {index}: {method})")
        prefix = f"{index}."
        return {k[len(prefix) :]: torch.from_numpy(v) for k, v in self._outputs.items() if k.startswith(prefix)}

    def generate(self, **arguments: Any) -> torch.Tensor:
        return self._returned("generate")["output"]

    def __call__(self, **arguments: Any) -> Any:
        return types.SimpleNamespace(**self._returned("__call__"))


def check_without_observer(
    directory: Path,
    model: Any,
    contract: TaskContract,
    scratch: Path,
    atol: float = 1e-4,
    tokenizer: Any | None = None,
    feature_extractor: Any | None = None,
    timeout: float = 600.0,
) -> ValidationReport:
    """The runtime-class checks of `directory` through `optimum.onnxruntime`'s class of the task,
    run where optimum-observer is not installed; `scratch` receives the calls and their results.

    Raises:
        RuntimeWithoutObserverError: the class failed to load or to run the export there (the
            message is its last error line).
    """
    family = family_of(contract)
    recording = _Recording(model)
    validation_inputs = ValidationInputs(directory, model, contract, recording, tokenizer, feature_extractor, atol)
    # Torch's reference runs (both passes) as in the export's validation: with the patches the
    # model's own run needs.
    model_runs = for_model_runs(PATCHES, model, model.config.model_type)
    with applied(model_runs):
        family.check_runtime(validation_inputs)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    inputs, outputs, spec_path = scratch / "inputs.npz", scratch / "outputs.npz", scratch / "spec.json"
    np.savez(
        inputs,
        **{f"{i}.{name}": t.detach().cpu().numpy() for i, c in enumerate(recording.calls) for name, t in c.tensors.items()},
    )
    spec = {
        "runtime_class": contract.runtime_class,
        "directory": str(Path(directory).resolve()),
        "from_pretrained": recording.from_pretrained_arguments,
        "calls": [{"method": c.method, "tensors": sorted(c.tensors), "arguments": c.arguments} for c in recording.calls],
        "inputs": str(inputs),
        "outputs": str(outputs),
    }
    spec_path.write_text(json.dumps(spec))
    done = run_without_observer(RUNTIME_SCRIPT, str(spec_path), timeout=timeout)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeWithoutObserverError(lines[-1] if lines else f"exit status {done.returncode}")
    with np.load(outputs) as returned:
        replaying = _Replaying(recording.calls, dict(returned.items()))
    with applied(model_runs):
        generation, runtime = family.check_runtime(dataclasses.replace(validation_inputs, runtime_class=replaying))
    return ValidationReport(atol=atol, calls=[], generation=generation, runtime=runtime)
