"""One-way layers: optimum_observer stands on its own.

`optimum_observer` never imports `legacy_shim` (the Optimum API layer above it) nor optimum-onnx's
exporter (`optimum.exporters`): transformers 5 support and users without optimum-onnx depend on
it. Its one use of optimum is the runtime class validation loads an export with by default
(`optimum.onnxruntime`, optional), in validation.py. The check reads every module's imports
(subpackages such as `patches/` and function-level imports included) from the source (nothing
is imported).
"""

from __future__ import annotations

import ast
import importlib.util
import unittest
from pathlib import Path

#: Found, not imported (importing it would load torch and transformers).
PACKAGE = Path(importlib.util.find_spec("optimum_observer").origin).parent
FORBIDDEN = ("legacy_shim", "optimum.exporters", "optimum.commands")
#: module file -> imports allowed there despite the rule above (with the reason in the docstring).
ALLOWED = {"validation.py": ("optimum.onnxruntime",)}
#: Everything else under optimum.* is forbidden too, unless allowed above.
OPTIMUM = "optimum"


def imported_names(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def violations(file_name: str, source: str) -> list[str]:
    allowed = ALLOWED.get(file_name, ())
    found = []
    for name in imported_names(source):
        if any(name == a or name.startswith(a + ".") for a in allowed):
            continue
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN) or name.split(".")[0] == OPTIMUM:
            found.append(f"{file_name} imports {name}")
    return found


class TestLayering(unittest.TestCase):
    def test_optimum_observer_imports_neither_legacy_shim_nor_optimum_onnx(self):
        found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path.name, path.read_text())]
        self.assertEqual(found, [])

    def test_a_violation_is_caught(self):
        source = "def f():\n    from legacy_shim import main_export\n    import optimum.exporters.onnx\n"
        self.assertEqual(
            violations("capture.py", source),
            ["capture.py imports legacy_shim", "capture.py imports optimum.exporters.onnx"],
        )
        self.assertEqual(violations("capture.py", "import optimum.onnxruntime\n"), ["capture.py imports optimum.onnxruntime"])
        self.assertEqual(violations("validation.py", "import optimum.onnxruntime as o\n"), [])
