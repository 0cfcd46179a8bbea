"""Synthetic tasks: exact labels, determinism, the facts split across members, prompt formats."""
import re
from collections import Counter

import pytest

from dln_ens.data import load_task, task_names
from dln_ens.data import synthetic as syn
from dln_ens.zoo.corpus import member_corpus


def walk(text: str) -> complex:
    """Independent navigate reference: position and heading as complex numbers."""
    pos, heading = 0j, 1j                      # facing north
    rel = {"forward": 1, "left": 1j, "backward": -1, "right": -1j}
    for m in re.finditer(r"Turn (left|right|around)|Take (\d+) steps?(?: (forward|backward|left|right))?", text):
        if m.group(1):
            heading *= {"left": 1j, "right": -1j, "around": -1}[m.group(1)]
        else:
            pos += int(m.group(2)) * heading * rel[m.group(3) or "forward"]
    return pos


def test_registered():
    assert {"facts_qa", "navigate"} <= set(task_names())


@pytest.mark.parametrize("name", ["facts_qa", "navigate"])
def test_deterministic_and_disjoint_splits(name):
    a, b, c = load_task(name, seed=0), load_task(name, seed=0), load_task(name, seed=1)
    assert [(e.input, e.target) for e in a.train + a.dev + a.test] == \
           [(e.input, e.target) for e in b.train + b.dev + b.test]
    assert [e.input for e in a.test] != [e.input for e in c.test]
    inputs = [e.input for e in a.train + a.dev + a.test]
    assert len(inputs) == len(set(inputs)), "an input appears in two splits"
    assert a.train and a.dev and a.test and a.instruction


def test_navigate_labels_match_independent_simulation():
    task = load_task("navigate")
    for e in task.train + task.dev + task.test:
        assert e.target == ("Yes" if walk(e.input) == 0 else "No"), e.input
    assert task.classes == ["Yes", "No"]
    counts = Counter(e.target for e in task.test)
    assert abs(counts["Yes"] - counts["No"]) <= 0.2 * len(task.test)
    styles = Counter("Always face forward" in e.input for e in task.test)
    assert styles[True] > 20 and styles[False] > 20, "both BBH move styles should occur"
    assert any("Turn" in e.input for e in task.test)


def test_navigate_thought_is_an_exact_trace():
    for e in load_task("navigate").dev[:50]:
        h = syn.navigate_thought(e.input)
        last = re.findall(r"\((-?\d+), (-?\d+)\)", h)[-1]
        end = walk(e.input)
        assert (int(last[0]), int(last[1])) == (end.real, end.imag)
        assert h.endswith("That is the start.") == (e.target == "Yes")


def test_simulator_rejects_unparseable_moves():
    with pytest.raises(ValueError, match="cannot parse"):
        syn.simulate_navigate("Take 3 steps. Jump twice.")


def test_facts_split_across_members():
    task = load_task("facts_qa")
    members = task.meta["members"]
    assert len(members) == 3
    facts = task.meta["facts"]
    holders = [set(f["members"]) for f in facts]
    assert all(1 <= len(h) <= 2 and h <= set(members) for h in holders)
    # every member knows facts no other member knows, and every pair shares some
    for m in members:
        assert sum(h == {m} for h in holders) >= 5, m
        for n in members:
            if n != m:
                assert sum({m, n} <= h for h in holders) >= 5, (m, n)
    # each member knows some, not all (an ensemble has something to gain)
    for m in members:
        k = sum(m in h for h in holders)
        assert 0.25 * len(facts) < k < 0.8 * len(facts)
    # known_by agrees with the fact records and covers every question of every split
    for e in task.train + task.dev + task.test:
        f = next(f for f in facts if f["value"] == e.target and f["entity"] in e.input)
        assert task.meta["known_by"][e.input] == f["members"]
    assert len(task.meta["paraphrase_test"]) == len(task.test)
    assert {e.input for e in task.meta["paraphrase_test"]}.isdisjoint(e.input for e in task.test)


def test_facts_values_are_consistent_one_word_answers():
    task = load_task("facts_qa")
    for e in task.train + task.dev + task.test:
        assert e.target and " " not in e.target
        assert task.is_correct(f" {e.target}.", e.target)
    ent = [f["entity"] for f in task.meta["facts"] if f["attribute"] == "capital"]
    assert len(ent) == len(set(ent))


FORWARD = re.compile(r"(?s)^(.*)\n\nInput: (.*)\nAnswer: (.*)\n$")


def _forward_docs(docs):
    return [m.groups() for d in docs if (m := FORWARD.match(d)) and "Your thoughts were" not in d]


