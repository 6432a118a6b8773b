"""Packaging: write the output directory, and publish it atomically.

Takes: the named `torch.onnx.ONNXProgram`, the model (for its configs) and the tokenizer.
Gives: a staging directory next to the destination holding the task's ONNX files (`model.onnx`,
or `encoder_model.onnx` / `decoder_model.onnx` / `decoder_with_past_model.onnx`; each with
`<file>_data` when its weights pass 2 GB, as optimum writes them), `config.json`,
`generation_config.json`, and the tokenizer or feature extractor files.

`config.json` is the model's config plus, where it lacks them, the two sizes optimum-onnx's
`ORTModelForCausalLM.__init__` reads to size its first step's empty cache, `hidden_size` and
`num_attention_heads` (:func:`runtime_size_attributes`): without them it stops with
`AttributeError: 'MambaConfig' object has no attribute 'num_attention_heads'` or `'GotOcr2Config'
object has no attribute 'hidden_size'` before it can load the file. Each is the text
sub-config's (what the decoder is built with: got_ocr2's language model); for a model without
attention (Mamba), `num_attention_heads` is 1. The cache inputs take an empty tensor of any head
count and head size (:mod:`optimum_observer.portable_cache`), so these values only have to
exist. transformers keeps unknown config keys as attributes, which the model classes do not read.

:func:`check_destination` runs before any work: OUT an existing file, a parent that cannot be
written, a directory inside OUT named like a file the export writes all fail at once.

:func:`staged_output` publishes the staging directory only when the whole block (validation
included) succeeds, and removes it otherwise. Publishing is atomic at directory level:

* the staging directory `.OUT.partial-<pid>-<hex>` is created with mode 0o777 minus the umask,
  as optimum's exporter creates its directories;
* into an existing OUT, the entries the export does not write are hard-linked (copied where a
  link is impossible) into the staging directory, which takes OUT's mode and is exchanged with
  OUT by one `renameat2(RENAME_EXCHANGE)`; the previous export, now under the staging name, is
  removed. Where the exchange is unavailable, OUT is renamed aside to
  `.OUT.previous-<pid>-<hex>` and the staging directory takes its place;
* publishes into one parent directory are serialised by `flock` on that directory, so
  processes exporting into one OUT all succeed, the last one winning;
* termination signals are deferred during those renames (:mod:`optimum_observer.signals`).

So after a kill at any moment OUT is the previous complete directory or the new complete one
(with the fallback, a SIGKILL between its two renames leaves OUT absent and its previous version
aside). Staging and aside directories carry their owner's pid: the next export into the same OUT
removes those whose process is gone, and puts back an aside OUT that was never replaced. A
directory inside OUT is never deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import json

import onnx
import onnx_ir as ir
import torch

from . import signals
from .errors import ObserverExportError, Stage
from .loading import sub_config_home

try:
    import fcntl
except ImportError:  # not POSIX: publishes are not serialised between processes
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
#: protobuf cannot hold a model of 2 GB or more in one file.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3
#: Kinds of directory an export keeps beside OUT: its staging directory, and OUT set aside.
PARTIAL, PREVIOUS = "partial", "previous"
_OWNED = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{PARTIAL}|{PREVIOUS})-(?P<pid>\d+)-[0-9a-f]+$")
#: Files every export writes, beside the task's ONNX files: checked before any work.
CONFIG_FILES = ("config.json",)
#: Key of the ONNX model metadata entry every observer export carries (value: the package's
#: version): how post-processing tools tell an observer graph (torch.export's operators, names
#: and scopes) from a legacy one (`legacy_shim`'s ORTOptimizer routing reads it).
EXPORTER_METADATA_KEY = "optimum_observer.version"


def _owned_name(destination: Path, kind: str) -> str:
    return f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _remedy(destination: Path, error: OSError) -> str:
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (
            f"free space on the filesystem holding {destination.parent} (the export needs about the "
            "size of the model's weights there), or export into a directory on another filesystem; "
            "the output directory is unchanged."
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"export into a directory you can write to: the export is staged beside {destination.name} "
            f"in {destination.parent}, so that directory must be writable."
        )
    if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
        return (
            f"another program created {destination} while this export published it; run the export "
            "again (it then replaces that directory's files atomically)."
        )
    return "check the output path and its filesystem; the output directory is unchanged."


def write_error(model_type: str, destination: Path, error: OSError) -> ObserverExportError:
    """The export error for an OSError while writing or publishing `destination`."""
    where = f" ({error.filename})" if error.filename else ""
    return ObserverExportError(
        model_type,
        Stage.PACKAGING,
        f"writing {destination} failed: {error.strerror or error}{where}",
        _remedy(destination, error),
    )


@contextlib.contextmanager
def writing(model_type: str, destination: str | os.PathLike) -> Iterator[None]:
    """Turns an OSError of the block (a full disk while saving) into an export error."""
    try:
        yield
    except OSError as error:
        raise write_error(model_type, Path(destination).resolve(), error) from error


def _output_error(model_type: str, reason: str, remedy: str) -> ObserverExportError:
    return ObserverExportError(model_type, Stage.PACKAGING, reason, remedy)


def _refuse_shadowing_directories(destination: Path, file_names: Iterable[str], model_type: str) -> None:
    """A directory of the user's inside OUT named like a file the export writes is never replaced."""
    for name in file_names:
        target = destination / name
        if target.is_dir() and not target.is_symlink():
            raise _output_error(
                model_type,
                f"{target} is a directory, and the export writes a file of that name",
                "move or rename that directory (an export never deletes a directory it did not "
                "write), or export into another directory.",
            )


