"""The migration registry: which (model_type, task) pairs moved from optimum-onnx to the observer.

Takes the reviewed data file `migrated.json` shipped in this package (a JSON list, one entry per
line, so that migrating a model type is a one-line diff) and gives validated
:class:`MigrationEntry` objects. :func:`add_migration` is the one writer of that file.

An entry::

    {"model_type": "llama", "tasks": ["text-generation-with-past"], "since": "0.2.0",
     "evidence": "greedy tokens and logits (atol 1e-5) match legacy on tiny + 125M llama, CI run 123"}
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Iterable
from pathlib import Path

from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name("migrated.json")
_FIELDS = ("model_type", "tasks", "since", "evidence")


class RegistryError(ValueError):
    """The migration registry file is invalid; the message names the file, the entry and the field."""


@dataclasses.dataclass(frozen=True)
class MigrationEntry:
    """One model type moved to the observer exporter for some tasks.

    Attributes:
        model_type: `config.model_type` as transformers spells it.
        tasks: the export tasks that moved (Optimum task names).
        since: the optimum-observer version in which the move shipped.
        evidence: what showed that the observer export matches the legacy one.
    """

    model_type: str
    tasks: tuple[str, ...]
    since: str
    evidence: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "model_type": self.model_type,
                "tasks": list(self.tasks),
                "since": self.since,
                "evidence": self.evidence,
            }
        )


@dataclasses.dataclass(frozen=True)
class MigrationRegistry:
    """The validated registry; `path` is where it was read from."""

    path: Path
    entries: tuple[MigrationEntry, ...]

    def find(self, model_type: str, task: str) -> MigrationEntry | None:
        for entry in self.entries:
            if entry.model_type == model_type and task in entry.tasks:
                return entry
        return None


def known_model_types() -> frozenset[str]:
    """Every `model_type` transformers knows, the reference for validating entries."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return frozenset(CONFIG_MAPPING_NAMES)


def known_tasks() -> frozenset[str]:
    """The tasks an entry may name: only those the observer exporter can take over."""
    import optimum_observer

    return frozenset(optimum_observer.supported_tasks())


def _entry_from_dict(
    raw: object, where: str, model_types: Collection[str], tasks: Collection[str]
) -> MigrationEntry:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected an object with fields {_FIELDS}, got {type(raw).__name__}.")
    missing = [f for f in _FIELDS if f not in raw]
    unknown = sorted(set(raw) - set(_FIELDS))
    if missing or unknown:
        raise RegistryError(
            f"{where}: missing fields {missing}, unknown fields {unknown}; expected exactly {_FIELDS}."
        )
    model_type, entry_tasks, since, evidence = (raw[f] for f in _FIELDS)
    if not isinstance(model_type, str) or model_type not in model_types:
        raise RegistryError(f"{where}: unknown model_type {model_type!r} (not a transformers model type).")
    if (
        not isinstance(entry_tasks, list)
        or not entry_tasks
        or not all(isinstance(t, str) for t in entry_tasks)
    ):
        raise RegistryError(f"{where}: 'tasks' must be a non-empty list of task names, got {entry_tasks!r}.")
    bad_tasks = [t for t in entry_tasks if t not in tasks]
    if bad_tasks:
        raise RegistryError(
            f"{where}: tasks {bad_tasks} are not exported by the observer; supported: {sorted(tasks)}."
        )
    if len(set(entry_tasks)) != len(entry_tasks):
        raise RegistryError(f"{where}: 'tasks' lists a task twice: {entry_tasks!r}.")
    try:
        Version(since)
    except (InvalidVersion, TypeError):
        raise RegistryError(f"{where}: 'since' must be a version such as '0.2.0', got {since!r}.") from None
    if not isinstance(evidence, str) or not evidence.strip():
        raise RegistryError(f"{where}: 'evidence' must say what showed parity (a non-empty string).")
    return MigrationEntry(model_type, tuple(entry_tasks), since, evidence)


def validate_entries(
    raw_entries: object,
    *,
    source: str,
    model_types: Collection[str] | None = None,
    tasks: Collection[str] | None = None,
) -> tuple[MigrationEntry, ...]:
    """Validates the parsed JSON of a registry; raises :class:`RegistryError` on the first problem."""
    if not isinstance(raw_entries, list):
        raise RegistryError(f"{source}: the registry must be a JSON list of entries.")
    model_types = known_model_types() if model_types is None else model_types
    tasks = known_tasks() if tasks is None else tasks
    entries = []
    seen: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(raw_entries):
        where = f"{source}, entry {index}"
        entry = _entry_from_dict(raw, where, model_types, tasks)
        for task in entry.tasks:
            if (entry.model_type, task) in seen:
                raise RegistryError(
                    f"{where}: duplicate entry for {entry.model_type} / {task} "
                    f"(already in entry {seen[entry.model_type, task]})."
                )
            seen[entry.model_type, task] = index
        entries.append(entry)
    return tuple(entries)


def load_registry(path: str | Path | None = None) -> MigrationRegistry:
    """Reads and validates the registry at `path` (the packaged `migrated.json` by default)."""
    path = Path(path) if path is not None else REGISTRY_PATH
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON ({e}).") from None
    return MigrationRegistry(path, validate_entries(raw, source=str(path)))


def _write(path: Path, entries: Iterable[MigrationEntry]) -> None:
    # One entry per line, sorted, so that a migration is a one-line diff in review.
    lines = [entry.to_json() for entry in sorted(entries, key=lambda e: e.model_type)]
    body = ",\n".join(f"  {line}" for line in lines)
    path.write_text(f"[\n{body}\n]\n" if lines else "[\n]\n", encoding="utf-8")


def add_migration(
    model_type: str,
    tasks: Iterable[str],
    since: str,
    evidence: str,
    *,
    path: str | Path | None = None,
) -> MigrationEntry:
    """Records that `model_type` moved to the observer for `tasks`; validates before writing.

    Raises:
        RegistryError: the new entry is invalid or duplicates an existing one; the file is unchanged.
    """
    registry = load_registry(path)
    entry = MigrationEntry(model_type, tuple(tasks), since, evidence)
    raw = [json.loads(e.to_json()) for e in (*registry.entries, entry)]
    validated = validate_entries(raw, source=str(registry.path))
    _write(registry.path, validated)
    logger.info("Registered migration %s in %s", entry.to_json(), registry.path)
    return entry
