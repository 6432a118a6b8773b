"""The one way the shim patches optimum: swap a module or class attribute inside a `with` block.

Every use names the failure it fixes where it is used; the original is restored on exit, also
when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ABSENT = object()


@contextlib.contextmanager
def swapped_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Sets `owner.name = value` for the duration of the block, then restores the previous value.

    On a class the raw class-dict entry is saved (so a `staticmethod` comes back as one) and an
    inherited attribute is restored by deleting the override.
    """
    original = vars(owner).get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