def check_destination(output_dir: str | os.PathLike, model_type: str, file_names: Iterable[str] = ()) -> Path:
    """Checks, before any work, that `output_dir` can receive an export writing `file_names`
    (besides :data:`CONFIG_FILES`), and cleans what killed exports left beside it.

    Returns:
        the resolved destination.
    """
    destination = Path(output_dir).resolve()
    if destination.exists() and not destination.is_dir():
        raise _output_error(
            model_type,
            f"the output path {destination} is an existing file, not a directory",
            "pass a directory path (existing or not) as the output.",
        )
    ancestor = next(p for p in (destination.parent, *destination.parent.parents) if p.exists())
    if not ancestor.is_dir():
        raise _output_error(
            model_type,
            f"{ancestor} is a file, so the output directory {destination} cannot be created",
            "pass an output path whose parents are directories.",
        )
    if destination.is_dir():
        if not os.access(destination, os.R_OK | os.X_OK):
            raise _output_error(
                model_type,
                f"the existing output directory {destination} cannot be read, so its other files "
                "cannot be kept",
                "export into a directory you can read and write, or fix its permissions.",
            )
        _refuse_shadowing_directories(destination, (*CONFIG_FILES, *file_names), model_type)
    # What truly decides is whether a directory can be made there (permissions, a read-only or
    # full filesystem, root or not): make one and remove it.
    probe = ancestor / _owned_name(destination, PARTIAL)
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as error:
        raise write_error(model_type, destination, error) from error
    clean_stale(destination)
    return destination


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(destination: Path) -> list[Path]:
    """Removes the staging and aside directories of `destination` that exports killed before
    they could clean up (their pid is gone), and puts an aside OUT back when OUT is missing.

    Returns:
        the directories removed or restored.
    """
    parent, handled = destination.parent, []
    if not parent.is_dir():
        return handled
    prefix = f".{destination.name}.{PARTIAL}-"
    for entry in sorted(parent.iterdir(), key=lambda p: PREVIOUS not in p.name):
        match = _OWNED.match(entry.name)
        if match is None or match["name"] != destination.name:
            if entry.name.startswith(prefix):
                logger.warning("%s was left by an interrupted export of an earlier version; remove it", entry)
            continue
        if _process_alive(int(match["pid"])):
            continue
        if match["kind"] == PREVIOUS and not destination.exists():
            os.rename(entry, destination)
            logger.warning("restored %s from %s, set aside by a killed export", destination, entry.name)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            logger.warning("removed %s, left by a killed export (pid %s)", entry, match["pid"])
        handled.append(entry)
    return handled


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike, model_type: str = "") -> Iterator[Path]:
    destination = Path(output_dir).resolve()
    model_type = model_type or destination.name
    clean_stale(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = destination.parent / _owned_name(destination, PARTIAL)
        os.mkdir(staging, 0o777)  # the umask applies, as to every directory the user creates
    except OSError as error:
        raise write_error(model_type, destination, error) from error
    try:
        yield staging
        _publish(staging, destination, model_type)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _publishing_lock(directory: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _keep_other_entries(destination: Path, staging: Path) -> None:
    """Links the entries of `destination` the export does not write into `staging`."""
    written = set(os.listdir(staging))
    for entry in os.scandir(destination):
        if entry.name in written:
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(target))


def _publish(staging: Path, destination: Path, model_type: str) -> None:
    with signals.signals_deferred(), _publishing_lock(destination.parent):
        try:
            if destination.is_dir():
                written = [p.name for p in staging.iterdir() if not p.is_dir()]
                _refuse_shadowing_directories(destination, written, model_type)
                _keep_other_entries(destination, staging)
                shutil.copymode(destination, staging)
                previous = staging
                if not _exchange(staging, destination):
                    previous = destination.parent / _owned_name(destination, PREVIOUS)
                    os.rename(destination, previous)
                    os.rename(staging, destination)
                shutil.rmtree(previous, ignore_errors=True)
            elif destination.exists() or destination.is_symlink():
                raise _output_error(
                    model_type,
                    f"{destination} appeared as a file while the export ran",
                    "remove that file or pass another output directory, and run the export again.",
                )
            else:
                os.rename(staging, destination)
        except OSError as error:
            raise write_error(model_type, destination, error) from error


def write_model(program: torch.onnx.ONNXProgram, directory: Path, file_name: str = ONNX_FILE) -> list[str]:
    from . import __version__

    program.model.metadata_props[EXPORTER_METADATA_KEY] = __version__
    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value)
    if weights >= EXTERNAL_DATA_THRESHOLD_BYTES:
        external = f"{file_name}_data"
        ir.save(program.model, directory / file_name, external_data=external)
        return [file_name, external]
    _save_in_pieces(program.model, directory / file_name)
    return [file_name]


