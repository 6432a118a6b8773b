"""Subcommands other packages add to `optimum-observer`, found through an entry-point group.

Takes: the installed distributions' entry points of the group `optimum_observer.commands`, each
naming a :class:`Command`. Gives: :func:`discover`, `{name: Command}`, which `optimum_observer.cli`
turns into subcommands (`optimum-observer NAME ...`, listed by `--help`).

This is how the maintainer tooling (`legacy_shim.tooling`: `sweep`, `compare`, `migrate`) reaches
the command line while the dependency stays one-way: the tooling imports `optimum_observer`, never
the reverse. This project declares its own commands in pyproject.toml
(`[project.entry-points."optimum_observer.commands"]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "optimum_observer.commands"


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its `--help` line, the arguments it adds to its parser, and what runs it.

    `add_arguments` runs for every invocation of the CLI (it builds the parser): keep its imports light.
    `run` gets the parsed arguments and returns the exit status.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def discover(group: str = ENTRY_POINT_GROUP) -> dict[str, Command]:
    """The commands installed in `group`, by name; one that fails to load is skipped with a warning."""
    commands = {}
    for entry_point in importlib.metadata.entry_points(group=group):
        try:
            command = entry_point.load()
        except Exception as error:  # a broken plugin must not take `optimum-observer export` down with it
            logger.warning("command %r (%s) could not be loaded: %s", entry_point.name, entry_point.value, error)
            continue
        if not isinstance(command, Command):
            logger.warning("command %r (%s) is not a Command", entry_point.name, entry_point.value)
            continue
        commands[entry_point.name] = command
    return commands
