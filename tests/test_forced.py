"""`lm.forced.logits_at` (teacher forcing with shared stems) against transformers run on each
prefix alone, without cache or padding."""
from __future__ import annotations

import random

import pytest
import torch

from dln_ens.lm.forced import logit_rows, logits_at
from dln_ens.lm.hf import HFLanguageModel


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tiny_gpt2_dir, tiny_llama_dir):
    return HFLanguageModel.from_pretrained(tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir)


def alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def test_logits_at_equals_each_prefix_run_alone(lm):
    rng = random.Random(0)
    V = lm.vocab_size
    stems = [[rng.randrange(V) for _ in range(n)] for n in (9, 14, 3)]
    seqs, groups, wanted = [], [], []
    for g, stem in enumerate(stems):
        for _ in range(3):
            seq = stem + [rng.randrange(V) for _ in range(rng.randint(1, 7))]
            seqs.append(seq)
            groups.append(g)
            # several positions (duplicates too), from inside the stem to the end
            wanted.append(sorted(rng.sample(range(len(stem) - 2, len(seq)), 3)) + [len(seq) - 1])
        seqs.append(stem[:-1] + [rng.randrange(V) for _ in range(4)])   # only its last position
        groups.append(g)
        wanted.append([len(seqs[-1]) - 1])
    seqs.append([rng.randrange(V) for _ in range(5)])   # a group of one, read at its end only
    groups.append("alone")
    wanted.append([4])
    for n in (3, 6):                                     # a group without a common first token
        seqs.append([n] + [rng.randrange(V) for _ in range(n)])
        groups.append("no stem")
        wanted.append([0, n - 1, n])
    want = torch.stack([alone(lm.model, s[:j + 1]) for s, w in zip(seqs, wanted) for j in w])
    got = logits_at(lm, seqs, groups, wanted)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    order = list(range(len(want)))
    rng.shuffle(order)
    shuffled = logits_at(lm, seqs, groups, wanted, order=order)
    assert torch.allclose(shuffled[order], want, atol=1e-4)
    # read by blocks (the ensemble's fusion): each block is those rows, across every source
    rows = logit_rows(lm, seqs, groups, wanted, order=order)
    assert len(rows) == len(want) and len(rows.sources) > 2
    for size in (1, 3, 7, len(want) + 5):
        blocks = [rows.take(a, a + size) for a in range(0, len(rows), size)]
        assert all(len(x) == min(size, len(rows) - a) for x, a in zip(blocks, range(0, len(rows), size)))
        assert torch.allclose(torch.cat(blocks)[order], want, atol=1e-4)


def test_summed_logprobs_by_blocks(lm, monkeypatch):
    """A member's score sums log-softmax at its targets reading a few rows at a time: the same
    sums as the log-softmax of all rows at once."""
    from dln_ens.lm import forced
    rng = random.Random(4)
    V = lm.vocab_size
    ctx = [rng.randrange(V) for _ in range(6)]
    targets = [[rng.randrange(V) for _ in range(n)] for n in (5, 1, 7)]
    seqs = [ctx + t[:-1] for t in targets]
    wanted = [range(len(ctx) - 1, len(ctx) + len(t) - 1) for t in targets]
    logits = logits_at(lm, seqs, ["c"] * 3, wanted)
    flat = torch.tensor([k for t in targets for k in t])
    lp = torch.log_softmax(logits, -1).gather(1, flat[:, None])[:, 0].tolist()
    want, at = [], 0
    for t in targets:
        want.append(sum(lp[at:at + len(t)]))
        at += len(t)
    for rows in (1, 4, 100):
        monkeypatch.setattr(forced, "SCORE_ROWS", rows)
        got = forced.summed_logprobs(logit_rows(lm, seqs, ["c"] * 3, wanted), targets)
        assert got == pytest.approx(want, abs=1e-4)


def test_last_only_rows_branch_off_a_longer_row(lm):
    """Rows read at their end only that share more than the stem with a fully read row (the
    one-pass score's prefixes whose tokenisation differs from the whole text's in its last
    tokens) run on top of that row's cache: still each prefix's logits run alone."""
    rng = random.Random(1)
    V = lm.vocab_size
    stem = [rng.randrange(V) for _ in range(6)]
    longs = [stem + [rng.randrange(V) for _ in range(n)] for n in (9, 5)]
    seqs = [longs[0], longs[1]]
    wanted = [[5, 7, 9, 12], [6, 8, 10]]   # row 0's cache holds 13 tokens, row 1's all 11
    for base, cut, extra in ((0, 8, 1), (0, 12, 3), (0, 13, 2), (1, 11, 1), (1, 7, 4), (0, 14, 2), (1, 6, 1)):
        seqs.append(longs[base][:cut] + [rng.randrange(V) for _ in range(extra)])
        wanted.append([len(seqs[-1]) - 1])
    seqs.append(longs[0][:10])            # a prefix of a long row, read at its end
    wanted.append([9])
    groups = ["g"] * len(seqs)
    want = torch.stack([alone(lm.model, s[:j + 1]) for s, w in zip(seqs, wanted) for j in w])
    got = logits_at(lm, seqs, groups, wanted)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
