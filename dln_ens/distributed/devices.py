"""Which devices a process uses: ``{local_rank}`` in device strings, and a slice of the node's
GPUs per process when one member needs several.

- One GPU per process: ``"device": "cuda:{local_rank}"`` (any device string or ``device_map``
  value may name ``{local_rank}``; it is 0 in a single process).
- k GPUs per process: set ``DLN_ENS_GPUS_PER_PROCESS=k``; process ``local_rank`` then sees only
  GPUs ``local_rank*k .. local_rank*k+k-1`` of those visible (CUDA_VISIBLE_DEVICES is narrowed
  before CUDA starts; without CUDA_VISIBLE_DEVICES the node's GPUs are taken to be
  0 .. LOCAL_WORLD_SIZE*k-1), so ``"device_map": "auto"`` spreads a member over its own k GPUs and
  ``cuda:0`` is its first one. A node with G GPUs runs at most G // k processes.
"""
from __future__ import annotations

import os
import string

from dln_ens.errors import UserError

PLACEHOLDERS = ("local_rank",)
GPUS_PER_PROCESS = "DLN_ENS_GPUS_PER_PROCESS"


class DeviceSpecError(UserError, ValueError):
    pass


def check_device_spec(spec) -> None:
    """Raise `DeviceSpecError` if a device string / device_map names an unknown placeholder."""
    for text in _strings(spec):
        for _, field, _, _ in string.Formatter().parse(text):
            if field is not None and field not in PLACEHOLDERS:
                raise DeviceSpecError(f"unknown placeholder {{{field}}} in {text!r}; the only one is "
                                      f"{{local_rank}} (e.g. \"cuda:{{local_rank}}\")")


def with_local_rank(spec, local_rank: int):
    """``spec`` (a device string, or a device_map: string or dict) with ``{local_rank}`` filled in."""
    check_device_spec(spec)
    if isinstance(spec, str):
        return spec.format(local_rank=local_rank)
    if isinstance(spec, dict):
        return {k: with_local_rank(v, local_rank) for k, v in spec.items()}
    return spec


def _strings(spec):
    if isinstance(spec, str):
        yield spec
    elif isinstance(spec, dict):
        for v in spec.values():
            yield from _strings(v)


def process_gpus(visible: list[str], local_rank: int, per_process: int) -> list[str]:
    """The GPU ids (from ``visible``) that process ``local_rank`` owns with ``per_process`` each."""
    if per_process < 1:
        raise DeviceSpecError(f"{GPUS_PER_PROCESS} must be >= 1, got {per_process}")
    first = local_rank * per_process
    if first + per_process > len(visible):
        raise DeviceSpecError(
            f"process {local_rank} needs GPUs {first}..{first + per_process - 1} ({per_process} per process, "
            f"{GPUS_PER_PROCESS}) but only {len(visible)} are visible ({','.join(visible) or 'none'}); "
            f"launch at most {len(visible) // per_process} processes per node")
    return visible[first:first + per_process]


def narrow_visible_gpus(local_rank: int) -> None:
    """Apply ``DLN_ENS_GPUS_PER_PROCESS`` (if set) to CUDA_VISIBLE_DEVICES; call before CUDA starts."""
    raw = os.environ.get(GPUS_PER_PROCESS)
    if not raw:
        return
    try:
        per = int(raw)
    except ValueError:
        raise DeviceSpecError(f"{GPUS_PER_PROCESS}={raw!r} must be an integer") from None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:   # not asking CUDA: that could start it with every GPU visible
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        ids = [str(i) for i in range(local_world * per)]
    else:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(process_gpus(ids, local_rank, per))
