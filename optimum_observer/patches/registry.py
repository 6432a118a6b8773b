"""The patch registry: records, lazy targets, per-model selection, scoped application.

Takes: :class:`Patch` records (data: a dotted target, the replacement, the failure it fixes, what
it serves). Gives: :func:`applied`, a context manager that resolves each target, replaces it and
restores the original on exit (also when the block raises); :func:`for_model`, the patches one
model needs; :func:`markdown_table`, the README's table.

A target is `"module.path:Attribute.path"`, resolved only when applied, so importing the
registry imports no model code, and a target this transformers version lacks (a module or class
renamed or gone) is skipped with a debug log and reported, never an import error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_INHERITED = object()
_TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])


class MissingTarget(LookupError):
    """The module or attribute a patch replaces does not exist in this environment."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved target: `owner.attribute` is what the patch replaces."""

    owner: Any
    attribute: str

    @property
    def own_value(self) -> Any:
        """The attribute as the owner itself holds it (None when inherited or absent)."""
        return vars(self.owner).get(self.attribute)


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace the attribute at `target` for the duration of an export.

    Exactly one of `replacement` (the new value) and `wrap` (builds the new value from the
    current one, at apply time: for replacements that call or wrap the upstream function) is set.
    """

    name: str
    #: "module.path:Attribute.path", e.g.
    #: "transformers.models.mixtral.modeling_mixtral:MixtralSparseMoeBlock.forward".
    target: str
    fixes: str
    #: A function, a property, or a module standing in for a model module's `torch` import.
    replacement: Any = None
    wrap: Callable[[Any], Any] | None = None
    #: Model types served besides those whose modules come from the target's module.
    model_types: tuple[str, ...] = ()
    #: Part of the exporter environment: applied to every export, whatever the model.
    everywhere: bool = False
    #: Also applied around the model's own runs in torch (the capture's run, validation's torch
    #: reference), not only around torch.export: it fixes a transformers bug that makes those
    #: runs fail (:func:`for_model_runs`).
    model_runs: bool = False
    #: The transformers major version whose code the patch replaces, where a target of the same
    #: name holds other code in another one (transformers 5 rewrote the state-space mixers);
    #: elsewhere the patch is skipped like a missing target. None: whatever version has the target.
    transformers: int | None = None

    def __post_init__(self) -> None:
        if (self.replacement is None) == (self.wrap is None):
            raise ValueError(f"patch {self.name}: give exactly one of `replacement` and `wrap`")
        module, _, path = self.target.partition(":")
        if not module or not path:
            raise ValueError(f"patch {self.name}: target {self.target!r} is not 'module.path:Attribute.path'")

    @property
    def module(self) -> str:
        """The module the target lives in."""
        return self.target.partition(":")[0]

    def resolve(self) -> Target:
        """Imports the target's module and walks to its owner; raises :class:`MissingTarget`."""
        if not self.for_this_transformers:
            raise MissingTarget(f"{self.target}: patches transformers {self.transformers}'s code")
        path = self.target.partition(":")[2].split(".")
        try:
            owner = importlib.import_module(self.module)
        except ImportError as error:
            raise MissingTarget(f"{self.target}: {error}") from error
        for part in path[:-1]:
            try:
                owner = getattr(owner, part)
            except AttributeError as error:
                raise MissingTarget(f"{self.target}: {error}") from error
        if not hasattr(owner, path[-1]) and not isinstance(self.replacement, property):
            # A property may define an attribute its class reads but never sets (fsmt_decoder_config).
            owner_name = getattr(owner, "__name__", owner)
            raise MissingTarget(f"{self.target}: {owner_name!r} has no attribute {path[-1]!r}")
        return Target(owner, path[-1])

    @property
    def for_this_transformers(self) -> bool:
        """Whether the installed transformers is the version the patch is for (any when unset)."""
        return self.transformers is None or self.transformers == _TRANSFORMERS_MAJOR

    def exists(self) -> bool:
        try:
            self.resolve()
        except MissingTarget:
            return False
        return True

    def new_value(self, target: Target) -> Any:
        return self.replacement if self.wrap is None else self.wrap(getattr(target.owner, target.attribute))


