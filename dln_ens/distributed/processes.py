"""The processes of one command: who am I (rank), how many are we, and the few collectives the
data-parallel run needs (gather Python objects, broadcast one, barrier).

`accelerate launch` and `torchrun` start N copies of the command and tell each its place in
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them
the command is one process and every collective is the identity. The process group always uses
gloo: only small pickled Python objects (texts, scores) travel between processes, never
tensors, so no GPU memory or NCCL set-up is needed and the same code runs on CPUs and GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_or_raise(self, compute, what: str = "finish its share"):
        """``compute()`` here, every process's result in rank order everywhere; if any process
        raised, every process raises (the lowest failing rank's exception, sent as itself when it
        pickles), so none waits forever for the others."""
        error = None
        try:
            payload = (True, compute())
        except Exception as e:
            error, payload = e, (False, _portable(e))
        gathered = self.gather(payload)
        for rank, (ok, value) in enumerate(gathered):
            if not ok:
                if rank == self.rank:
                    raise error
                raise value if isinstance(value, Exception) else ShareError(
                    f"process {rank} could not {what}: {value}")
        return [value for _, value in gathered]

    def barrier(self) -> None:
        if self.distributed:
            self.gather(None)   # a gather is a barrier that works the same on every backend

    def close(self) -> None:
        import torch.distributed as dist
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class ShareError(RuntimeError):
    """Another process failed with an exception that could not be sent as itself."""


def _portable(e: Exception):
    import pickle
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return f"{type(e).__name__}: {e}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} must be an integer (set by "
                           f"accelerate launch / torchrun)") from None


def processes_from_env() -> Processes:
    """This process's place as the launcher announced it (one process when nothing did)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return Processes(rank=rank, world_size=world, local_rank=local)


def init_processes(timeout_minutes: float = 60.0) -> Processes:
    """Join the launcher's process group (gloo, env://) when there is more than one process."""
    from dln_ens.distributed.devices import narrow_visible_gpus
    procs = processes_from_env()
    narrow_visible_gpus(procs.local_rank)
    if procs.distributed:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=procs.rank, world_size=procs.world_size,
                                    timeout=timedelta(minutes=timeout_minutes))
    return procs
