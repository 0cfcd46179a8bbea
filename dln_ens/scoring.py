"""Request caching and class scoring over any `LanguageModel` (DLN layers and plain evaluation)."""
from __future__ import annotations

import inspect

import numpy as np

from dln_ens.errors import UserError
from dln_ens.lm.base import LanguageModel


class CallCache:
    """Memo of scoring requests within one training step: a request already answered (e.g.
    the current prompt, scored once for the posterior weights and again as a candidate) is
    not sent twice. Kept per step, so results never depend on earlier iterations."""

    def __init__(self):
        self._score: dict[int, dict[tuple[str, str], tuple[float, int]]] = {}
        self._classes: dict[int, dict[tuple[str, tuple], np.ndarray]] = {}

    def score(self, lm: LanguageModel, contexts: list[str], targets: list[str]) -> list[tuple[float, int]]:
        memo = self._score.setdefault(id(lm), {})
        keys = list(zip(contexts, targets))
        todo = sorted({k for k in keys if k not in memo})
        if todo:
            out = lm.score([c for c, _ in todo], [t for _, t in todo])
            if len(out) != len(todo):
                raise RuntimeError(f"backend {lm.name!r}: score returned {len(out)} results for "
                                   f"{len(todo)} requests")
            for k, s in zip(todo, out):
                memo[k] = (float(s.logprob), int(s.num_tokens))
        return [memo[k] for k in keys]

    def next_token_logprobs(self, lm: LanguageModel, contexts: list[str], candidates: list[str],
                            aggregate: str | None = None) -> np.ndarray:
        """``aggregate`` None: the backend's default (no keyword sent, the protocol's old form)."""
        memo = self._classes.setdefault(id(lm), {})
        cands = (tuple(candidates), aggregate)
        todo = sorted({c for c in contexts if (c, cands) not in memo})
        if todo:
            kwargs = {} if aggregate is None else {"aggregate": aggregate}
            out = np.asarray(lm.next_token_logprobs(todo, list(candidates), **kwargs), dtype=np.float64)
            if out.shape != (len(todo), len(candidates)):
                raise RuntimeError(f"backend {lm.name!r}: next_token_logprobs returned shape "
                                   f"{out.shape}, expected {(len(todo), len(candidates))}")
            for c, row in zip(todo, out):
                memo[(c, cands)] = row
        return np.stack([memo[(c, cands)] for c in contexts]) if contexts else np.zeros((0, len(candidates)))


def verbalizers(cls: str) -> list[str]:
    """A class's verbalizer alternatives: "a|A" -> ["a", "A"] (the first is its prototype)."""
    return cls.split("|")


def class_scoring_mode(classes: list[str]) -> str:
    """"next_token" when the first characters of the classes' verbalizers tell the classes
    apart, else "full_string"."""
    firsts = [{v.lstrip()[:1] for v in verbalizers(c)} for c in classes]
    disjoint = all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
    return "next_token" if disjoint else "full_string"


def class_logprobs(lm: LanguageModel, contexts: list[str], classes: list[str],
                   cache: CallCache | None = None, aggregation: str = "sum",
                   space_variants: str = "sum") -> np.ndarray:
    """[N, C] unnormalised log-probabilities of the classes after each context.

    Each verbalizer alternative of a class ("a|A") is scored, with and without a leading space
    (" a", "a"). ``space_variants`` combines an alternative's two forms and ``aggregation`` the
    alternatives: "sum" adds probabilities, "max" keeps the largest. Both "sum" (the default,
    the DLN reference's): the class gets the total probability of the distinct first tokens of
    all its forms, a token two forms share counted once (`lm.candidates`). ``space_variants``
    "max" scores with the protocol's two-argument form, which every backend implements; "sum"
    needs a backend whose ``next_token_logprobs`` takes the ``aggregate`` keyword.

    `next_token_logprobs` sees only a verbalizer's first token: when verbalizers of two classes
    start alike ("(A)", "(B)") it cannot tell them apart, so those tasks score whole strings
    (" " + verbalizer, teacher-forced; ``space_variants`` does not apply)."""
    for key, value in (("class_aggregation", aggregation), ("space_variants", space_variants)):
        if value not in ("sum", "max"):
            raise ValueError(f"{key} must be 'sum' or 'max', got {value!r}")
    cache = cache or CallCache()
    alts = [v for c in classes for v in verbalizers(c)]
    if class_scoring_mode(classes) == "next_token":
        if space_variants == "sum":
            require_aggregate(lm)
            if aggregation == "sum":   # one candidate per class: its forms' distinct tokens summed
                return cache.next_token_logprobs(lm, contexts, list(classes), "sum")
        lp = cache.next_token_logprobs(lm, contexts, alts, None if space_variants == "max" else "sum")
    else:
        flat_c = [c for c in contexts for _ in alts]
        flat_t = [" " + v for _ in contexts for v in alts]
        out = cache.score(lm, flat_c, flat_t)
        lp = np.asarray([v for v, _ in out], dtype=np.float64).reshape(len(contexts), len(alts))
    if len(alts) == len(classes):
        return lp
    cols, start = [], 0
    for c in classes:
        part = lp[:, start:start + len(verbalizers(c))]
        start += part.shape[1]
        cols.append(np.logaddexp.reduce(part, axis=1) if aggregation == "sum" else part.max(axis=1))
    return np.stack(cols, axis=1)


class BackendCapabilityError(UserError, TypeError):
    """A backend lacks what a setting asks of it; the message names the backend and the fix."""


def require_aggregate(lm: LanguageModel) -> None:
    """Refuse a backend (under its wrappers) whose ``next_token_logprobs`` takes no
    ``aggregate`` keyword, naming it and the two fixes."""
    inner = lm
    while getattr(inner, "inner", None) is not None:   # accounting / data-parallel wrappers
        inner = inner.inner
    try:
        params = inspect.signature(inner.next_token_logprobs).parameters.values()
    except (TypeError, ValueError):   # no signature to read (a builtin): let the call decide
        return
    if any(p.name == "aggregate" or p.kind is p.VAR_KEYWORD for p in params):
        return
    cls = type(inner)
    raise BackendCapabilityError(
        f"backend {lm.name!r} ({cls.__module__}.{cls.__qualname__}): its next_token_logprobs takes no "
        f"'aggregate' keyword, which class scoring with \"space_variants\": \"sum\" (the DLN reference's "
        f"default) needs to add up a verbalizer's forms with and without a leading space. Give it "
        f"`*, aggregate=\"max\"` (\"sum\": the total probability of the forms' distinct first tokens; "
        f"README, \"Your own backend\"), or set \"space_variants\": \"max\" in the config's dln or eval section")
