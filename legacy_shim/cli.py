"""`optimum-cli export onnx --exporter {auto,legacy,observer}`.

optimum-cli builds its parsers from the command classes that its `optimum.commands.register`
modules list, and two commands may not share the name `onnx` (argparse: "conflicting subparser").
So instead of registering a second `onnx` command, :func:`exporter_flag` extends optimum-onnx's
`ONNXExportCommand` for the duration of a `with` block: its parser gains `--exporter` and
`--verbose`, and its unchanged `run` sees a routed `main_export`. Our register module enters
that block for the life of the optimum-cli process, since optimum-cli imports the register
modules, then parses and runs, with no hook around the run.

Errors: any failure exits with status 1 and one message on stderr (`--verbose` shows the
traceback), and leaves no finished-looking output directory behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .patching import swapped_attribute
from .router import Exporter

logger = logging.getLogger(__name__)

EXPORTER_HELP = (
    "auto: optimum-onnx if it supports the model type and task (and the type is not migrated), "
    "else optimum-observer; legacy: always optimum-onnx; observer: always optimum-observer."
)


def add_exporter_arguments(parser) -> None:
    parser.add_argument(
        "--exporter", choices=[e.value for e in Exporter], default=Exporter.AUTO.value, help=EXPORTER_HELP
    )
    parser.add_argument("--verbose", action="store_true", help="On failure, show the full traceback.")


def main_export_from_cli(*args, cli_flag: str, **kwargs) -> None:
    """`main_export` as `ONNXExportCommand.run` calls it, with the `--exporter` value as the CLI override."""
    from .export import bind_arguments, run_export

    arguments, kwargs_shapes, exporter = bind_arguments(args, kwargs)
    run_export(arguments, kwargs_shapes, argument=exporter, cli_flag=cli_flag)


@contextlib.contextmanager
def no_partial_output(output: Path) -> Iterator[None]:
    """On failure, removes what the failed export wrote, so nothing looks like a finished export."""
    existed = output.exists()
    before = set(output.iterdir()) if output.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(output, ignore_errors=True)
        elif output.is_dir():
            for entry in set(output.iterdir()) - before:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def decision_logging() -> Iterator[None]:
    """Shows the router's decision and reason on stderr during a CLI run."""
    shim_logger = logging.getLogger("legacy_shim")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level = shim_logger.level
    shim_logger.addHandler(handler)
    shim_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        shim_logger.removeHandler(handler)
        shim_logger.setLevel(previous_level)


def _error_message(error: BaseException, model: str) -> str:
    # KeyError's str() is the repr of its argument; show the text itself.
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    message = f"{type(error).__name__}: {text}"
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        # Upstream only says the string is not a valid Hub repo id.
        message = f"the model directory {model} does not exist ({message})"
    return message


def _run_routed(self, upstream_run) -> None:
    import optimum.exporters.onnx as onnx_exporters

    from .optimum_compat import import_optimum_modules

    # On a transformers optimum-onnx does not support (5.x), its exporter module imports names that
    # are gone; lent for the import, so that the routed command runs (the observer takes every pair).
    import_optimum_modules(("optimum.exporters.onnx.__main__",))
    routed = functools.partial(main_export_from_cli, cli_flag=self.args.exporter)
    try:
        with (
            decision_logging(),
            no_partial_output(Path(self.args.output)),
            swapped_attribute(onnx_exporters, "main_export", routed),
        ):
            upstream_run(self)
    except Exception as e:
        if self.args.verbose:
            raise
        print(f"optimum-cli export onnx: error: {_error_message(e, self.args.model)}", file=sys.stderr)
        print("(run again with --verbose for the full traceback)", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def exporter_flag(command_class: type | None = None) -> Iterator[type]:
    """Within the block, `optimum-cli export onnx` has `--exporter`/`--verbose` and routes its export.

    Args:
        command_class: the command to extend; optimum-onnx's `ONNXExportCommand` by default.
    """
    if command_class is None:
        from optimum.commands.export.onnx import ONNXExportCommand as command_class

    upstream_parse_args = command_class.parse_args
    upstream_run = command_class.run

    def parse_args(parser) -> None:
        upstream_parse_args(parser)
        add_exporter_arguments(parser)

    def run(self) -> None:
        _run_routed(self, upstream_run)

    with (
        swapped_attribute(command_class, "parse_args", staticmethod(parse_args)),
        swapped_attribute(command_class, "run", run),
    ):
        yield command_class
