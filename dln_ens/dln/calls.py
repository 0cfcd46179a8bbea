"""Wrappers around any `LanguageModel` for accounting: how many backend calls and requests a
DLN step makes and how long they take (`CountingLM`), and the same work sent one request at a
time (`OneAtATimeLM`), the baseline that batching and shared-prefix reuse are measured against."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from dln_ens.lm.base import LanguageModel

METHODS = ("generate", "score", "next_token_logprobs")


class CountingLM:
    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.name = inner.name
        self.calls: dict[str, int] = defaultdict(int)
        self.requests: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, method: str, n: int, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[method] += time.perf_counter() - t0
        self.calls[method] += 1
        self.requests[method] += n
        return out

    def generate(self, prompts, **kwargs):
        return self._timed("generate", len(prompts), self.inner.generate, prompts, **kwargs)

    def score(self, contexts, targets):
        return self._timed("score", len(contexts), self.inner.score, contexts, targets)

    def next_token_logprobs(self, contexts, candidates):
        return self._timed("next_token_logprobs", len(contexts), self.inner.next_token_logprobs,
                           contexts, candidates)

    def snapshot(self) -> dict:
        return {m: {"calls": self.calls[m], "requests": self.requests[m],
                    "seconds": round(self.seconds[m], 4)} for m in METHODS}


def diff_snapshots(after: dict, before: dict) -> dict:
    return {m: {k: round(after[m][k] - before[m][k], 4) for k in after[m]} for m in after}


class OneAtATimeLM:
    """Sends every request of a batched call as its own call (no batching, no shared-prefix
    reuse). A seeded sampled generate call is split with the same seed per request, so its
    samples differ from the batched call's; greedy calls and scores are comparable."""

    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.name = inner.name

    def generate(self, prompts, **kwargs):
        return [self.inner.generate([p], **kwargs)[0] for p in prompts]

    def score(self, contexts, targets):
        return [self.inner.score([c], [t])[0] for c, t in zip(contexts, targets)]

    def next_token_logprobs(self, contexts, candidates):
        if not contexts:
            return np.zeros((0, len(candidates)))
        return np.concatenate([np.asarray(self.inner.next_token_logprobs([c], candidates)) for c in contexts])
