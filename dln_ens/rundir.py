"""One run at a time per run directory.

`lock_run_dir` holds an OS file lock (`filelock`, released by the OS if the process dies) on
``<run_dir>/.lock`` for the length of a run, and writes who holds it to ``.lock.holder.json``;
a second run on the same directory fails at once with a message naming the holder. The lock
is re-entrant within one thread (`dln-ens run` locks the directory, then `evaluate` and
`run_dln` lock it again); another thread or process is refused.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from dln_ens.errors import UserError
from dln_ens.io import write_json

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder.json"

_held: dict[tuple[str, int], int] = {}   # (run dir, thread) -> depth


class RunDirLockedError(UserError, RuntimeError):
    """Another run uses this run directory."""


def _holder(run_dir: Path) -> str:
    try:
        h = json.loads((run_dir / HOLDER_FILE).read_text(encoding="utf-8"))
        return (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}, "
                f"command: {h.get('command')}")
    except (OSError, ValueError):
        return "a process that has not yet recorded itself"


@contextmanager
def lock_run_dir(run_dir: str | os.PathLike):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = (str(run_dir.resolve()), threading.get_ident())
    if key in _held:
        _held[key] += 1
        try:
            yield run_dir
        finally:
            _held[key] -= 1
        return
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirLockedError(f"run directory {run_dir} is in use by another run ({_holder(run_dir)}); "
                                f"wait for it to finish, or give this run another \"name\"") from None
    _held[key] = 1
    try:
        write_json(run_dir / HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv) or sys.executable})
        yield run_dir
    finally:
        del _held[key]
        (run_dir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()
