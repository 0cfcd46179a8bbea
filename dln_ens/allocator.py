"""The C allocator's settings for a long numerical run: keep freed memory for the next tensors.

A fused step allocates and frees a few hundred MB of short-lived tensors ([rows, V] and
[rows, anchors] temporaries of 4-17 MB each). Under glibc's defaults much of that memory goes
back to the kernel when freed (the top of the heap is trimmed, and blocks above the adaptive
mmap threshold are unmapped), so the next tensors take it again page by page: a one-pass
ensemble score of 48 pairs over three members of 32k-65k ids took about 500,000 page faults
(`python -m dln_ens.bench score` prints each run's count).

`keep_freed_memory` sets glibc's thresholds (``mallopt``) so that blocks up to 32 MB come from
the heap and up to ``trim`` bytes of freed heap stay with the process. Memory a run has used
stays in its resident size until it ends or reuses it; blocks over 32 MB (a model's logits over
a long batch) are mapped and unmapped as before. The command-line entry points (`dln_ens.cli`,
`dln_ens.bench`) call it at start unless ``DLN_ENS_KEEP_FREED_MEMORY=0``; a script using the
Python API calls it itself. Where the C library has no ``mallopt`` (not glibc) nothing changes.
"""
from __future__ import annotations

import ctypes
import os

from dln_ens.errors import UserError

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20   # the largest value glibc accepts on 64-bit systems
ENV = "DLN_ENS_KEEP_FREED_MEMORY"
kept = False   # whether `keep_freed_memory` took effect in this process (benchmarks print it)


def keep_freed_memory(trim: int = 1 << 30) -> bool:
    """Keep blocks up to 32 MB and up to ``trim`` bytes of freed heap in the process (see the
    module note). True where glibc took both settings, False where the C library has no
    ``mallopt`` or refused them (nothing is changed then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    global kept
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim)) or kept
    return kept


def keep_freed_memory_unless_disabled() -> bool:
    """`keep_freed_memory`, unless the environment sets DLN_ENS_KEEP_FREED_MEMORY=0 (what the
    command-line entry points call)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise UserError(f"environment variable {ENV} must be 0 (leave the C allocator's settings alone) "
                        f"or 1 (the default: keep freed memory), got {value!r}")
    return value == "1" and keep_freed_memory()
