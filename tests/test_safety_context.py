"""Context limits per member: "error" names the example, the member and both lengths; "left"
keeps the end and is counted; an evaluation reports how many examples were cut (issue 11)."""
from __future__ import annotations

import pytest
import torch

from dln_ens.config import parse_config
from dln_ens.data.registry import registered_tasks
from dln_ens.data.task import Example, Task
from dln_ens.lm.context import ContextLengthError
from dln_ens.lm.hf import HFLanguageModel

SHORT = "Input: yes no.\nAnswer:"
LONG = "Input: " + " ".join(["the red cat walks left"] * 20) + ".\nAnswer:"


def _long_task() -> Task:
    ex = [Example(f"yes no {i}" if i % 3 else " ".join(["the red cat walks left"] * 20) + f" {i}", "Yes")
          for i in range(12)]
    return Task("test/long_inputs", "Say Yes or No.", ex[:4], ex[4:8], ex[8:], classes=["Yes", "No"])


@pytest.fixture(autouse=True, scope="module")
def _tasks():
    with registered_tasks({"test/long_inputs": _long_task}):
        yield


def test_hf_error_names_example_member_and_lengths(tiny_gpt2_dir):
    lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir, name="g", context_limit=40)
    n = len(lm.tokenizer(LONG)["input_ids"])
    assert n > 40
    with pytest.raises(ContextLengthError) as err:
        lm.generate([SHORT, LONG], max_new_tokens=5)
    assert str(err.value).startswith(f"example 1: a prompt of {n} tokens + max_new_tokens=5 needs {n + 4} positions "
                                     f"in member 'g', whose context limit is 40; ")
    assert '"truncate": "left"' in str(err.value)
    with pytest.raises(ContextLengthError, match=rf"example 0: a context needs {n} positions"):
        lm.next_token_distribution([LONG])


def test_hf_left_truncation_keeps_the_end(tiny_gpt2_dir):
    lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir, context_limit=40, truncate="left")
    got = lm.next_token_distribution([SHORT, LONG, LONG])
    ids = lm.tokenizer(LONG)["input_ids"][-40:]
    with torch.no_grad():   # independent: transformers on the last 40 tokens
        ref = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert torch.allclose(got[1], ref, atol=1e-5) and torch.allclose(got[2], ref, atol=1e-5)
    assert lm.truncated == 2
    assert lm.generate([LONG], max_new_tokens=4)[0].num_tokens >= 1 and lm.truncated == 3


def test_ensemble_limits_per_member(tiny_gpt2_dir, tiny_llama_dir):
    from dln_ens.ensemble.model import EnsembleLanguageModel
    g = HFLanguageModel.from_pretrained(tiny_gpt2_dir, name="g")
    ll = HFLanguageModel.from_pretrained(tiny_llama_dir, name="l", context_limit=30)
    ens = EnsembleLanguageModel({"g": g, "l": ll}, main="g", method="union")   # union runs every member
    n = len(ll.tokenizer(LONG)["input_ids"])
    # while generating, a non-main member keeps two positions per new main token: 2 * (3 - 1)
    with pytest.raises(ContextLengthError, match=rf"example 1: a prompt \+ max_new_tokens=3 needs {n + 4} "
                                                 r"positions in member 'l', whose context limit is 30"):
        ens.generate([SHORT, LONG], max_new_tokens=3)
    with pytest.raises(ContextLengthError, match=rf"example 0: a context needs {n} positions in member 'l'"):
        ens.next_token_distribution([LONG])
    # a member the fusion does not read is not run, so its limit does not apply
    main_only = EnsembleLanguageModel({"g": g, "l": ll}, main="g", method="main")
    assert torch.equal(main_only.next_token_distribution([LONG]), g.next_token_distribution([LONG]))
    ll.set_context(30, "left")
    # independent: the longest suffix of the text that 'l' encodes into at most 30 tokens
    ref = next(LONG[i:] for i in range(len(LONG)) if len(ll.tokenizer(LONG[i:])["input_ids"]) <= 30)
    assert torch.equal(ens.next_token_distribution([LONG]), ens.next_token_distribution([ref]))
    assert ens.truncated == 1
    assert ens.generate([LONG], max_new_tokens=3)[0].num_tokens >= 1 and ens.truncated == 2


def test_evaluation_names_the_example_and_counts_truncations(tiny_gpt2_dir, tmp_path):
    from dln_ens.backends import BackendPool
    from dln_ens.evaluate import evaluate, forward_prompts
    from dln_ens.data.registry import load_task
    data = {"name": "ctx", "runs_dir": str(tmp_path), "backends": {
        "g": {"type": "hf", "path": str(tiny_gpt2_dir), "context_limit": 60}},
        "eval": {"tasks": ["test/long_inputs"], "backends": ["g"], "split": "test", "batch_size": 2}}
    cfg = parse_config(data)
    task = load_task("test/long_inputs")
    tok = BackendPool(cfg).get("g").tokenizer
    lengths = [len(tok(p)["input_ids"]) for p in forward_prompts(task, task.test)]
    long_ones = [i for i, n in enumerate(lengths) if n > 60]
    assert long_ones and len(long_ones) < len(lengths)
    with pytest.raises(ContextLengthError, match=rf"example {long_ones[0]} of task 'test/long_inputs' \(test split\): "
                                                 rf"a context needs {lengths[long_ones[0]]} positions in member 'g'"):
        evaluate(cfg, BackendPool(cfg), tmp_path / "ctx")
    data["backends"]["g"]["truncate"] = "left"
    cfg = parse_config(data)
    (row,) = evaluate(cfg, BackendPool(cfg), tmp_path / "ctx")
    assert row["truncated"] == len(long_ones) and row["n"] == len(lengths)
    assert "| accuracy | truncated | seconds |" in (tmp_path / "ctx" / "eval_results.md").read_text()
