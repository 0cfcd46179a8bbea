"""`lm.forced.logits_at` (teacher forcing with shared stems) against transformers run on each
prefix alone, without cache or padding."""
from __future__ import annotations

import random

import pytest
import torch

from dln_ens.lm.forced import logits_at
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
