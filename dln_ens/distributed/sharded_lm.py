"""`ShardedLanguageModel`: any `LanguageModel`, its batched calls split across processes.

Every process runs the same program (evaluation, the DLN trainer) on the same data and wraps
each backend in this class. A call's requests are assigned to processes by `shard.shard_owners`
(deterministic, the same on every process); each process sends its share to its own copy of
the backend, and the answers are gathered so that every process gets the whole answer in the
call's order. Every process therefore sees exactly what one process would, makes the same
decisions, and stays in step with the others. An error in any process's share is raised on
every process (the lowest failing rank's), so none waits forever for the others.

Results equal the one-process run's when a request's answer does not depend on the other
requests of its call: the HF and ensemble backends seed each sampled sequence by its prompt
(`lm.stopping.sequence_seeds`), so samples are equal; their floating-point scores may differ in
the last bits because a request is batched and padded with different neighbours (README,
"Scaling out").
"""
from __future__ import annotations

import time

import numpy as np

from dln_ens.distributed.processes import Processes
from dln_ens.distributed.shard import shard_owners, split
from dln_ens.lm.base import LanguageModel

METHODS = ("generate", "score", "next_token_logprobs")


class ShardedLanguageModel:
    def __init__(self, inner: LanguageModel, procs: Processes):
        self.inner = inner
        self.procs = procs
        self.name = inner.name
        self.requests = {m: 0 for m in METHODS}     # what this process computed itself
        self.seconds = {"computing": 0.0, "waiting": 0.0}

    def _sharded(self, method: str, keys: list, compute):
        """``compute(indices) -> one result per index``, run on this process's share; the whole
        list of results, in call order, on every process."""
        procs = self.procs
        parts = split(shard_owners(keys, procs.world_size), procs.world_size)
        mine = parts[procs.rank]
        t0 = time.perf_counter()
        done = []

        def share():
            values = list(compute(mine)) if mine else []
            done.append(time.perf_counter())
            return values
        try:
            gathered = procs.gather_or_raise(share, f"compute its {method} requests on {self.name!r}")
        finally:
            t1 = done[0] if done else time.perf_counter()
            self.seconds["computing"] += t1 - t0
            self.seconds["waiting"] += time.perf_counter() - t1
        self.requests[method] += len(mine)
        out = [None] * len(keys)
        for idx, values in zip(parts, gathered):
            if len(values) != len(idx):
                raise RuntimeError(f"backend {self.name!r}: {method} returned {len(values)} results "
                                   f"for {len(idx)} requests")
            for i, v in zip(idx, values):
                out[i] = v
        return out

    def _direct(self, method: str, n: int, call):
        """One process: the call itself, counted."""
        t0 = time.perf_counter()
        out = call()
        self.seconds["computing"] += time.perf_counter() - t0
        self.requests[method] += n
        return out

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop=(), temperature: float = 0.0,
                 seed: int | None = None):
        if not self.procs.distributed:
            return self._direct("generate", len(prompts), lambda: self.inner.generate(
                prompts, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature, seed=seed))
        if temperature > 0 and seed is None:
            # what a backend would draw itself (`lm.hf.sampling_seeds`), drawn on every process
            # (their torch generators stay alike) and taken from rank 0
            import torch
            seed = self.procs.broadcast(int(torch.randint(0, 2 ** 62, ()).item()))
        return self._sharded("generate", list(prompts), lambda idx: self.inner.generate(
            [prompts[i] for i in idx], max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
            seed=seed))

    def score(self, contexts: list[str], targets: list[str]):
        if not self.procs.distributed:
            return self._direct("score", len(contexts), lambda: self.inner.score(contexts, targets))
        if len(contexts) != len(targets):
            raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
        return self._sharded("score", list(contexts), lambda idx: self.inner.score(
            [contexts[i] for i in idx], [targets[i] for i in idx]))

    def next_token_logprobs(self, contexts: list[str], candidates: list[str], **kwargs) -> np.ndarray:
        if not self.procs.distributed:
            return self._direct("next_token_logprobs", len(contexts),
                                lambda: self.inner.next_token_logprobs(contexts, candidates, **kwargs))
        rows = self._sharded("next_token_logprobs", list(contexts), lambda idx: list(np.asarray(
            self.inner.next_token_logprobs([contexts[i] for i in idx], candidates, **kwargs))))
        return np.stack(rows) if rows else np.zeros((0, len(candidates)))


class ShardedPool:
    """A backend pool whose backends are `ShardedLanguageModel`s around the inner pool's (an
    ensemble's members stay unwrapped inside it: only whole calls are split)."""

    def __init__(self, pool, procs: Processes):
        self.pool = pool
        self.procs = procs
        self.cfg = pool.cfg
        self._wrapped: dict[str, ShardedLanguageModel] = {}

    def get(self, name: str) -> ShardedLanguageModel:
        if name not in self._wrapped:
            self._wrapped[name] = ShardedLanguageModel(self.pool.get(name), self.procs)
        return self._wrapped[name]

    def shares(self) -> dict:
        """``num_processes`` and, per process, the requests it computed and its seconds
        computing and waiting for the others. A collective: every process must call it."""
        mine = {"rank": self.procs.rank, "requests": {m: 0 for m in METHODS}, "seconds_computing": 0.0,
                "seconds_waiting": 0.0}
        for lm in self._wrapped.values():
            for m in METHODS:
                mine["requests"][m] += lm.requests[m]
            mine["seconds_computing"] += lm.seconds["computing"]
            mine["seconds_waiting"] += lm.seconds["waiting"]
        rows = self.procs.gather(mine)
        total = sum(sum(r["requests"].values()) for r in rows)
        for r in rows:
            n = sum(r["requests"].values())
            r.update(total=n, share=round(n / total, 4) if total else 0.0,
                     seconds_computing=round(r["seconds_computing"], 3),
                     seconds_waiting=round(r["seconds_waiting"], 3))
        return {"num_processes": self.procs.world_size, "processes": rows}
