"""Only rank 0 writes the run directory.

Every process runs the same command, which reads and writes its run directory (resume state,
finished cells, logs). Rank 0 uses the real one. Every other rank works in a private scratch
copy of it, sent from rank 0 before anything is written (so nodes need no shared filesystem)
and deleted at the end: it reads exactly what rank 0 reads, so it resumes from the same point
and makes the same calls, and its own writes never reach the run directory.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dln_ens.distributed.processes import Processes


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); empty if ``root`` does not exist."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@contextlib.contextmanager
def process_run_dir(run_dir: Path, procs: Processes) -> Iterator[Path]:
    """The directory this process writes: ``run_dir`` on rank 0, a scratch copy elsewhere."""
    run_dir = Path(run_dir)
    if not procs.distributed:
        yield run_dir
        return
    files = procs.gather_or_raise(lambda: read_tree(run_dir) if procs.is_main else None, f"read {run_dir}")[0]
    if procs.is_main:
        procs.gather_or_raise(lambda: None)
        yield run_dir
        return
    with tempfile.TemporaryDirectory(prefix=f"dln-ens-rank{procs.rank}-") as tmp:
        target = Path(tmp) / run_dir.name
        procs.gather_or_raise(lambda: write_tree(target, files), f"copy {run_dir} into its scratch folder")
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
