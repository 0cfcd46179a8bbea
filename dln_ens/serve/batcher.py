"""One worker thread runs every backend call; requests that arrive while it is busy are queued
and then answered together, one backend call per distinct `Params` (so concurrent clients share
batches, and the backend is never entered by two threads at once)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("dln_ens.serve")


@dataclass
class _Job:
    params: object
    prompts: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(fut: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if fut.done():   # the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class Batcher:
    def __init__(self, run: Callable[[object, list], list], max_prompts: int = 256):
        self.run, self.max_prompts = run, max_prompts
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="dln-ens-serve-batcher", daemon=True)
        self._thread.start()

    async def submit(self, params, prompts: list) -> list:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Job(params, prompts, loop, fut))
        return await fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)   # finish this round, then stop
                    break
                jobs.append(nxt)
            groups: dict = {}
            for j in jobs:
                groups.setdefault(j.params, []).append(j)
            for params, group in groups.items():
                batch: list[_Job] = []
                for j in group:   # split oversized groups
                    if batch and sum(len(b.prompts) for b in batch) + len(j.prompts) > self.max_prompts:
                        self._answer(params, batch)
                        batch = []
                    batch.append(j)
                self._answer(params, batch)

    def _answer(self, params, jobs: list[_Job]) -> None:
        try:
            results = self.run(params, [p for j in jobs for p in j.prompts])
        except Exception as e:
            if len(jobs) > 1:   # one bad request must not fail the others: answer each alone
                for j in jobs:
                    self._answer(params, [j])
                return
            if not isinstance(e, ValueError):
                log.exception("backend call failed")
            jobs[0].loop.call_soon_threadsafe(_resolve, jobs[0].future, None, e)
            return
        at = 0
        for j in jobs:
            n = len(j.prompts)
            j.loop.call_soon_threadsafe(_resolve, j.future, results[at:at + n], None)
            at += n