@dataclasses.dataclass
class Applied:
    """What :func:`applied` did: the names of the patches applied, and the ones skipped with why."""

    names: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def applied(patches: Sequence[Patch]) -> Iterator[Applied]:
    """Applies `patches` in order and restores the originals in reverse order on exit.

    A patch whose target does not exist here is skipped (debug log) and listed in the yielded
    :class:`Applied` as skipped; the others are listed as applied.
    """
    done = Applied()
    originals: list[tuple[Target, Any]] = []
    try:
        for patch in patches:
            try:
                target = patch.resolve()
            except MissingTarget as error:
                done.skipped[patch.name] = str(error)
                logger.debug("patch %s skipped: %s", patch.name, error)
                continue
            value = patch.new_value(target)
            # Inherited attributes are absent from the owner's __dict__: restoring means deleting.
            originals.append((target, vars(target.owner).get(target.attribute, _INHERITED)))
            setattr(target.owner, target.attribute, value)
            done.names.append(patch.name)
            logger.debug("patched %s (%s)", patch.name, patch.fixes)
        yield done
    finally:
        for target, original in reversed(originals):
            if original is _INHERITED:
                delattr(target.owner, target.attribute)
            else:
                setattr(target.owner, target.attribute, original)


def modules_used(model: Any) -> set[str]:
    """The modules defining the classes (and their bases) of every submodule of `model`."""
    return {cls.__module__ for module in model.modules() for cls in type(module).__mro__}


def for_model(patches: Iterable[Patch], model: Any, model_type: str) -> list[Patch]:
    """The patches an export of `model` needs: the exporter environment's, those whose target
    module defines a class the model is built from, and those declared for its model type; of
    those, the ones for this transformers version (:attr:`Patch.transformers`)."""
    used = modules_used(model)
    return [
        p
        for p in patches
        if p.for_this_transformers and (p.everywhere or p.module in used or model_type in p.model_types)
    ]


def for_model_runs(patches: Iterable[Patch], model: Any, model_type: str) -> list[Patch]:
    """Of the patches `model`'s export applies (:func:`for_model`), those its own runs in torch
    need too (:attr:`Patch.model_runs`)."""
    return [p for p in for_model(patches, model, model_type) if p.model_runs]


def for_model_type(patches: Iterable[Patch], model_type: str) -> list[Patch]:
    """The patches that would serve `model_type`, known without building a model: the
    environment's, those declared for it, and those whose target lives in its modeling package
    (`transformers.models.<package>.`, aria_text -> aria). An export selects by the classes its
    model is built from (:func:`for_model`), which also covers classes borrowed from another package.
    Patches of another transformers version's code are left out, as :func:`for_model` leaves them."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    package = f"transformers.models.{model_type_to_module_name(model_type)}."
    return [
        p
        for p in patches
        if p.for_this_transformers
        and (p.everywhere or model_type in p.model_types or p.module.startswith(package))
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(groups: dict[str, Sequence[Patch]]) -> str:
    """The README's patch table, grouped by mechanism: one row per failure, with the patches
    (and the classes or functions they replace) that remove it."""
    lines = ["| mechanism | patches (target) | failure it removes |", "|---|---|---|"]
    for mechanism, patches in groups.items():
        rows: dict[str, list[Patch]] = {}
        for patch in patches:
            rows.setdefault(patch.fixes, []).append(patch)
        for fixes, row in rows.items():
            names = ", ".join(f"`{p.name}` ({p.target.rpartition(':')[2]})" for p in row)
            lines.append(f"| {mechanism} | {names} | {_cell(fixes)} |")
    return "\n".join(lines)
