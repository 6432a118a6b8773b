"""Termination signals during an export: cleanup instead of death, and no death mid-publish.

Takes nothing; gives two context managers the export and the command line enter.

* :func:`termination_raises`: SIGTERM (and SIGHUP) under their default action kill the process
  at once, leaving the staging directory of an export behind. Inside the block they raise
  :class:`Terminated` instead (a `SystemExit` with status 128 + signal number), so every
  `finally`/`except BaseException` on the way out runs, as for Ctrl-C.
* :func:`signals_deferred`: the few renames that publish an export are not interrupted by a
  Python-level handler (SIGINT, SIGTERM, SIGHUP); a signal that arrives meanwhile is raised
  again right after the block.

Both install handlers only in the main thread, where Python runs them, and only replace the
default action (a handler the caller installed is left alone); both restore what they changed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: Signals whose default action ends the process without running Python cleanup.
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
#: Signals deferred during publishing.
DEFERRED_SIGNALS = (signal.SIGINT, *TERMINATION_SIGNALS)


class Terminated(SystemExit):
    """Raised by a termination signal inside :func:`termination_raises`."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(128 + signum)

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    installed = {}
    for signum in TERMINATION_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            installed[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    # getsignal() is None for a handler installed outside Python, which could not be put back.
    previous = {
        signum: signal.signal(signum, lambda s, f: received.append(s))
        for signum in DEFERRED_SIGNALS
        if signal.getsignal(signum) is not None
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
