"""Every patch the shim makes is entered and left in one `with` block and restored, also on errors."""

from __future__ import annotations

import argparse
import types
import unittest

from optimum.commands.export.onnx import ONNXExportCommand

from legacy_shim.cli import exporter_flag
from legacy_shim.patching import swapped_attribute


class Base:
    inherited = "base"


class Owner(Base):
    @staticmethod
    def static():
        return "static"


class TestSwappedAttribute(unittest.TestCase):
    def test_restores_a_staticmethod_as_a_staticmethod(self):
        original = vars(Owner)["static"]
        with swapped_attribute(Owner, "static", staticmethod(lambda: "patched")):
            self.assertEqual(Owner().static(), "patched")
        self.assertIs(vars(Owner)["static"], original)
        self.assertEqual(Owner().static(), "static")

    def test_removes_an_override_of_an_inherited_attribute(self):
        with swapped_attribute(Owner, "inherited", "patched"):
            self.assertEqual(Owner.inherited, "patched")
        self.assertNotIn("inherited", vars(Owner))
        self.assertEqual(Owner.inherited, "base")

    def test_restores_a_module_attribute_after_an_exception(self):
        module = types.ModuleType("m")
        module.main_export = "original"
        with self.assertRaises(RuntimeError), swapped_attribute(module, "main_export", "patched"):
            raise RuntimeError("boom")
        self.assertEqual(module.main_export, "original")


class TestExporterFlagScope(unittest.TestCase):
    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        ONNXExportCommand.parse_args(parser)
        return parser

    def test_the_flag_exists_only_inside_the_block(self):
        before = dict(vars(ONNXExportCommand))
        self.assertNotIn("--exporter", self.parser().format_help())
        with exporter_flag():
            self.assertIn("--exporter", self.parser().format_help())
            self.assertIsNot(vars(ONNXExportCommand)["run"], before["run"])
        self.assertNotIn("--exporter", self.parser().format_help())
        self.assertIs(vars(ONNXExportCommand)["parse_args"], before["parse_args"])
        self.assertIs(vars(ONNXExportCommand)["run"], before["run"])

    def test_restored_after_an_exception(self):
        before = dict(vars(ONNXExportCommand))
        with self.assertRaises(RuntimeError), exporter_flag():
            raise RuntimeError("boom")
        self.assertIs(vars(ONNXExportCommand)["parse_args"], before["parse_args"])
        self.assertIs(vars(ONNXExportCommand)["run"], before["run"])
