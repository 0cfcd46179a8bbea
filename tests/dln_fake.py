"""A scripted `LanguageModel` for the DLN tests: deterministic generations and log-probs that a
test can recompute by hand (no model involved)."""
from __future__ import annotations

import hashlib

import numpy as np

from dln_ens.lm.base import Generation, Score


def hashed_logprob(context: str, target: str) -> float:
    """A fixed pseudo-random log-probability in [-10, 0) for a (context, target) pair."""
    h = hashlib.sha256(f"{context}\x00{target}".encode()).hexdigest()
    return -(int(h[:8], 16) % 1000 + 1) / 100.0


def num_tokens(target: str) -> int:
    return max(1, len(target.split()))


class ScriptedLM:
    """generate: ``gen(prompt, index_in_call, seed, temperature)``; score: ``logp(context,
    target)`` with ``num_tokens`` = words of the target; next_token_logprobs: ``logp(context,
    " " + candidate)`` (alternatives "a|A" combined by ``aggregate``). Counts calls; ``fail_after`` raises after that many calls (to simulate
    an interrupted run)."""

    def __init__(self, name="fake", gen=None, logp=None, fail_after=None):
        self.name = name
        self.gen = gen or default_gen
        self.logp = logp or hashed_logprob
        self.calls: list[tuple[str, int]] = []
        self.fail_after = fail_after

    def _count(self, method, n):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("scripted interruption")
        self.calls.append((method, n))

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, seed=None):
        self._count("generate", len(prompts))
        return [Generation(text=cut(self.gen(p, i, seed, temperature), stop), logprob=-1.0, num_tokens=3)
                for i, p in enumerate(prompts)]

    def score(self, contexts, targets):
        self._count("score", len(contexts))
        return [Score(logprob=self.logp(c, t), num_tokens=num_tokens(t)) for c, t in zip(contexts, targets)]

    def next_token_logprobs(self, contexts, candidates, *, aggregate="max"):
        """Each alternative of a candidate ("a|A") is one token, its forms " a" and "a" alike."""
        self._count("next_token_logprobs", len(contexts))
        combine = np.logaddexp.reduce if aggregate == "sum" else np.max
        return np.asarray([[combine([self.logp(c, " " + a) for a in k.split("|")]) for k in candidates]
                           for c in contexts])


class TokenizingLM(ScriptedLM):
    """A ScriptedLM whose tokens are characters (``encode_many``), so that token accounting
    can be checked: it logs the texts it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: list[str] = []
        self.scored_tokens = 0

    def encode_many(self, texts):
        return [list(t) for t in texts]

    def generate(self, prompts, **kwargs):
        self.received += list(prompts)
        return super().generate(prompts, **kwargs)

    def score(self, contexts, targets):
        self.received += list(contexts)
        self.scored_tokens += sum(num_tokens(t) for t in targets)
        return super().score(contexts, targets)

    def next_token_logprobs(self, contexts, candidates, **kwargs):
        self.received += list(contexts)
        return super().next_token_logprobs(contexts, candidates, **kwargs)


def cut(text: str, stop) -> str:
    """What a real backend returns: the text up to the first stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def default_gen(prompt: str, i: int, seed, temperature: float) -> str:
    """Greedy: a function of the prompt only; sampled: of the prompt and the call's seed, as
    the HF backend (a prompt samples the same text whatever it is batched with)."""
    key = prompt if temperature == 0 else f"{prompt}|{seed}"
    h = hashlib.sha256(key.encode()).hexdigest()
    if "## Instruction\n>" in prompt:          # the prompt proposer
        return f" Instruction {h[:4]}\n\nmore"
    return f" thought {h[:6]}\nignored"


class FakePool:
    def __init__(self, **lms):
        self.lms = lms

    def get(self, name):
        return self.lms[name]
