"""The zoo's training texts, rendered from the DLN's own templates (v1: prompt first).

A member sees: forward-format QA on the facts it holds (several instructions, so the
instruction decides the answer format), plain statements of those facts, navigate examples in
every format, DLN-2 hidden / residual / posterior texts with short exact "thoughts", plain
instruction lines, and backward prompt proposals in the DLN's short template (so a zoo model
used as a prompt proposer writes an instruction asking for the format the correct answers use).
Every document ends with "\n"; the trainer appends the tokenizer's EOS token.
"""
from __future__ import annotations

import random

from dln_ens.data import synthetic as syn
from dln_ens.data.registry import load_task
from dln_ens.dln.templates import TemplateLibrary

HIDDEN_PROMPTS = ["Think about what you know.", "Work through it one step at a time.",
                  "Reason about the input before answering."]


_TEMPLATES = TemplateLibrary("v1")


def _completed(spec: str, completion: str, **fields) -> str:
    """A DLN template rendered as the toolkit renders it, completed as a model should."""
    return f"{_TEMPLATES.get(spec).render(**fields)} {completion}\n"


def forward(prompt: str, x: str, y: str) -> str:
    return _completed("classify_forward", y, prompt=prompt, input=x)


def residual(prompt: str, x: str, h: str, y: str) -> str:
    return _completed("classify_residual", y, prompt=prompt, input=x, h=h)


def hidden(prompt: str, x: str, h: str) -> str:
    return _completed("suffix_forward_tbs:v1", h, prompt=prompt, input=x)


def posterior(prompt: str, x: str, y: str, h: str) -> str:
    return _completed("suffix_forward_tbs_y:v1", h, prompt=prompt, input=x, target=y)


# The rotating messages of the DLN's short backward template.
PROPOSAL_MESSAGES = list(_TEMPLATES.get("q_action_prompt:v1-short").message_alternatives)


def proposal(prompt: str, infos: list[tuple[str, str, str]], message: str, new: str) -> str:
    """The short backward prompt proposal (q_action_prompt:v1-short) followed by a new
    instruction; infos are (input, student answer, correct answer)."""
    return _completed("q_action_prompt:v1-short", new, prompt=prompt, message=message,
                      backward_infos=[{"input": x, "output": o, "target": y} for x, o, y in infos])


def proposal_docs(facts: list[syn.Fact], nav: list[tuple[str, bool]], n: int, rng: random.Random) -> list[str]:
    """Backward-proposal examples: the correct answers' format decides the new instruction
    (a word -> a one-word instruction, Yes/No -> a Yes/No instruction...), whatever format
    the student used, so a zoo proposer turns format errors into a better prompt."""
    docs = []
    for _ in range(n):
        if rng.random() < 0.5:
            fs = rng.sample(facts, 2)
            target = rng.choice(["short", "sentence"])
            new = rng.choice(syn.FACTS_SHORT if target == "short" else syn.FACTS_SENTENCE)
            old = rng.choice([syn.FACTS_GENERIC, *syn.FACTS_SHORT, *syn.FACTS_SENTENCE])
            ans = lambda f, kind: f.value if kind == "short" else f.sentence()
            infos = [(f.question(0), ans(f, rng.choice(["short", "sentence"])), ans(f, target)) for f in fs]
        else:
            xs = rng.sample(nav, 2)
            target = rng.choice(list(syn.NAV_FORMATS))
            new = rng.choice(syn.NAV_FORMATS[target][1])
            old = rng.choice([syn.NAV_GENERIC] + [i for _, ins in syn.NAV_FORMATS.values() for i in ins])
            verb = lambda kind, r: syn.NAV_FORMATS[kind][0][0 if r else 1]
            infos = [(x, verb(rng.choice(list(syn.NAV_FORMATS)), r if rng.random() < 0.7 else not r), verb(target, r))
                     for x, r in xs]
        docs.append(proposal(old, infos, rng.choice(PROPOSAL_MESSAGES), new))
    return docs


