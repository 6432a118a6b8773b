"""The tooling's `optimum-observer` subcommands: `sweep`, `compare`, `migrate`.

Each is an :class:`optimum_observer.commands.Command` named in pyproject.toml's
`optimum_observer.commands` entry points, so that `optimum_observer.cli` finds them without
importing this package. Loading this module is cheap (the CLI loads it for every command, `export`
included): the sweep and the migration modules are imported when their command builds its
arguments or runs.
"""

from __future__ import annotations

import argparse
from optimum_observer.commands import Command

def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from .sweep import add_sweep_arguments

    add_sweep_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")


def _run_sweep(args: argparse.Namespace) -> int:
    from optimum_observer.cli import configure_logging

    from .sweep import run_from_args

    configure_logging(args.verbose)
    return run_from_args(args)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    from .migration import compare_arguments

    compare_arguments(parser)


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .migration import migrate_arguments

    migrate_arguments(parser)


def _run_compare(args: argparse.Namespace) -> int:
    from .migration import run_compare

    return run_compare(args)


def _run_migrate(args: argparse.Namespace) -> int:
    from .migration import run_migrate

    return run_migrate(args)


SWEEP = Command(
    help="export a tiny model of every model type of a task both ways and record coverage",
    add_arguments=_sweep_arguments,
    run=_run_sweep,
)
COMPARE = Command(
    help="export one model type with both exporters and report side by side",
    add_arguments=_compare_arguments,
    run=_run_compare,
)
MIGRATE = Command(
    help="move a model type to the observer in legacy_shim's migration registry when compare shows parity",
    add_arguments=_migrate_arguments,
    run=_run_migrate,
)
