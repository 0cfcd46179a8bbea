"""The DLN's two samplers, each on its own backend: the prompt proposer q(p | ...) (backward
template: current instruction, the student's successes and errors, a rotating message) and
the posterior sampler q(h | x, y) of DLN-2's hidden states."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dln_ens.dln.layers import clean_hidden, generate
from dln_ens.dln.templates import DLNTemplate
from dln_ens.lm.base import LanguageModel


@dataclass
class BackwardInfo:
    input: str
    target: str
    output: str
    wrong: bool


@dataclass
class ProposalJob:
    """Proposals for one layer: the prompts proposals start from (proposal i rewrites
    ``prompts[i % len(prompts)]``: the current prompt, then the memory's), what the student did,
    how many to ask for, and whether each proposal reads only its own random half of the batch
    (held-out prompt ranking)."""
    prompts: list[str]
    infos: list[BackwardInfo]
    num_samples: int
    half: bool = False


def clean_prompt(text: str) -> str:
    return text.replace("[END]", "").strip()


class PromptProposer:
    def __init__(self, template: DLNTemplate, backend: LanguageModel, max_new_tokens: int = 48,
                 temperature: float = 0.7, max_examples: int | None = None):
        self.template, self.backend = template, backend
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.max_examples = max_examples   # bounds the prompt for short-context backends

    def render(self, prompt: str, infos: list[BackwardInfo], message: str) -> str:
        return self.template.render(prompt=prompt, backward_infos=infos, message=message)

    def pick(self, infos: list[BackwardInfo], rng: np.random.Generator, half: bool = False) -> list[BackwardInfo]:
        """The examples one proposal sees, in a fresh random order (with ``half``, the first
        half of that order only); with ``max_examples``, the errors are kept first (they are
        what the proposer must fix)."""
        order = [int(k) for k in rng.permutation(len(infos))]
        if half and len(order) > 1:
            order = order[:len(order) // 2]
        if self.max_examples is not None and len(order) > self.max_examples:
            keep = set(sorted(order, key=lambda k: not infos[k].wrong)[:self.max_examples])
            order = [k for k in order if k in keep]
        return [infos[k] for k in order]

    def propose(self, jobs: list[ProposalJob], rng: np.random.Generator, seed: int) -> list[list[str]]:
        """New prompts for every job, all in one generate call. Sample i of a job rewrites the
        job's prompt i (rotating) with message i (rotating) and the job's examples in a fresh
        random order. Empty proposals are dropped; the caller deduplicates against its other
        candidates."""
        messages = self.template.message_alternatives or ("",)
        texts, owner = [], []
        for j, job in enumerate(jobs):
            for i in range(job.num_samples):
                texts.append(self.render(job.prompts[i % len(job.prompts)],
                                         self.pick(job.infos, rng, job.half), messages[i % len(messages)]))
                owner.append(j)
        if not texts:
            return [[] for _ in jobs]
        try:
            out = generate(self.backend, texts, max_new_tokens=self.max_new_tokens,
                           stop=self.template.stop, temperature=self.temperature, seed=seed)
        except ValueError as e:   # e.g. a prompt longer than the backend's context
            short = "" if self.template.key == "q_action_prompt:v1-short" else \
                " or use the compact template (\"proposal_template\": \"q_action_prompt:v1-short\")"
            raise ValueError(f"prompt proposal with {self.template.key} on backend {self.backend.name!r} "
                             f"failed: {e}. To shorten the backward prompt, lower "
                             f"dln.proposal_max_examples (now {self.max_examples}){short}") from e
        proposals: list[list[str]] = [[] for _ in jobs]
        for j, g in zip(owner, out):
            p = clean_prompt(g.text)
            if p:
                proposals[j].append(p)
        return proposals


class PosteriorSampler:
    """q(h | x, y). With several templates (the reference's "suffix_forward_tbs_y|
    suffix_forward_tbs"), each sample draws its template at random (seeded), so some samples
    see the answer and some do not. ``stop`` overrides the first template's stop strings."""

    def __init__(self, template: DLNTemplate | list[DLNTemplate], backend: LanguageModel,
                 max_new_tokens: int = 32, temperature: float = 0.7, stop: tuple[str, ...] | None = None):
        self.templates = list(template) if isinstance(template, (list, tuple)) else [template]
        self.template, self.backend = self.templates[0], backend
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.stop = tuple(self.template.stop if stop is None else stop)

    def render(self, prompt: str, x: str, y: str, template: DLNTemplate | None = None) -> str:
        return (template or self.template).render(prompt=prompt, input=x, target=y)

    def sample(self, prompt: str, inputs: list[str], targets: list[str], num_samples: int,
               seed: int) -> list[list[str]]:
        """num_samples hidden states per (x, y), one generate call: [B][num_samples]."""
        if not inputs or num_samples <= 0:
            return [[] for _ in inputs]
        rng = np.random.default_rng(seed)
        picks = rng.integers(len(self.templates), size=len(inputs) * num_samples)
        texts = [self.render(prompt, x, y, self.templates[int(t)])
                 for (x, y), t in zip([(x, y) for x, y in zip(inputs, targets) for _ in range(num_samples)], picks)]
        out = generate(self.backend, texts, max_new_tokens=self.max_new_tokens,
                       stop=self.stop, temperature=self.temperature, seed=seed)
        hs = [clean_hidden(g.text) for g in out]
        return [hs[i * num_samples:(i + 1) * num_samples] for i in range(len(inputs))]
