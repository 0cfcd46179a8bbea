"""Only rank 0 writes the run directory.

Every process runs the same command, which reads and writes its run directory (resume state,
finished cells, logs). Rank 0 uses the real one. Every other rank works in a private scratch
copy of it, taken before rank 0 changes anything and deleted at the end: it reads exactly what
rank 0 reads (so it resumes from the same point and makes the same calls), and its own writes
never reach the run directory or race with rank 0's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dln_ens.distributed.processes import Processes


@contextlib.contextmanager
def process_run_dir(run_dir: Path, procs: Processes) -> Iterator[Path]:
    """The directory this process writes: ``run_dir`` on rank 0, a scratch copy elsewhere."""
    run_dir = Path(run_dir)
    if not procs.distributed:
        yield run_dir
        return
    with contextlib.ExitStack() as stack:
        error = None
        target = run_dir
        if not procs.is_main:
            try:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"dln-ens-rank{procs.rank}-"))
                target = Path(tmp) / run_dir.name
                if run_dir.exists():
                    shutil.copytree(run_dir, target, symlinks=True)
            except Exception as e:
                error = e
        failed = [(r, e) for r, e in enumerate(procs.gather(None if error is None else repr(error))) if e]
        if error is not None:
            raise error
        if failed:   # rank 0 must not start writing while a copy may still be read
            raise RuntimeError(f"process {failed[0][0]} could not copy {run_dir}: {failed[0][1]}")
        yield target


@contextlib.contextmanager
def quiet_unless_main(procs: Processes) -> Iterator[None]:
    """Silence stdout and stderr (progress bars, tables) on every rank but 0; an exception still
    prints its traceback after the block."""
    if procs.is_main:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield
