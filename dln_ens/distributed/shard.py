"""Which process serves which request of a batched call: a pure, deterministic rule.

Requests with the same key (the prompt of a generate call, the context of a score or
next-token call) stay together: a backend shares the KV cache of a context among its targets,
and numbers repeated prompts of one call to give each its own sampling seed
(`lm.stopping.sequence_seeds`), so splitting a key's requests would cost work or change samples.
Keys are cut, in order of first appearance, into ``world_size`` contiguous runs of about equal
request counts (neighbouring requests tend to share prefixes).
"""
from __future__ import annotations

from typing import Hashable, Sequence


def shard_owners(keys: Sequence[Hashable], world_size: int) -> list[int]:
    """The rank (0..world_size-1) that serves each request."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    owners = [0] * len(keys)
    total, before = len(keys), 0
    for members in groups.values():
        middle = before + len(members) / 2        # a group goes where its middle request falls
        rank = min(world_size - 1, int(middle * world_size / total))
        for i in members:
            owners[i] = rank
        before += len(members)
    return owners


def split(owners: Sequence[int], world_size: int) -> list[list[int]]:
    """Request indices per rank, each list in the call's order."""
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i, r in enumerate(owners):
        out[r].append(i)
    return out
