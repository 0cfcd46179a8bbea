"""The C allocator's settings for a long numerical run: keep freed memory for the next tensors.

A fused step allocates and frees many short-lived tensors ([rows, V] and [rows, anchors]
temporaries of 2-8 MB each at 32 rows, several hundred MB per scored batch). Under glibc's
defaults much of that memory goes back to the kernel when freed (blocks above the adaptive mmap
threshold are unmapped, the free top of the heap is trimmed), so the next tensors take it again
page by page: a one-pass ensemble score of 48 pairs over three members of 32k-65k ids took
168,000-321,000 page faults, 8,000-74,000 with the settings below (`python -m dln_ens.bench
score` prints each run's count).

`keep_freed_memory` sets glibc's thresholds (``mallopt``): blocks up to 32 MB come from the heap,
and the heap's free top is given back only above ``trim`` bytes (freed blocks below live ones stay
in the heap in any case). What a run has used therefore stays in its resident size until it ends
or reuses it; blocks over 32 MB (a model's logits over a long batch) are mapped and unmapped as
before. The command-line entry points (`dln_ens.cli`, `dln_ens.bench`) call it at start unless
``DLN_ENS_KEEP_FREED_MEMORY=0``; a script using the Python API calls it itself. Where the C
library has no ``mallopt`` (not glibc: macOS, Windows, musl) nothing changes.
"""
from __future__ import annotations

import ctypes
import os
import sys

from dln_ens.errors import UserError

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # the largest value glibc accepts on 64-bit systems
ENV = "DLN_ENS_KEEP_FREED_MEMORY"


def keep_freed_memory(trim: int = 1 << 30) -> bool:
    """Keep blocks up to 32 MB and a free heap top up to ``trim`` bytes in the process (see the
    module note). True where glibc took both settings; False where the C library has no
    ``mallopt`` (nothing is changed) or refused one (the mmap threshold may then be set alone)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def keep_freed_memory_unless_disabled() -> bool:
    """`keep_freed_memory`, unless the environment sets DLN_ENS_KEEP_FREED_MEMORY=0 (what the
    command-line entry points call)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise UserError(f"environment variable {ENV} must be 0 (leave the C allocator's settings alone) "
                        f"or 1 (the default: keep freed memory), got {value!r}")
    return value == "1" and keep_freed_memory()


def page_faults() -> int | None:
    """This process's page faults so far (minor ones: pages first touched), None where unknown."""
    try:
        import resource
    except ImportError:   # not a Unix system
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