def test_corpus_uses_fixed_formats_and_only_the_members_facts():
    docs = member_corpus("zoo-llama", seed=0, num_navigate=60, qa_repeats=1, num_proposals=10)
    assert all(d.endswith("\n") for d in docs)
    kinds = Counter()
    for d in docs:
        if d.startswith("Improve the instruction"):
            assert re.match(r"(?s)^.*\nInstruction: .*(\n\nInput: .*\nStudent answer: .*\nCorrect answer: .*)+"
                            r"\n\n.*\nNew instruction: .*\n$", d); kinds["proposal"] += 1
        elif "\nYour thoughts were: " in d:
            assert re.match(r"(?s)^.*\n\nInput: .*\nYour thoughts were: .*\nAnswer: .*\n$", d); kinds["residual"] += 1
        elif "\nCorrect answer: " in d:
            assert re.match(r"(?s)^.*\n\nInput: .*\nCorrect answer: .*\nLet's think step by step\. .*\n$", d); kinds["posterior"] += 1
        elif "\nLet's think step by step. " in d:
            assert re.match(r"(?s)^.*\n\nInput: .*\nLet's think step by step\. .*\n$", d); kinds["hidden"] += 1
        elif "\nInput: " in d:
            assert FORWARD.match(d); kinds["forward"] += 1
        else:
            assert d.count("\n") == 1; kinds["line"] += 1
    assert all(kinds[k] > 0 for k in ("forward", "residual", "hidden", "posterior", "line", "proposal"))
    facts = syn.make_facts(0)
    mine = {f.entity for f in facts if "zoo-llama" in f.members}
    others = {f.entity for f in facts if "zoo-llama" not in f.members} - mine
    text = "".join(docs)
    assert all(e in text for e in mine)
    assert not any(e in text for e in others), "a member was trained on a fact it must not know"
    nav = load_task("navigate")
    held = {e.input for e in nav.train + nav.dev + nav.test}
    assert held.isdisjoint(x for _, x, _ in _forward_docs(docs))


def test_prompts_matter_in_the_corpus():
    """The same question gets a different answer format under different instructions, and the
    generic task instructions are never followed by the task's own format."""
    docs = member_corpus("zoo-gpt2", seed=0, num_navigate=200, qa_repeats=2, num_proposals=100)
    facts = {f.question(p): f for f in syn.make_facts(0) for p in (0, 1)}
    generic_answers = Counter()
    for prompt, x, y in _forward_docs(docs):
        if x in facts:
            f = facts[x]
            if prompt in syn.FACTS_SHORT:
                assert y == f.value
            elif prompt in syn.FACTS_SENTENCE:
                assert y == f.sentence()
            else:
                assert prompt == syn.FACTS_GENERIC
                generic_answers[y == f.value] += 1
        else:
            returns = walk(x) == 0
            if prompt == syn.NAV_GENERIC:
                assert y not in ("Yes", "No")
                assert y in ("True", "1") if returns else y in ("False", "0")
            else:
                fmt = next(k for k, (_, ins) in syn.NAV_FORMATS.items() if prompt in ins)
                assert y == syn.NAV_FORMATS[fmt][0][0 if returns else 1]
    # the generic facts instruction mostly gets a sentence, so greedy decoding answers in sentences
    assert generic_answers[False] > 2 * generic_answers[True] > 0
    # a proposal's new instruction asks for the format of its correct answers
    for d in docs:
        if d.startswith("Improve the instruction"):
            correct = re.findall(r"\nCorrect answer: (.*)", d)
            new = re.search(r"\nNew instruction: (.*)\n$", d).group(1)
            if correct[0] in ("Yes", "No", "True", "False", "1", "0"):
                fmt = next(k for k, (v, _) in syn.NAV_FORMATS.items() if correct[0] in v)
                assert new in syn.NAV_FORMATS[fmt][1]
            else:
                assert new in (syn.FACTS_SHORT if " " not in correct[0] else syn.FACTS_SENTENCE)


def test_corpus_texts_continue_the_dln_templates():
    """Each zoo document is a DLN template rendering followed by " {output}\n"."""
    templates = pytest.importorskip("dln_ens.dln.templates")
    from types import SimpleNamespace

    from dln_ens.zoo import corpus

    t = lambda spec: templates.load_template(spec)
    x, h, y, p = "What is the capital of Druland?", "Druland is a country.", "Mes", "Answer with one word."
    assert corpus.forward(p, x, y) == t("classify_forward").render(prompt=p, input=x) + f" {y}\n"
    assert corpus.residual(p, x, h, y) == t("classify_residual").render(prompt=p, input=x, h=h) + f" {y}\n"
    assert corpus.hidden(p, x, h) == t("suffix_forward_tbs").render(prompt=p, input=x) + f" {h}\n"
    assert corpus.posterior(p, x, y, h) == t("suffix_forward_tbs_y").render(prompt=p, input=x, target=y) + f" {h}\n"
    q = t("q_action_prompt:v1-short")
    assert list(q.message_alternatives) == corpus.PROPOSAL_MESSAGES
    infos = [(x, "The capital of Druland is Mes.", y), ("What job does Al Bo have?", "pilot", "pilot")]
    objs = [SimpleNamespace(input=i, output=o, target=g, wrong=o != g) for i, o, g in infos]
    rendered = q.render(prompt=p, backward_infos=objs, message=corpus.PROPOSAL_MESSAGES[1])
    assert corpus.proposal(p, infos, corpus.PROPOSAL_MESSAGES[1], "Answer with one word.") == \
        rendered + " Answer with one word.\n"
