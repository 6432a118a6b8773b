"""Publishing under kills and races, in forked children; one JSON line per case on stdout.

Usage: publish_harness.py WORKDIR

Every line is a JSON object with its "mode": "kill KILL", "kill TERM", "kill KILL fallback"
(`renameat2` unavailable: the rename fallback) or "race".

kill: OUT holds a previous export and the user's files. For k = 1, 2, ... a child publishes a
new export into OUT (`packaging.staged_output`) and sends itself the signal just before its k-th
filesystem change (an audit hook counts them: directory and file creation, renames, links,
removals, the `renameat2` call); then another child publishes into the same OUT undisturbed (the
next export). Each line says what OUT held after the kill and after the next export, and which
hidden directories were left beside it. It stops at the first k past the publish's last change.

race: two children publish different exports into one new OUT at once (each waits 0.5 s before
its renames, so both decide before either acts); the line gives their exit statuses and OUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from optimum_observer import packaging

try:
    from optimum_observer.signals import termination_raises
except ImportError:  # an optimum-observer without SIGTERM handling
    termination_raises = contextlib.nullcontext

OLD = {"config.json": '{"model_type": "llama"}', "model.onnx": "old graph", "tokenizer.json": "old tokenizer"}
NEW = {
    "config.json": '{"model_type": "starcoder2"}',
    "model.onnx": "new graph",
    "tokenizer.json": "new tokenizer",
    "generation_config.json": "{}",
}
USER = {"README.md": "mine", "notes/a.txt": "kept"}
_CHANGES = {
    "os.mkdir",
    "os.rename",
    "os.link",
    "os.symlink",
    "os.remove",
    "os.rmdir",
    "os.chmod",
    "shutil.rmtree",
    "shutil.copyfile",
    "ctypes.call_function",
}
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _is_change(event: str, args: tuple) -> bool:
    if event == "open":
        return len(args) > 2 and isinstance(args[2], int) and bool(args[2] & _WRITING)
    return event in _CHANGES


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def snapshot(root: Path) -> dict[str, str] | None:
    if not root.is_dir():
        return None
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def classify(root: Path, new: dict[str, str] = NEW) -> str:
    files = snapshot(root)
    if files is None:
        return "missing"
    if files == {**OLD, **USER}:
        return "old"
    if files == {**new, **USER}:
        return "new"
    return f"mix {json.dumps(files, sort_keys=True)}"


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def publish(out: Path, files: dict[str, str], hook=None) -> None:
    with termination_raises():
        if hook is not None:
            sys.addaudithook(hook)
        with packaging.staged_output(out) as staging:
            write_tree(staging, files)


def in_child(work) -> int:
    """Runs `work` in a forked child; its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def kill_cases(mode: str, signum: int, work: Path) -> None:
    out = work / "out"
    for kill_at in range(1, 500):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_tree(out, {**OLD, **USER})
        seen = [0]

        def hook(event: str, args: tuple) -> None:
            if _is_change(event, args):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signum)

        status = in_child(lambda: publish(out, NEW, hook))
        after, left = classify(out), leftovers(work)
        next_status = in_child(lambda: publish(out, NEW))
        print(
            json.dumps(
                {
                    "mode": mode,
                    "kill_at": kill_at,
                    "status": describe(status),
                    "after": after,
                    "left": left,
                    "next_status": describe(next_status),
                    "after_next": classify(out),
                    "left_next": leftovers(work),
                }
            ),
            flush=True,
        )
        if describe(status) == "exit 0":  # past the publish's last change: the signal never came
            return


def race(work: Path) -> None:
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    variants = [{**NEW, "model.onnx": f"graph of exporter {i}"} for i in (1, 2)]

    def hook(event: str, args: tuple) -> None:
        if event in ("os.rename", "ctypes.call_function"):
            time.sleep(0.5)

    pids = []
    for files in variants:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                publish(out, files, hook)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    statuses = [describe(os.waitpid(pid, 0)[1]) for pid in pids]
    files = snapshot(out)
    whole = files in ({**v} for v in variants)
    case = {"mode": "race", "statuses": statuses, "whole": whole, "out": files, "left": leftovers(work)}
    print(json.dumps(case), flush=True)


def main() -> None:
    work = Path(sys.argv[1])
    kill_cases("kill KILL", signal.SIGKILL, work / "kill")
    kill_cases("kill TERM", signal.SIGTERM, work / "term")
    race(work / "race")
    if hasattr(packaging, "_exchange"):
        packaging._exchange = lambda first, second: False
    kill_cases("kill KILL fallback", signal.SIGKILL, work / "fallback")


if __name__ == "__main__":
    main()
