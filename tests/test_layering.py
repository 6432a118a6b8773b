"""One-way layers: optimum_observer stands on its own, legacy_shim routes, the tooling sits on top.

- `optimum_observer` never imports `legacy_shim` (the Optimum API layer above it, tooling
  included) nor optimum-onnx's exporter (`optimum.exporters`): transformers 5 support and users
  without optimum-onnx depend on it. Its one use of optimum is the runtime class validation loads
  an export with by default (`optimum.onnxruntime`, optional), in validation.py.
- `legacy_shim.tooling` (sweep, tiny configs, legacy runner, compare/migrate) depends on both
  packages and nothing depends on it: no module of `optimum_observer` or of legacy_shim outside
  `tooling/` imports it (its commands reach the CLI through entry points; tests may import it).
- No import cycle among the modules of either package (counting function-level imports: a
  lazy import that closes a circle still ties the two modules together).
- A legacy-routed decision, and `main_export`'s routing up to the call into optimum-onnx, import
  no `optimum_observer` module beyond its task list: measured in a fresh interpreter.

The static checks read every module's imports (subpackages, function-level and relative imports,
and `importlib.import_module` / `__import__` of a literal name) from the source; nothing is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from legacy_shim.optimum_compat import legacy_exporter_status

#: Found, not imported (importing it would load torch and transformers).
PACKAGE = Path(importlib.util.find_spec("optimum_observer").origin).parent
SHIM = Path(importlib.util.find_spec("legacy_shim").origin).parent
TOOLING = "legacy_shim.tooling"
FORBIDDEN = ("legacy_shim", "optimum.exporters", "optimum.commands")
#: module file -> imports allowed there despite the rule above (with the reason in the docstring).
ALLOWED = {"validation.py": ("optimum.onnxruntime",)}
#: Everything else under optimum.* is forbidden too, unless allowed above.
OPTIMUM = "optimum"
#: What `import optimum_observer` itself loads (the package's __init__): the task list and the
#: light types it re-exports. A routing decision may load these and nothing more of the package.
TASK_LIST_MODULES = {"optimum_observer", "optimum_observer.errors", "optimum_observer.result", "optimum_observer.tasks"}


def imported_names(source: str, package: str = "", at_run_time: bool = False) -> list[str]:
    """Every module name `source` imports, relative imports resolved against `package` (the
    importing module's package); `from a import b` gives `a` and `a.b` (b may be a submodule).
    `at_run_time`: leave out the imports under `if TYPE_CHECKING:` (annotations only)."""
    names = []
    for node in _walk(ast.parse(source), at_run_time):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
    return names


def _walk(node: ast.AST, at_run_time: bool):
    """`ast.walk`, without the body of `if TYPE_CHECKING:` when `at_run_time`."""
    yield node
    for child in ast.iter_child_nodes(node):
        if at_run_time and isinstance(node, ast.If) and child in node.body and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield from _walk(child, at_run_time)


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(file_name: str, source: str) -> list[str]:
    """What a module of optimum_observer imports that it must not."""
    allowed = ALLOWED.get(file_name, ())
    found = []
    for name in imported_names(source, "optimum_observer"):
        if _matches(name, allowed):
            continue
        if _matches(name, FORBIDDEN) or name.split(".")[0] == OPTIMUM:
            found.append(f"{file_name} imports {name}")
    return found


def tooling_violations(module: str, source: str, package: str) -> list[str]:
    """`module` (not itself tooling) importing legacy_shim.tooling; `package` is its package."""
    if _matches(module, (TOOLING,)):
        return []
    imported = imported_names(source, package)
    return sorted({f"{module} imports {name}" for name in imported if _matches(name, (TOOLING,))})


def _modules(root: Path, package: str) -> list[tuple[str, str, str]]:
    """(module name, its package, source) of every module under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        name = ".".join([package, *parts[:-1]] if is_init else [package, *parts])
        found.append((name, name if is_init else name.rpartition(".")[0], path.read_text()))
    return found


def import_graph(modules: list[tuple[str, str, str]]) -> dict[str, set[str]]:
    """module -> the modules of `modules` it imports when it runs (a package's `__init__` counts as
    the package; imports for annotations only, under `if TYPE_CHECKING:`, are left out)."""
    known = {name for name, _, _ in modules}
    graph = {}
    for name, package, source in modules:
        graph[name] = {i for i in imported_names(source, package, at_run_time=True) if i in known and i != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


class TestLayering(unittest.TestCase):
    def test_optimum_observer_imports_neither_legacy_shim_nor_optimum_onnx(self):
        found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path.name, path.read_text())]
        self.assertEqual(found, [])

    def test_nothing_in_the_product_packages_imports_the_tooling(self):
        modules = _modules(PACKAGE, "optimum_observer") + _modules(SHIM, "legacy_shim")
        self.assertIn(f"{TOOLING}.sweep", [name for name, _, _ in modules])  # the scan reached the tooling
        found = [v for name, package, source in modules for v in tooling_violations(name, source, package)]
        self.assertEqual(found, [])

    def test_no_import_cycle_in_either_package(self):
        for root, package in ((PACKAGE, "optimum_observer"), (SHIM, "legacy_shim")):
            with self.subTest(package=package):
                graph = {
                    name: {i for i in imported if i.split(".")[0] == package and i != package}
                    for name, imported in import_graph(_modules(root, package)).items()
                }
                self.assertEqual(import_cycles(graph), [])

    def test_an_import_cycle_is_caught_however_it_is_spelled(self):
        modules = [
            ("pkg.export", "pkg", "from .routes import ROUTES\n"),
            ("pkg.routes", "pkg", "def runtime():\n    from . import modeling\n"),
            ("pkg.modeling", "pkg", "import importlib\nimportlib.import_module('pkg.export')\n"),
            ("pkg.light", "pkg", "from .export import main_export\nfrom .light2 import z\n"),
            ("pkg.typed", "pkg", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .light import x\n"),
            ("pkg.light2", "pkg", "from .typed import y\n"),
        ]
        self.assertEqual(import_cycles(import_graph(modules)), [["pkg.export", "pkg.modeling", "pkg.routes"]])

    def test_a_violation_is_caught(self):
        source = "def f():\n    from legacy_shim import main_export\n    import optimum.exporters.onnx\n"
        self.assertEqual(
            violations("capture.py", source),
            [
                "capture.py imports legacy_shim",
                "capture.py imports legacy_shim.main_export",
                "capture.py imports optimum.exporters.onnx",
            ],
        )
        self.assertEqual(violations("capture.py", "import optimum.onnxruntime\n"), ["capture.py imports optimum.onnxruntime"])
        self.assertEqual(violations("validation.py", "import optimum.onnxruntime as o\n"), [])
        self.assertEqual(
            violations("cli.py", "from legacy_shim.tooling import sweep\n"),
            ["cli.py imports legacy_shim.tooling", "cli.py imports legacy_shim.tooling.sweep"],
        )

    def test_a_tooling_import_from_a_product_module_is_caught_in_every_spelling(self):
        spellings = {
            "from .tooling import sweep": f"{TOOLING}.sweep",
            "from . import tooling": TOOLING,
            "from .tooling.migration import compare": f"{TOOLING}.migration",
            "import legacy_shim.tooling.legacy_runner": f"{TOOLING}.legacy_runner",
            "import importlib\nimportlib.import_module('legacy_shim.tooling.sweep')": f"{TOOLING}.sweep",
        }
        for source, imported in spellings.items():
            with self.subTest(source=source):
                found = tooling_violations("legacy_shim.router", source + "\n", "legacy_shim")
                self.assertIn(f"legacy_shim.router imports {imported}", found)
        found = tooling_violations("optimum_observer.cli", "from legacy_shim.tooling import commands\n", "optimum_observer")
        self.assertIn("optimum_observer.cli imports legacy_shim.tooling.commands", found)
        # The tooling itself may import its own modules (and the product packages).
        self.assertEqual(tooling_violations(f"{TOOLING}.migration", "from .sweep import versions\n", TOOLING), [])


#: Run in a fresh interpreter: optimum-onnx's own imports first (what the legacy route needs anyway,
#: the baseline), then a legacy-routed decision, then a legacy-routed `main_export` with optimum-onnx's
#: exporter replaced by a stub (its routing only). Prints the modules each step added.
ROUTING_PROBE = r"""
import json, sys
from unittest import mock
import transformers
transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(sys.argv[1])
import optimum.exporters.onnx.model_configs, optimum.exporters.tasks
baseline = set(sys.modules)

import legacy_shim
decision = legacy_shim.decide(legacy_shim.RouteRequest("gpt2", "text-generation-with-past"))
assert decision.exporter.value == "legacy", decision.explain()
decided = set(sys.modules)

import legacy_shim.routes
calls = []
with mock.patch.object(legacy_shim.routes, "upstream_main_export", return_value=lambda **kw: calls.append(kw)):
    routed = legacy_shim.main_export(sys.argv[1], sys.argv[2], task="text-generation-with-past")
assert routed.route.value == "legacy" and len(calls) == 1, routed
exported = set(sys.modules)
print(json.dumps({"decide": sorted(decided - baseline), "main_export": sorted(exported - baseline)}))
"""


@unittest.skipUnless(legacy_exporter_status().available, "no legacy route here: optimum-onnx's exporter cannot run")
class TestLegacyRoutingStaysLight(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as scratch:
            done = subprocess.run(
                [sys.executable, "-c", ROUTING_PROBE, f"{scratch}/model", f"{scratch}/out"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if done.returncode:
            raise AssertionError(done.stderr)
        cls.added = json.loads(done.stdout.splitlines()[-1])

    def test_a_legacy_decision_imports_only_the_observer_task_list(self):
        ours = {m for m in self.added["decide"] if m.split(".")[0] == "optimum_observer"}
        self.assertLessEqual(ours, TASK_LIST_MODULES)

    def test_legacy_routed_main_export_imports_only_the_observer_task_list(self):
        ours = {m for m in self.added["main_export"] if m.split(".")[0] == "optimum_observer"}
        self.assertLessEqual(ours, TASK_LIST_MODULES)

    def test_legacy_routing_loads_neither_the_exporters_nor_the_runtime_classes_nor_the_tooling(self):
        heavy = ("torch.onnx", "onnxscript", "onnx_ir", "onnxruntime", "legacy_shim.modeling", "legacy_shim.runtime", TOOLING)
        for step, added in self.added.items():
            with self.subTest(step=step):
                self.assertEqual([m for m in added if _matches(m, heavy)], [])


if __name__ == "__main__":
    unittest.main()
