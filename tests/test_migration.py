"""compare and migrate: a legacy-supported type migrates only when both exports agree."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from legacy_shim import registry
from legacy_shim.tooling import migration

TASK = "text-generation-with-past"


class TestCompareAndMigrate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.comparison = migration.compare("llama", TASK)

    def setUp(self):
        scratch = tempfile.TemporaryDirectory()
        self.addCleanup(scratch.cleanup)
        self.registry = Path(scratch.name) / "migrated.json"
        shutil.copy(registry.REGISTRY_PATH, self.registry)

    def test_compare_reports_both_exports_side_by_side(self):
        c = self.comparison
        self.assertTrue(c.parity, c.table())
        self.assertEqual(c.legacy.inputs, c.observer.inputs)
        self.assertEqual(c.legacy.outputs, c.observer.outputs)
        self.assertLessEqual(c.max_diff_between, c.atol)
        for side in (c.legacy, c.observer):
            self.assertGreater(side.onnx_bytes, 10_000)
            self.assertGreater(side.prefill_ms, 0)
            self.assertGreater(side.decode_ms, 0)
        table = c.table()
        for row in ("graph inputs", "ONNX size", "max |logits - torch|", "ORT decode step", "parity: yes"):
            self.assertIn(row, table)

    def test_migrate_writes_the_entry_with_its_evidence(self):
        entry = migration.migrate("llama", TASK, registry_path=self.registry, comparison=self.comparison)

        written = json.loads(self.registry.read_text())
        self.assertIn(json.loads(entry.to_json()), written)
        self.assertEqual((entry.model_type, entry.tasks), ("llama", (TASK,)))
        self.assertIn("greedy tokens of both exports equal torch's", entry.evidence)
        self.assertIn("transformers", entry.evidence)
        self.assertIsNotNone(registry.load_registry(self.registry).find("llama", TASK))

    def test_migrate_is_refused_without_parity_and_leaves_the_registry_unchanged(self):
        before = self.registry.read_text()
        diverging = dataclasses.replace(
            self.comparison, observer=dataclasses.replace(self.comparison.observer, tokens=[[[0] * 8]])
        )
        self.assertFalse(diverging.parity)
        with self.assertRaises(migration.MigrationRefused) as refused:
            migration.migrate("llama", TASK, registry_path=self.registry, comparison=diverging)
        self.assertIn("parity: NO", str(refused.exception))
        self.assertEqual(self.registry.read_text(), before)


class TestCommandLine(unittest.TestCase):
    def test_optimum_observer_forwards_migrate_to_legacy_shim(self):
        completed = subprocess.run(
            [sys.executable, "-m", "optimum_observer", "migrate", "--help"],
            capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True,
        )  # fmt: skip
        self.assertIn("--registry", completed.stdout)
