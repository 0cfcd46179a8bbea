"""The variational trainer against hand-computed ELBOs with a scripted fake backend."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dln_ens.config import DLNConfig
from dln_ens.data.task import Example, Task
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.dln.network import DeepLanguageNetwork
from dln_ens.dln.samplers import PosteriorSampler, PromptProposer
from dln_ens.dln.templates import TemplateLibrary
from dln_ens.dln.trainer import VariationalTrainer, balanced_batch_indices, batch_indices

from dln_fake import ScriptedLM, hashed_logprob, num_tokens

LIB = TemplateLibrary("v1")


def fwd(p, x):
    return f"{p}\n\nInput: {x}\nAnswer:"


def resid(p, x, h):
    return f"{p}\n\nInput: {x}\nYour thoughts were: {h}\nAnswer:"


def hid(p, x):
    return f"{p}\n\nInput: {x}\nLet's think step by step."


def class_ll(lm_logp, ctx, target, classes):
    """log p(target | ctx) renormalised over the classes, by hand."""
    lps = [lm_logp(ctx, " " + c) for c in classes]
    return lm_logp(ctx, " " + target) - math.log(sum(math.exp(v) for v in lps))


def make_task(classes, n=8, targets=None):
    targets = targets or [classes[i % len(classes)] for i in range(n)]
    ex = [Example(f"question {i} answer={t}", t) for i, t in enumerate(targets)]
    return Task("toy", "Answer the question.", ex, ex[:2], ex[:2], classes=list(classes))


def dln1(lm, task, **cfg):
    out = OutputLayer(LIB.get("classify_forward"), lm, task.instruction, task.classes)
    net = DeepLanguageNetwork(out)
    prop = PromptProposer(LIB.get("q_action_prompt"), lm)
    return net, VariationalTrainer(net, prop, None, task, DLNConfig(**cfg))


def test_dln1_elbo_is_mean_class_loglik_and_best_is_chosen():
    lm = ScriptedLM()
    task = make_task(["Yes", "No"])
    net, tr = dln1(lm, task, num_p_samples=3, memory_size=0)
    rec = tr.step(task.train, 1)
    assert rec["updated"], "the scripted batch has errors"
    cands = [c["prompt"] for c in rec["p2_candidates"]]
    assert cands[0] == "Answer the question." and len(cands) == 3     # current + num_p_samples - 1 new
    hand = [np.mean([class_ll(hashed_logprob, fwd(c, e.input), e.target, task.classes) for e in task.train])
            for c in cands]
    assert [c["elbo"] for c in rec["p2_candidates"]] == pytest.approx(hand, abs=1e-9)
    assert net.output.prompt == cands[int(np.argmax(hand))]
    assert rec["elbo2"] == pytest.approx(max(hand))
    # the forward pass predicted argmax class under the initial prompt
    for e, p in zip(task.train, rec["predictions"]):
        lps = [hashed_logprob(fwd("Answer the question.", e.input), " " + c) for c in task.classes]
        assert p == task.classes[int(np.argmax(lps))]


def test_one_call_per_stage():
    """Forward, proposals and candidate scoring each go out as one batched backend call."""
    lm = ScriptedLM()
    task = make_task(["Yes", "No"])
    _, tr = dln1(lm, task, num_p_samples=4, memory_size=0)
    tr.step(task.train, 1)
    assert [m for m, _ in lm.calls] == ["next_token_logprobs", "generate", "next_token_logprobs"]
    assert lm.calls[1][1] == 3                      # all proposals in one call
    assert lm.calls[2][1] == 8 * 3                  # 8 examples x 3 new candidates (current cached)


# a controlled 3-class table: INIT predicts "No" (wrong), A and B are the two proposals
TABLE = {"INIT": (0.245, 0.665, 0.09), "A": (0.5, 0.45, 0.05), "B": (0.45, 0.05, 0.5),
         "MEM": (0.9, 0.05, 0.05)}
CLASSES = ["Yes", "No", "Maybe"]


def table_logp(ctx, target):
    prompt = ctx.split("\n\n")[0]
    if prompt in TABLE:
        return math.log(TABLE[prompt][CLASSES.index(target.strip())])
    return hashed_logprob(ctx, target)


def table_gen(prompt, i, seed, temperature):
    return [" A", " B"][i]


def controlled(**cfg):
    lm = ScriptedLM(gen=table_gen, logp=table_logp)
    task = make_task(CLASSES, n=4, targets=["Yes"] * 4)
    task.instruction = "INIT"
    return dln1(lm, task, **{"num_p_samples": 3, **cfg})


def objective(prompt, tf=0.0, lp=0.0):
    p0, p = np.array(TABLE["INIT"]), np.array(TABLE[prompt])
    elbo = math.log(p[0])
    kl = float(np.sum(p0 * (np.log(p0) - np.log(p))))
    return elbo - tf * kl - lp * math.log(p[1])


@pytest.mark.parametrize("tf,lp,expected", [(0.0, 0.0, "A"), (10.0, 0.0, "INIT"), (0.0, 1.0, "B")])
def test_trust_factor_and_logp_penalty_change_the_choice(tf, lp, expected):
    net, tr = controlled(memory_size=0, trust_factor=tf, logp_penalty=lp)
    rec = tr.step(tr.task.train, 1)
    rows = {r["prompt"]: r for r in rec["p2_candidates"]}
    assert set(rows) == {"INIT", "A", "B"}
    for p, r in rows.items():
        assert r["objective"] == pytest.approx(objective(p, tf, lp), abs=1e-9)
    assert max(rows, key=lambda p: objective(p, tf, lp)) == expected
    assert net.output.prompt == expected


def started_from(proposal_prompt: str) -> str:
    """The instruction a rendered backward prompt (q_action_prompt v1) asks to rewrite."""
    return proposal_prompt.split("## Instruction\n> ", 1)[1].split("\n[END]", 1)[0]


def test_memory_prompts_join_the_candidates_and_proposals_rotate_over_them():
    net, tr = controlled(memory_size=2, num_p_samples=4)
    starts = []
    tr.proposer.backend.gen = lambda p, i, s, t: starts.append(started_from(p)) or [" A", " B", " C"][i]
    tr.remember({"p2": "MEM"}, 0.9)
    tr.remember({"p2": "INIT"}, 0.1)
    tr.remember({"p2": "A"}, 0.5)            # memory keeps the 2 best dev prompts
    assert [m["prompts"]["p2"] for m in tr.memory] == ["MEM", "A"]
    rec = tr.step(tr.task.train, 1)
    # num_p_samples - 1 = 3 proposals, starting from current, memory 1, memory 2 in turn
    assert starts == ["INIT", "MEM", "A"]
    # the reference's order: current, memory, new proposals (unique)
    assert [r["prompt"] for r in rec["p2_candidates"]] == ["INIT", "MEM", "A", "B", "C"]
    assert net.output.prompt == "MEM"
    starts.clear()                           # the current prompt in memory comes up twice
    tr.step(tr.task.train, 2)
    assert starts == ["MEM", "MEM", "A"]
    _, tr0 = controlled(memory_size=0)
    tr0.remember({"p2": "MEM"}, 0.9)
    assert tr0.memory == [] and tr0.step(tr0.task.train, 1)["prompts"]["p2"] == "A"


def test_variants_without_rotation_and_with_n_new_proposals():
    """rotate_proposal_prompts=False: every proposal rewrites the current prompt;
    proposals_include_current=False: num_p_samples new ones, memory after them (former order)."""
    net, tr = controlled(memory_size=2, num_p_samples=2, rotate_proposal_prompts=False,
                         proposals_include_current=False)
    starts = []
    tr.proposer.backend.gen = lambda p, i, s, t: starts.append(started_from(p)) or [" A", " B"][i]
    tr.remember({"p2": "MEM"}, 0.9)
    rec = tr.step(tr.task.train, 1)
    assert starts == ["INIT", "INIT"]
    assert [r["prompt"] for r in rec["p2_candidates"]] == ["INIT", "A", "B", "MEM"]


def test_validation_keeps_best_memory_on_gains_and_tolerance_reloads():
    net, tr = controlled(memory_size=2, tolerance=2)
    seq = [("INIT", 0.5), ("A", 0.7), ("B", 0.6), ("MEM", 0.4)]
    out = []
    for it, (prompt, acc) in enumerate(seq):
        net.set_prompts({"p2": prompt})
        out.append(tr.validated(acc, it))
    # gains at INIT and A; B and MEM are two validations without gain: the second reloads A
    assert [o["improved"] for o in out] == [True, True, False, False]
    assert [o["reloaded"] for o in out] == [False, False, False, True]
    assert net.output.prompt == "A" and tr.best == {"prompts": {"p2": "A"}, "dev": 0.7, "iteration": 1}
    assert tr.patience == 0
    # memory holds the prompts that beat the best dev accuracy (the reference), best first
    assert [m["prompts"]["p2"] for m in tr.memory] == ["A", "INIT"]


def test_memory_policy_top_and_no_tolerance():
    net, tr = controlled(memory_size=2, memory_policy="top")
    for it, (prompt, acc) in enumerate([("INIT", 0.5), ("A", 0.7), ("B", 0.6)]):
        net.set_prompts({"p2": prompt})
        assert not tr.validated(acc, it)["reloaded"]      # tolerance -1: never reloads
    assert [m["prompts"]["p2"] for m in tr.memory] == ["A", "B"]
    assert net.output.prompt == "B" and tr.patience == 1


def test_logp_penalty_decays_linearly():
    _, tr = controlled(memory_size=0, logp_penalty=2.0, iters=4)
    assert [tr.logp_penalty_at(t) for t in (1, 2, 3, 4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    rec = tr.step(tr.task.train, 3)
    rows = {r["prompt"]: r for r in rec["p2_candidates"]}
    for p, r in rows.items():
        assert r["objective"] == pytest.approx(objective(p, 0.0, 1.0), abs=1e-9)
    _, fixed = controlled(memory_size=0, logp_penalty=2.0, iters=4, decay_logp_penalty=False)
    assert fixed.logp_penalty_at(4) == 2.0


def test_penalty_scale_batch_and_wrong():
    from dln_ens.dln.elbo import penalty
    ll = np.array([[-1.0, -2.0], [-3.0, -5.0], [-7.0, -11.0], [-13.0, -17.0]])
    wrong = np.array([True, False, True, False])
    assert penalty(ll, wrong) == pytest.approx([(-1 - 7) / 4, (-2 - 11) / 4])
    assert penalty(ll, wrong, "wrong") == pytest.approx([(-1 - 7) / 2, (-2 - 11) / 2])
    assert penalty(ll, np.zeros(4, bool)) == pytest.approx([0.0, 0.0])


def test_dln1_proposes_without_errors_under_logprob_scoring():
    def no_errors(**cfg):
        net, tr = controlled(memory_size=0, **cfg)
        tr.task.train = [Example("question answer=No", "No")] * 2     # INIT predicts No: all correct
        return net, tr, tr.step(tr.task.train, 1)

    net, tr, rec = no_errors()
    assert rec["updated"] and {r["prompt"] for r in rec["p2_candidates"]} == {"INIT", "A", "B"}
    assert net.output.prompt == "INIT"      # log p(No) is highest under INIT
    for cfg in ({"skip_error_free_batches": True}, {"scoring": "accuracy"}):
        net, tr, rec = no_errors(**cfg)
        assert rec["updated"] is False and net.output.prompt == "INIT"


def dln2(lm, task, **cfg):
    out = OutputLayer(LIB.get("classify_residual"), lm, "P2", task.classes)
    hidden = HiddenLayer(LIB.get("suffix_forward_tbs"), lm, "P1")
    net = DeepLanguageNetwork(out, hidden)
    tr = VariationalTrainer(net, PromptProposer(LIB.get("q_action_prompt"), lm),
                            PosteriorSampler(LIB.get("suffix_forward_tbs_y"), lm), task, DLNConfig(**cfg))
    return net, tr


@pytest.mark.parametrize("rewrite_wrong_only,tf,lp,include_h", [
    (False, 0.0, 0.0, False), (True, 0.0, 0.0, False), (False, 0.3, 0.5, False),
    (False, 0.3, 0.5, True), (True, 0.0, 0.0, True)])
def test_dln2_posterior_weights_and_elbos(rewrite_wrong_only, tf, lp, include_h):
    lm = ScriptedLM()
    task = make_task(["Yes", "No"], n=6)
    T, nh = 0.5, 3
    net, tr = dln2(lm, task, num_p_samples=3, num_h_samples=nh, posterior_temp=T, memory_size=0,
                   rewrite_wrong_only=rewrite_wrong_only, trust_factor=tf, logp_penalty=lp,
                   posterior_include_forward_h=include_h, iters=1)
    rec = tr.step(task.train, 1)
    assert rec["updated"]
    H, W, h1 = rec["posterior"]["samples"], rec["posterior"]["weights"], rec["hidden"]
    wrong = [p != e.target for p, e in zip(rec["predictions"], task.train)]
    assert any(wrong) and not all(wrong)
    for i, e in enumerate(task.train):
        rewritten = wrong[i] or not rewrite_wrong_only
        if not rewritten:
            assert H[i] == [h1[i]]                          # keeps its forward h, weight 1
        elif include_h:
            assert H[i][0] == h1[i] and len(H[i]) == 1 + nh  # variant: the forward h is sample 0
        else:
            assert len(H[i]) == nh and h1[i] not in H[i]    # posterior samples only
        assert len(set(H[i])) == len(H[i])                  # copies of one prompt sample apart
        logits = [(class_ll(hashed_logprob, resid("P2", e.input, h), e.target, task.classes)
                   + hashed_logprob(hid("P1", e.input), " " + h) / num_tokens(" " + h)) / T for h in H[i]]
        z = sum(math.exp(v) for v in logits)
        assert W[i] == pytest.approx([math.exp(v) / z for v in logits], abs=1e-9)

    def elbo(score):
        return np.mean([sum(w * score(e, h) for w, h in zip(W[i], H[i])) for i, e in enumerate(task.train)])

    c2 = [r["prompt"] for r in rec["p2_candidates"]]
    c1 = [r["prompt"] for r in rec["p1_candidates"]]
    e2 = [elbo(lambda e, h: class_ll(hashed_logprob, resid(c, e.input, h), e.target, task.classes)) for c in c2]
    e1 = [elbo(lambda e, h: hashed_logprob(hid(c, e.input), " " + h) / num_tokens(" " + h)) for c in c1]
    assert [r["elbo"] for r in rec["p2_candidates"]] == pytest.approx(e2, abs=1e-9)
    assert [r["elbo"] for r in rec["p1_candidates"]] == pytest.approx(e1, abs=1e-9)

    def probs(c, e, h):
        lps = np.array([hashed_logprob(resid(c, e.input, h), " " + k) for k in task.classes])
        return np.exp(lps) / np.exp(lps).sum()

    # trust factor: KL(current || candidate) on the forward h; logp penalty: log p(forward h | x)
    # under each p1 candidate, summed over the wrong examples, divided by the batch size
    kl = [np.mean([np.sum(probs("P2", e, h1[i]) * np.log(probs("P2", e, h1[i]) / probs(c, e, h1[i])))
                   for i, e in enumerate(task.train)]) for c in c2]
    pen = [sum(hashed_logprob(hid(c, e.input), " " + h1[i]) / num_tokens(" " + h1[i])
               for i, e in enumerate(task.train) if wrong[i]) / len(task.train) for c in c1]
    o2 = [e - tf * k for e, k in zip(e2, kl)]
    o1 = [e - lp * p for e, p in zip(e1, pen)]
    assert [r["objective"] for r in rec["p2_candidates"]] == pytest.approx(o2, abs=1e-9)
    assert [r["objective"] for r in rec["p1_candidates"]] == pytest.approx(o1, abs=1e-9)
    assert net.prompts == {"p1": c1[int(np.argmax(o1))], "p2": c2[int(np.argmax(o2))]}
    assert c1[0] == "P1" and c2[0] == "P2" and len(c1) == len(c2) == 3


def test_dln2_skips_a_batch_without_errors():
    lm = ScriptedLM()
    task = make_task(["Yes", "No"], n=4)
    net, tr = dln2(lm, task, num_p_samples=3, num_h_samples=2, memory_size=0)
    hs, preds = net.forward([e.input for e in task.train])
    batch = [Example(e.input, p) for e, p in zip(task.train, preds)]     # targets = predictions
    rec = tr.step(batch, 1)
    assert rec["updated"] is False and net.prompts == {"p1": "P1", "p2": "P2"}


def test_dln2_needs_a_hidden_sample():
    with pytest.raises(ValueError, match="num_h_samples"):
        dln2(ScriptedLM(), make_task(["Yes", "No"]), num_h_samples=0)
    dln2(ScriptedLM(), make_task(["Yes", "No"]), num_h_samples=0, posterior_include_forward_h=True)


def test_posterior_template_mix_and_hidden_layer_options():
    """Each posterior sample draws its template (seeded); the hidden layer and the posterior
    read the input without its options with strip_options; h keeps no blank line."""
    lm = ScriptedLM(gen=lambda p, i, s, t: " line one\n\nline two")
    tpl_y, tpl = LIB.get("suffix_forward_tbs_y:v2"), LIB.get("suffix_forward_tbs:v2")
    post = PosteriorSampler([tpl_y, tpl], lm, stop=())
    seen = []
    lm.gen = lambda p, i, s, t: seen.append(p) or " h"
    post.sample("", ["x1", "x2"], ["Yes", "No"], 8, seed=3)
    with_y = [p for p in seen if "Knowing that the answer is" in p]
    assert 0 < len(with_y) < 16 and all(p.endswith("Let's think step by step.") for p in seen)
    assert seen[0].startswith("x1\n\n") and "\n\nP" not in seen[0]        # suffix form, empty prompt
    seen.clear()
    post.sample("", ["x1", "x2"], ["Yes", "No"], 8, seed=3)
    assert len([p for p in seen if "Knowing" in p]) == len(with_y)            # seeded
    lm.gen = lambda p, i, s, t: seen.append(p) or " line one\n\nline two"
    layer = HiddenLayer(tpl, lm, "Think.", strip_options=True, stop=())
    assert layer.forward(["Think."], ["Q: go left?\nOptions:\n- Yes\n- No"]) == ["line one\nline two"]
    assert seen[-1] == "Q: go left?\n\nThink. Let's think step by step."
    assert LIB.get("suffix_forward_tbs:v2").stop == ()                     # h runs to the token limit


def test_held_out_ranking_each_proposal_reads_its_own_half_and_ranks_on_the_batch():
    lm = ScriptedLM()
    task = make_task(["Yes", "No"], n=8)
    _, tr = dln1(lm, task, num_p_samples=4, memory_size=0, held_out_prompt_ranking=True,
                 proposal_max_examples=None)
    seen = []
    lm.gen = lambda p, i, s, t: seen.append(p) or f" new {i}"
    rec = tr.step(task.train, 1)
    shown = [frozenset(k for k, e in enumerate(task.train) if f"> {e.input}\n" in p) for p in seen]
    assert len(shown) == 3 and all(len(s) == 4 for s in shown) and len(set(shown)) > 1
    cands = [c["prompt"] for c in rec["p2_candidates"]]
    hand = [np.mean([class_ll(hashed_logprob, fwd(c, e.input), e.target, task.classes) for e in task.train])
            for c in cands]
    assert [c["elbo"] for c in rec["p2_candidates"]] == pytest.approx(hand, abs=1e-9)


def test_held_out_split_variant_scores_the_other_half():
    lm = ScriptedLM()
    task = make_task(["Yes", "No"], n=8)
    _, tr = dln1(lm, task, num_p_samples=3, memory_size=0, held_out_prompt_ranking=True, held_out_mode="split")
    prop, rank = tr._split(8, 1)
    assert len(prop) == len(rank) == 4 and not set(prop) & set(rank)
    rec = tr.step(task.train, 1)
    cands = [c["prompt"] for c in rec["p2_candidates"]]
    hand = [np.mean([class_ll(hashed_logprob, fwd(c, task.train[i].input), task.train[i].target, task.classes)
                     for i in rank]) for c in cands]
    assert [c["elbo"] for c in rec["p2_candidates"]] == pytest.approx(hand, abs=1e-9)


def test_batches_cover_each_epoch_once():
    seen = [i for it in range(1, 4) for i in batch_indices(9, 3, seed=5, iteration=it)]
    assert sorted(seen) == list(range(9))
    assert batch_indices(9, 3, 5, 2) == batch_indices(9, 3, 5, 2)
    assert batch_indices(9, 3, 5, 4) != batch_indices(9, 3, 6, 4)


def test_balanced_batches_take_the_classes_in_turn():
    targets = ["No"] * 8 + ["Yes"] * 2 + ["Maybe"] * 5
    for it in range(1, 6):
        idx = balanced_batch_indices(targets, 7, seed=1, iteration=it)
        got = [targets[i] for i in idx]
        assert len(set(idx)) == 7
        # round-robin: each full round holds one of each class; "Yes" runs out after 2 rounds
        assert sorted(got[:3]) == sorted(got[3:6]) == ["Maybe", "No", "Yes"]
        assert got[6] != "Yes"
    assert balanced_batch_indices(targets, 7, 1, 2) == balanced_batch_indices(targets, 7, 1, 2)
    assert len(balanced_batch_indices(targets, 40, 1, 1)) == len(targets)


def test_proposer_shows_at_most_max_examples_errors_first():
    from dln_ens.dln.samplers import BackwardInfo, ProposalJob
    lm = ScriptedLM()
    prop = PromptProposer(LIB.get("q_action_prompt"), lm, max_examples=2)
    infos = [BackwardInfo(f"in{i}", "t", "o", wrong=(i == 3)) for i in range(5)]
    seen = []
    lm.gen = lambda p, i, s, t: seen.append(p) or " new"
    out = prop.propose([ProposalJob(["P"], infos, 3)], np.random.default_rng(0), seed=1)
    assert out == [["new", "new", "new"]] and len(seen) == 3
    for text in seen:
        shown = [i for i in range(5) if f"> in{i}\n" in text]
        assert len(shown) == 2 and 3 in shown


def test_verbalizers_sharing_a_first_character_are_scored_as_whole_strings():
    lm = ScriptedLM()
    out = OutputLayer(LIB.get("classify_forward"), lm, "P", ["(A)", "(B)", "(C)"])
    assert out.class_mode == "full_string"
    ll, probs = out.log_likelihood(["P", "Q"], ["x1", "x2"], ["(B)", "(C)"])
    assert {m for m, _ in lm.calls} == {"score"}
    for i, (p, x, t) in enumerate([("P", "x1", "(B)"), ("Q", "x2", "(C)")]):
        assert ll[i] == pytest.approx(class_ll(hashed_logprob, fwd(p, x), t, ["(A)", "(B)", "(C)"]), abs=1e-9)
        assert probs[i].sum() == pytest.approx(1.0)
    assert OutputLayer(LIB.get("classify_forward"), lm, "P", ["Yes", "No"]).class_mode == "next_token"


def test_plain_evaluation_scores_shared_first_character_verbalizers_as_whole_strings():
    """evaluate.predict and the DLN output layer choose classes the same way."""
    from dln_ens.data.task import Task
    from dln_ens.evaluate import predict
    lm = ScriptedLM()
    task = Task("mc", "P", [], [], [], classes=["(A)", "(B)", "(C)"])
    contexts = [fwd("P", "x1"), fwd("P", "x2")]
    preds = predict(lm, task, contexts, max_new_tokens=4, batch_size=8)
    assert {m for m, _ in lm.calls} == {"score"}
    expected = [max(task.classes, key=lambda c: hashed_logprob(ctx, " " + c)) for ctx in contexts]
    assert preds == expected


@pytest.mark.parametrize("aggregation", ["sum", "max"])
def test_class_verbalizer_alternatives_are_aggregated(aggregation):
    lm = ScriptedLM()
    classes = ["Yes|yes|Y", "No|no"]
    out = OutputLayer(LIB.get("classify_forward"), lm, "P", classes, class_aggregation=aggregation)
    ll, probs = out.log_likelihood(["P", "Q"], ["x1", "x2"], ["yes", "No"])
    agg = (lambda v: math.log(sum(math.exp(a) for a in v))) if aggregation == "sum" else max
    for i, (p, x, k) in enumerate([("P", "x1", 0), ("Q", "x2", 1)]):
        scores = [agg([hashed_logprob(fwd(p, x), " " + v) for v in c.split("|")]) for c in classes]
        z = math.log(sum(math.exp(v) for v in scores))
        assert ll[i] == pytest.approx(scores[k] - z, abs=1e-9)
    preds = out.predict(["P"], ["x1"])
    assert preds[0] in ("Yes", "No")           # the prototype (first alternative) is predicted
    assert out.class_index(["Y", "no", "No"]).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="not one of the output classes"):
        out.class_index(["maybe"])


def test_posterior_weights_are_uniform_from_temperature_100():
    lm = ScriptedLM()
    task = make_task(["Yes", "No"], n=4)
    _, tr = dln2(lm, task, num_p_samples=2, num_h_samples=3, posterior_temp=100.0, memory_size=0)
    rec = tr.step(task.train, 1)
    assert rec["updated"]
    for w in rec["posterior"]["weights"]:
        assert w == pytest.approx([1 / 3] * 3)