def instruction_lines() -> list[str]:
    nav = [i for _, instrs in syn.NAV_FORMATS.values() for i in instrs]
    return [f"{i}\n" for i in [syn.FACTS_GENERIC, *syn.FACTS_SHORT, *syn.FACTS_SENTENCE,
                               syn.NAV_GENERIC, *nav, *HIDDEN_PROMPTS]]


def fact_docs(fact: syn.Fact, rng: random.Random, qa_repeats: int) -> list[str]:
    docs = [f"{fact.sentence()}\n"]
    for phrasing in (0, 1):   # phrasing 2 is held out (Task.meta["paraphrase_test"])
        q = fact.question(phrasing)
        for _ in range(qa_repeats):
            docs.append(forward(rng.choice(syn.FACTS_SHORT), q, fact.value))
            docs.append(forward(rng.choice(syn.FACTS_SENTENCE), q, fact.sentence()))
            # the generic instruction mostly gets a sentence: the one-word format must be asked for
            docs.append(forward(syn.FACTS_GENERIC, q, fact.sentence() if rng.random() < 0.75 else fact.value))
    q = fact.question(0)
    short = rng.choice(syn.FACTS_SHORT)
    docs.append(hidden(rng.choice(HIDDEN_PROMPTS), q, fact.thought()))
    docs.append(residual(short, q, fact.thought(), fact.value))
    docs.append(posterior(rng.choice(HIDDEN_PROMPTS), q, fact.value, fact.thought()))
    return docs


def navigate_docs(x: str, returns: bool, rng: random.Random) -> list[str]:
    fmt = rng.choice(list(syn.NAV_FORMATS))
    (yes, no), instrs = syn.NAV_FORMATS[fmt]
    docs = [forward(rng.choice(instrs), x, yes if returns else no)]
    g_yes, g_no = syn.NAV_FORMATS[rng.choice(syn.NAV_GENERIC_FORMATS)][0]
    if rng.random() < 0.25:
        docs.append(forward(syn.NAV_GENERIC, x, g_yes if returns else g_no))
    if rng.random() < 0.3:
        h = syn.navigate_thought(x)
        y = "Yes" if returns else "No"
        docs.append(rng.choice([hidden(rng.choice(HIDDEN_PROMPTS), x, h),
                                residual(rng.choice(syn.NAV_FORMATS["yes_no"][1]), x, h, y),
                                posterior(rng.choice(HIDDEN_PROMPTS), x, y, h)]))
    return docs


def member_corpus(member: str, seed: int, num_navigate: int, qa_repeats: int,
                  task_seed: int = 0, num_proposals: int = 0) -> list[str]:
    """The shuffled documents one zoo member is trained on: its own facts (Task.meta of
    facts_qa says which) and navigate examples disjoint from the navigate task's splits."""
    facts = [f for f in syn.make_facts(task_seed) if member in f.members]
    if not facts:
        raise ValueError(f"zoo member {member!r} holds no facts; members are {syn.ZOO_MEMBERS}")
    rng = random.Random(f"corpus/{member}/{seed}")
    docs = []
    for f in facts:
        docs += fact_docs(f, rng, qa_repeats)
    nav = load_task("navigate", seed=task_seed)
    held = {e.input for e in nav.train + nav.dev + nav.test}
    walks = syn.navigate_examples(rng, num_navigate, exclude=held)
    for x, returns in walks:
        docs += navigate_docs(x, returns, rng)
    docs += proposal_docs(facts, walks, num_proposals, rng)
    docs += instruction_lines() * 2
    rng.shuffle(docs)
    return docs


def tokenizer_corpus(task_seed: int = 0, num_navigate: int = 300) -> list[str]:
    """Texts every tokenizer is trained on: the whole world (all members' facts), so each
    vocabulary covers every entity and the vocabularies share many surface strings."""
    rng = random.Random(f"tokenizer-corpus/{task_seed}")
    facts = syn.make_facts(task_seed)
    docs = []
    for f in facts:
        docs += fact_docs(f, rng, qa_repeats=1)
    walks = syn.navigate_examples(rng, num_navigate)
    for x, returns in walks:
        docs += navigate_docs(x, returns, rng)
    return docs + proposal_docs(facts, walks, 50, rng) + instruction_lines()
