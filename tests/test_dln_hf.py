"""DLN on real transformers backends: each part on its own model, ELBOs checked against direct
single-request calls to the backends; and (when built) a zoo model on BBH navigate."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dln_ens.config import DLNConfig
from dln_ens.data.task import Example, Task
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.dln.network import DeepLanguageNetwork
from dln_ens.dln.samplers import PosteriorSampler, PromptProposer
from dln_ens.dln.templates import TemplateLibrary
from dln_ens.dln.trainer import VariationalTrainer

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "models" / "zoo"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LIB = TemplateLibrary("v1")


def toy_task() -> Task:
    ex = [Example(f"the {w} cat", "Yes" if i % 2 else "No") for i, w in enumerate("red blue green dog one two".split())]
    return Task("toy", "Answer yes or no.", ex, ex[:2], ex[:2], classes=["Yes", "No"])


def class_ll(lm, ctx, target, classes):
    """The reference's class scoring (the default): the forms' distinct first tokens summed
    (`next_token_logprobs` itself is checked against the model in test_hf)."""
    lps = lm.next_token_logprobs([ctx], classes, aggregate="sum")[0]
    return lps[classes.index(target)] - math.log(sum(math.exp(v) for v in lps))


def build(out_lm, hid_lm, prop_lm, task, layers, **cfg):
    cfg = DLNConfig(num_p_samples=2, num_h_samples=2, memory_size=0, hidden_max_new_tokens=8,
                    proposal_max_new_tokens=8, proposal_template="q_action_prompt:v1-short",
                    proposal_max_examples=1, **cfg)
    out = OutputLayer(LIB.get("classify_forward" if layers == 1 else "classify_residual"), out_lm,
                      task.instruction, task.classes)
    hidden = HiddenLayer(LIB.get("suffix_forward_tbs"), hid_lm, "Think.", max_new_tokens=8) if layers == 2 else None
    net = DeepLanguageNetwork(out, hidden)
    post = PosteriorSampler(LIB.get("suffix_forward_tbs_y"), hid_lm, max_new_tokens=8) if layers == 2 else None
    prop = PromptProposer(LIB.get(cfg.proposal_template), prop_lm, 8, 0.7, cfg.proposal_max_examples)
    return net, VariationalTrainer(net, prop, post, task, cfg)


def test_dln_iterations_on_two_hf_models(tiny_gpt2_dir, tiny_llama_dir):
    from dln_ens.lm.hf import HFLanguageModel
    gpt2 = HFLanguageModel.from_pretrained(tiny_gpt2_dir, name="gpt2")
    llama = HFLanguageModel.from_pretrained(tiny_llama_dir, name="llama")
    task = toy_task()

    net, tr = build(llama, None, gpt2, task, layers=1)
    rec = tr.step(task.train, 1)
    assert rec["updated"], "the random model makes errors on the alternating labels"
    for c in rec["p2_candidates"]:
        hand = np.mean([class_ll(llama, f"{c['prompt']}\n\nInput: {e.input}\nAnswer:", e.target, task.classes)
                        for e in task.train])
        assert c["elbo"] == pytest.approx(hand, abs=1e-4)

    net, tr = build(llama, gpt2, gpt2, task, layers=2, posterior_temp=2.0)
    rec = tr.step(task.train, 1)
    assert len(rec["hidden"]) == len(task.train) and rec["updated"]
    H, W = rec["posterior"]["samples"], rec["posterior"]["weights"]
    for i, e in enumerate(task.train):
        logits = []
        for h in H[i]:
            ll = class_ll(llama, f"Answer yes or no.\n\nInput: {e.input}\nYour thoughts were: {h}\nAnswer:",
                          e.target, task.classes)
            s = gpt2.score([f"Think.\n\nInput: {e.input}\nLet's think step by step."], [" " + h])[0]
            logits.append((ll + s.logprob / max(s.num_tokens, 1)) / 2.0)
        z = sum(math.exp(v) for v in logits)
        assert W[i] == pytest.approx([math.exp(v) / z for v in logits], abs=1e-4)
    best1 = max(rec["p1_candidates"], key=lambda c: c["objective"])["prompt"]
    assert net.prompts["p1"] == best1


@pytest.mark.skipif(not (ZOO / "zoo-gpt2" / "config.json").is_file() or not (SHARED / "bbh").is_dir(),
                    reason="needs the zoo (dln-ens zoo) and ../shared/data")
@pytest.mark.parametrize("layers", [1, 2])
def test_zoo_member_on_bbh_navigate(layers):
    from dln_ens.data.registry import load_task
    from dln_ens.lm.hf import HFLanguageModel
    lm = HFLanguageModel.from_pretrained(ZOO / "zoo-gpt2", name="zoo-gpt2")
    task = load_task("bbh/navigate", root=str(SHARED))
    net, tr = build(lm, lm, lm, task, layers=layers)
    rec = tr.step(task.train[:4], 1)
    assert 0.0 <= rec["train_loss"] <= 1.0 and all(p in task.classes for p in rec["predictions"])
    if rec["updated"]:
        assert net.output.prompt == max(rec["p2_candidates"], key=lambda c: c["objective"])["prompt"]
