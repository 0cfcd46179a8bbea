"""Language layers: a template + a prompt + a backend (any `LanguageModel`).

Every method takes one prompt per request, so a caller can put all examples x all candidate
prompts into a single backend call. Requests are deduplicated and sorted before they go out:
identical contexts (one context, many targets) and contexts that share a prompt prefix end up
adjacent in one call, which is what lets a local backend reuse a shared prefix's KV cache.
"""
from __future__ import annotations

import numpy as np

from dln_ens.dln.elbo import class_log_likelihood, log_softmax
from dln_ens.dln.templates import DLNTemplate
from dln_ens.lm.base import LanguageModel
from dln_ens.scoring import CallCache, class_logprobs, class_scoring_mode, verbalizers


def generate(lm: LanguageModel, prompts: list[str], *, max_new_tokens: int, stop, temperature: float,
             seed: int | None):
    """Generate in as few calls as possible. Greedy: identical prompts are sent once.
    Sampled: a backend may seed each sequence by its prompt text (the HF backend does, so that
    a prompt samples the same text whatever it is batched with), so k copies of one prompt go
    out in k calls ("rounds") with different seeds; every distinct prompt is in round 0."""
    kw = dict(max_new_tokens=max_new_tokens, stop=list(stop))
    if temperature == 0.0:
        unique = sorted(set(prompts))
        by_prompt = dict(zip(unique, lm.generate(unique, temperature=0.0, seed=seed, **kw)))
        return [by_prompt[p] for p in prompts]
    rounds: list[list[int]] = []
    copies: dict[str, int] = {}
    for i, p in enumerate(prompts):
        r = copies[p] = copies.get(p, -1) + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    out = [None] * len(prompts)
    for r, idx in enumerate(rounds):
        round_seed = None if seed is None else (seed + 1_000_003 * r) % 2 ** 31
        for i, g in zip(idx, lm.generate([prompts[i] for i in idx], temperature=temperature,
                                         seed=round_seed, **kw)):
            out[i] = g
    return out


def _per_token(logprob: float, num_tokens: int, normalize: bool) -> float:
    return logprob / max(num_tokens, 1) if normalize else logprob


class OutputLayer:
    """The last layer: scores output classes (next-token log-probs of the verbalizers) when the
    task has them, generates a free answer otherwise. DLN-1 uses a forward template
    (prompt, input); DLN-2 a residual one (prompt, input, h)."""

    def __init__(self, template: DLNTemplate, backend: LanguageModel, prompt: str,
                 classes: list[str] | None = None, max_new_tokens: int = 16,
                 length_normalize: bool = True, class_aggregation: str = "sum", space_variants: str = "sum"):
        self.template, self.backend, self.prompt = template, backend, prompt
        self.classes = list(classes) if classes else None
        self.max_new_tokens = max_new_tokens
        self.length_normalize = length_normalize
        self.class_aggregation, self.space_variants = class_aggregation, space_variants
        self.class_mode = class_scoring_mode(self.classes) if self.classes else None

    def render(self, prompt: str, x: str, h: str | None = None) -> str:
        fields = {"prompt": prompt, "input": x}
        if h is not None:
            fields["h"] = h
        return self.template.render(**fields)

    def _contexts(self, prompts, inputs, hs):
        hs = hs if hs is not None else [None] * len(inputs)
        return [self.render(p, x, h) for p, x, h in zip(prompts, inputs, hs)]

    def class_index(self, targets: list[str]) -> np.ndarray:
        """The class of each target (a target may be any of a class's alternatives)."""
        lookup = {v: k for k, c in enumerate(self.classes) for v in verbalizers(c)}
        idx = []
        for t in targets:
            if t not in lookup:
                raise ValueError(f"target {t!r} is not one of the output classes {self.classes}")
            idx.append(lookup[t])
        return np.asarray(idx)

    def predict(self, prompts, inputs, hs=None, cache: CallCache | None = None) -> list[str]:
        cache = cache or CallCache()
        contexts = self._contexts(prompts, inputs, hs)
        if self.classes:
            lp = class_logprobs(self.backend, contexts, self.classes, cache, self.class_aggregation,
                                self.space_variants)
            return [verbalizers(self.classes[i])[0] for i in np.argmax(lp, axis=1)]
        out = generate(self.backend, contexts, max_new_tokens=self.max_new_tokens,
                       stop=self.template.stop, temperature=0.0, seed=None)
        return [g.text.strip() for g in out]

    def log_likelihood(self, prompts, inputs, targets, hs=None, cache: CallCache | None = None):
        """log p(target | prompt, input[, h]) per request, and the class distribution [N, C]
        (None without classes). Free targets are scored teacher-forced after one space,
        per token when length_normalize."""
        cache = cache or CallCache()
        contexts = self._contexts(prompts, inputs, hs)
        if self.classes:
            lp = class_logprobs(self.backend, contexts, self.classes, cache, self.class_aggregation,
                                self.space_variants)
            return class_log_likelihood(lp, self.class_index(targets)), np.exp(log_softmax(lp, axis=1))
        out = cache.score(self.backend, contexts, [" " + t for t in targets])
        return np.asarray([_per_token(lp, n, self.length_normalize) for lp, n in out]), None

    def correctness(self, prompts, inputs, targets, is_correct, hs=None,
                    cache: CallCache | None = None) -> np.ndarray:
        preds = self.predict(prompts, inputs, hs, cache)
        return np.asarray([float(is_correct(p, t)) for p, t in zip(preds, targets)])


def strip_options(x: str) -> str:
    """The input without its answer options (BBH appends "Options: ..."): what the hidden layer
    reads with ``strip_options_for_hidden``, so that h reasons instead of picking an option."""
    return x[:x.index("Options:")].strip() if "Options:" in x else x


def clean_hidden(text: str) -> str:
    """A generated h as the reference keeps it: blank lines folded, ends stripped."""
    return text.replace("\n\n", "\n").strip()


class HiddenLayer:
    """DLN-2's first layer: writes a hidden text h for each input (greedy forward pass) and
    scores log p(h | prompt, input). ``stop`` overrides the template's stop strings;
    ``strip_options`` hides the input's answer options from this layer."""

    def __init__(self, template: DLNTemplate, backend: LanguageModel, prompt: str,
                 max_new_tokens: int = 32, length_normalize: bool = True,
                 stop: tuple[str, ...] | None = None, strip_options: bool = False):
        self.template, self.backend, self.prompt = template, backend, prompt
        self.max_new_tokens = max_new_tokens
        self.length_normalize = length_normalize
        self.stop = tuple(template.stop if stop is None else stop)
        self.strip_options = strip_options

    def view(self, x: str) -> str:
        """The input as this layer reads it."""
        return strip_options(x) if self.strip_options else x

    def render(self, prompt: str, x: str) -> str:
        return self.template.render(prompt=prompt, input=self.view(x))

    def forward(self, prompts, inputs) -> list[str]:
        out = generate(self.backend, [self.render(p, x) for p, x in zip(prompts, inputs)],
                       max_new_tokens=self.max_new_tokens, stop=self.stop,
                       temperature=0.0, seed=None)
        return [clean_hidden(g.text) for g in out]

    def log_prob(self, prompts, inputs, hs, cache: CallCache | None = None) -> np.ndarray:
        cache = cache or CallCache()
        contexts = [self.render(p, x) for p, x in zip(prompts, inputs)]
        out = cache.score(self.backend, contexts, [" " + h for h in hs])
        return np.asarray([_per_token(lp, n, self.length_normalize) for lp, n in out])