def _save_in_pieces(model: ir.Model, path: Path) -> None:
    """`ir.save(model, path)`'s file (one ModelProto, weights inside), serialized in pieces: the
    model without its initializers, then one ModelProto per initializer holding only it.

    Why: protobuf (upb) serializes one message of SmolLM2-135M's 544 MB in 1.1 to 2.2 s, its 293
    initializers one by one in 0.2 s. A parser merges a message's concatenated serializations
    (protobuf's encoding rules: a repeated field's elements are appended, a singular message
    field is merged), so ONNX Runtime and `onnx.load` read the same ModelProto as from
    `ir.save`'s file; `onnx.load(...).SerializeToString()` gives `ir.save`'s bytes."""
    proto = ir.serde.serialize_model(model)
    pieces = [onnx.ModelProto(graph=onnx.GraphProto(initializer=[t])) for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    with open(path, "wb") as file:
        file.write(proto.SerializeToString())
        for piece in pieces:
            file.write(piece.SerializeToString())


def exported_by_observer(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at `path` was written by an observer export (its metadata carries
    :data:`EXPORTER_METADATA_KEY`); reads the graph only, never the weights."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    return any(entry.key == EXPORTER_METADATA_KEY for entry in model.metadata_props)


#: Config attributes optimum-onnx's `ORTModelForCausalLM.__init__` reads (to size the first
#: step's empty cache), with the value for a model that has no attention at all.
RUNTIME_SIZE_ATTRIBUTES = {"hidden_size": None, "num_attention_heads": 1}


def runtime_size_attributes(config: Any) -> dict[str, int]:
    """The attributes of :data:`RUNTIME_SIZE_ATTRIBUTES` `config` lacks, with their values: the
    text sub-config's, else the default (none when there is neither)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    added = {}
    for name, default in RUNTIME_SIZE_ATTRIBUTES.items():
        if hasattr(config, name):
            continue
        value = getattr(text, name, default)
        if isinstance(value, int):
            added[name] = value
    return added


def checkpoint_config(config: Any) -> Any:
    """The config written as config.json: `config`, or, when transformers registers its model type
    only as a sub-config of another (:func:`~optimum_observer.loading.sub_config_home`: the text
    model of emu3 or mllama that a text-generation export holds), that composite config holding it,
    as the type's checkpoints store it. AutoConfig, so optimum-onnx's runtime classes, reads only
    the composite ("model type `emu3_text_model` but Transformers does not recognize this
    architecture"); transformers builds the same text model from it (the text config class's
    `from_pretrained` reads its `base_config_key` part, which AutoModelForCausalLM hands to it)."""
    home = sub_config_home(getattr(config, "model_type", None))
    if home is None:
        return config
    return home.composite_class(**{home.key: config.to_dict()})


def write_configs(model: Any, tokenizer: Any | None, directory: Path, feature_extractor: Any | None = None) -> None:
    saved = checkpoint_config(model.config)
    saved.save_pretrained(directory)
    added = runtime_size_attributes(saved)
    if added:
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, **added}, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    for preprocessor in (tokenizer, feature_extractor):
        if preprocessor is not None:
            preprocessor.save_pretrained(directory)
