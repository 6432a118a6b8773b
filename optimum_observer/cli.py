"""Command line: `optimum-observer export ...` (also `python -m optimum_observer export ...`),
`optimum-observer patches [--model-type T]`, and the subcommands installed through the
`optimum_observer.commands` entry points (:mod:`optimum_observer.commands`; this project's
maintainer tooling adds `sweep`, `compare` and `migrate` that way)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .commands import Command, discover
from .demo import DEMO_MODEL_TYPE, save_tiny_causal_lm
from .errors import ObserverExportError
from .optimization import MAX_PERPLEXITY_RATIO, MIN_COSINE, QUANTIZE_MODES
from .signals import Terminated, termination_raises
from .tasks import supported_tasks

logger = logging.getLogger("optimum_observer")


def _export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model to ONNX by observing a run of it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", help="model id or local directory")
    source.add_argument(
        "--demo",
        action="store_true",
        help=f"export a tiny random {DEMO_MODEL_TYPE} built on the fly (no hub access needed)",
    )
    parser.add_argument("output", type=Path, help="output directory")
    parser.add_argument("--task", default="text-generation-with-past", choices=supported_tasks())
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--no-validate", action="store_true", help="skip replay and generation checks")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--local-files-only", action="store_true")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="apply ONNX Runtime fusions (those correct under left padding) and validate the result again",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE_MODES, default=None, help="quantize the weights (after --optimize)"
    )
    parser.add_argument(
        "--max-perplexity-ratio",
        type=float,
        default=None,
        help="fail when the quantized file's perplexity exceeds this multiple of the fp32 file's "
        f"(default per mode: {', '.join(f'{k} {v}' for k, v in MAX_PERPLEXITY_RATIO.items())})",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        help="encoder tasks: fail when a quantized file's outputs have a cosine to torch's below this "
        f"(default per mode: {', '.join(f'{k} {v}' for k, v in MIN_COSINE.items())})",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")


def _patches_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("patches", help="list the export patches: target, failure fixed, present here")
    parser.add_argument(
        "--model-type",
        help="only the patches an export of this model type gets: the exporter environment's and those "
        "targeting its modeling package (an export selects by the classes the model is built from)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the README's patch table instead")


def _run_patches(args: argparse.Namespace) -> int:
    from . import patches

    if args.markdown:
        print(patches.markdown_table(patches.GROUPS))
        return 0
    listed = patches.PATCHES
    if args.model_type:
        listed = patches.for_model_type(listed, args.model_type)
    for patch in listed:
        if not patch.for_this_transformers:
            present = f"for transformers {patch.transformers} (skipped)"
        else:
            present = "present" if patch.exists() else "MISSING in this transformers (skipped)"
        print(f"{patch.name}  [{patches.mechanism_of(patch)}]  {present}")
        print(f"    target: {patch.target}")
        print(f"    fixes:  {patch.fixes}")
    if args.model_type and not listed:
        print(f"no patch for {args.model_type}")
    return 0


def build_parser(commands: Mapping[str, Command] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `commands` are the installed entry-point commands (:func:`discover` by default)."""
    parser = argparse.ArgumentParser(prog="optimum-observer", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _export_parser(subparsers)
    _patches_parser(subparsers)
    for name, command in (discover() if commands is None else commands).items():
        command.add_arguments(subparsers.add_parser(name, help=command.help))
    return parser


def configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with `verbose`) for this project; the exporter libraries only from WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # onnxruntime: its quantizers log every node they quantize or skip at INFO (hundreds of lines
    # for one `--quantize int4`).
    for noisy in ("onnx_ir", "onnxscript", "torch", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _run_export(args: argparse.Namespace) -> int:
    from .pipeline import export

    with contextlib.ExitStack() as stack:
        model = args.model
        if args.demo:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="optimum-observer-demo-"))
            model = save_tiny_causal_lm(DEMO_MODEL_TYPE, Path(scratch) / "demo-model")
            logger.info("demo: tiny random %s written to %s", DEMO_MODEL_TYPE, model)
        result = export(
            model,
            args.output,
            task=args.task,
            opset=args.opset,
            dtype=args.dtype,
            device=args.device,
            atol=args.atol,
            validate=not args.no_validate,
            trust_remote_code=args.trust_remote_code,
            local_files_only=args.local_files_only,
            optimize=args.optimize,
            quantize=args.quantize,
            max_perplexity_ratio=args.max_perplexity_ratio,
            min_cosine=args.min_cosine,
        )
    print(f"exported {result.model_type} for {result.task} to {result.output_dir}: {', '.join(result.onnx_files)}")
    if result.validation is not None:
        print(result.validation.table())
    print("patches applied: " + (", ".join(result.patches) or "none"))
    if result.post_processing is not None:
        post = result.post_processing
        fusions = ", ".join(f"{name} {count}" for name, count in post.fusions.items())
        print(f"optimized: {fusions or 'no'}; quantized: {post.quantized or 'no'}")
    print("stage timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = discover()
    args = build_parser(commands).parse_args(argv)
    if args.command == "patches":
        return _run_patches(args)
    if args.command in commands:
        return commands[args.command].run(args)
    configure_logging(args.verbose)
    try:
        with termination_raises():
            return _run_export(args)
    except ObserverExportError as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (Terminated, KeyboardInterrupt) as error:
        print(
            f"error: export {str(error) or 'interrupted'}; the output directory is the previous one or the "
            "new complete one, never a mix",
            file=sys.stderr,
        )
        return error.code if isinstance(error, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
