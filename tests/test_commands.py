"""Subcommands installed through the `optimum_observer.commands` entry points reach `optimum-observer`."""

from __future__ import annotations

import argparse
import contextlib
import io
import unittest
from importlib.metadata import EntryPoint
from unittest import mock

from optimum_observer import cli, commands
from optimum_observer.commands import ENTRY_POINT_GROUP, Command

RECORDED: list[argparse.Namespace] = []


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, required=True)


#: A command the tests install, by entry point (this module's name) or as already discovered.
ECHO = Command(help="record the arguments", add_arguments=_add_arguments, run=lambda args: RECORDED.append(args) or 7)


def _entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


class TestCommands(unittest.TestCase):
    def test_the_tooling_commands_are_installed(self):
        found = commands.discover()
        self.assertLessEqual({"sweep", "compare", "migrate"}, set(found))
        self.assertTrue(all(isinstance(command, Command) for command in found.values()))

    def test_the_tooling_commands_keep_their_arguments(self):
        parser = cli.build_parser()
        sweep = parser.parse_args(["sweep", "--task", "feature-extraction", "--types", "bert,gpt2", "--jobs", "2"])
        self.assertEqual((sweep.task, sweep.model_types, sweep.jobs), ("feature-extraction", "bert,gpt2", 2))
        compare = parser.parse_args(["compare", "--model-type", "llama", "--task", "text-generation"])
        self.assertEqual((compare.model_type, compare.task), ("llama", "text-generation"))
        migrate = parser.parse_args(["migrate", "llama", "--since", "0.2.0"])
        self.assertEqual((migrate.model_type, migrate.since), ("llama", "0.2.0"))
        self.assertEqual(migrate.task, "text-generation-with-past")

    def test_main_runs_a_discovered_command_with_its_parsed_arguments(self):
        RECORDED.clear()
        with mock.patch.object(cli, "discover", return_value={"echo": ECHO}):
            self.assertEqual(cli.main(["echo", "--size", "3"]), 7)
        self.assertEqual([args.size for args in RECORDED], [3])

    def test_a_command_that_fails_to_load_is_skipped_with_a_warning(self):
        points = [_entry_point("broken", "no_such_module_here:COMMAND"), _entry_point("echo", f"{__name__}:ECHO")]
        with mock.patch.object(commands.importlib.metadata, "entry_points", return_value=points):
            with self.assertLogs("optimum_observer.commands", "WARNING") as logs:
                found = commands.discover()
        self.assertEqual(list(found), ["echo"])
        self.assertIn("'broken'", logs.output[0])

    def test_an_entry_point_that_is_not_a_command_is_skipped(self):
        with mock.patch.object(
            commands.importlib.metadata, "entry_points", return_value=[_entry_point("odd", f"{__name__}:RECORDED")]
        ):
            with self.assertLogs("optimum_observer.commands", "WARNING"):
                self.assertEqual(commands.discover(), {})

    def test_help_lists_the_installed_commands(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            cli.build_parser().parse_args(["--help"])
        for name in ("export", "patches", "sweep", "compare", "migrate"):
            self.assertIn(name, out.getvalue())


if __name__ == "__main__":
    unittest.main()
