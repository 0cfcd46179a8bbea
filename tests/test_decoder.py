"""`DecodeState`, the one padded-KV-cache decoder of hf generation and of every ensemble member,
against transformers run on each row's real tokens alone, without a cache."""
from __future__ import annotations

import random

import pytest
import torch

from dln_ens.lm.decoder import DecodeState
from dln_ens.lm.hf import HFLanguageModel


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tiny_gpt2_dir, tiny_llama_dir):
    path = tiny_gpt2_dir if request.param == "gpt2" else tiny_llama_dir
    return HFLanguageModel.from_pretrained(path)


def last_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def check_rows(lm, state, seqs, atol=1e-4):
    got = torch.log_softmax(state.logits, -1)
    assert got.shape[0] == len(seqs)
    for row, ids in zip(got, seqs):
        torch.testing.assert_close(row, last_logprobs(lm.model, ids), atol=atol, rtol=0)
    assert state.lengths.tolist() == [len(s) for s in seqs]


def test_random_steps_rollbacks_and_selections_match_an_uncached_model(lm):
    """Every row ends where its own token list says, whatever the others did: plain steps,
    rollbacks of different depths with uneven new blocks, rows that feed nothing, dropped rows."""
    rng = random.Random(0)
    V = lm.vocab_size
    seqs = [lm.encode(t) for t in ("one two three four five", "alpha beta", "x y z w v u t s r q")]
    seqs.append(seqs[0][:3] + [5, 6])   # shares a prefix with row 0 (prefill runs it once)
    state = DecodeState(lm, seqs)
    check_rows(lm, state, seqs)
    for it in range(8):
        if it % 3 == 0:
            tok = [rng.randrange(V) for _ in seqs]
            state.step(torch.tensor(tok))
            seqs = [s + [t] for s, t in zip(seqs, tok)]
        else:
            keep = [max(1, len(s) - rng.choice([0, 0, 1, 3])) for s in seqs]
            new = [[rng.randrange(V) for _ in range(rng.choice([0, 1, 2, 4]) if k == len(s) else rng.choice([1, 3]))]
                   for s, k in zip(seqs, keep)]
            state.advance(keep, new)
            seqs = [s[:k] + x for s, k, x in zip(seqs, keep, new)]
        if it == 4:
            state.select([2, 0, 3])
            seqs = [seqs[2], seqs[0], seqs[3]]
        check_rows(lm, state, seqs)


def test_a_rolled_back_row_must_feed_a_token(lm):
    state = DecodeState(lm, [lm.encode("one two three")])
    with pytest.raises(ValueError, match="rolled-back row"):
        state.advance([1], [[]])


def test_continuation_logprobs_and_prompt_nll(lm):
    seqs = [lm.encode("one two three"), lm.encode("a b")]
    state = DecodeState(lm, seqs, prompt_nll=True)
    for ids, nll in zip(seqs, state.prompt_nll.tolist()):
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert nll == pytest.approx(-sum(lp[j, ids[j + 1]].item() for j in range(len(ids) - 1)), abs=1e-3)
    state.advance([len(seqs[0]) - 1, len(seqs[1])], [[7, 8], [9]])   # a hole in row 0
    seqs = [seqs[0][:-1] + [7, 8], seqs[1] + [9]]
    conts, rows = [[3], [4, 5, 6], [10, 11]], [0, 0, 1]
    got = state.continuation_logprobs(rows, conts).tolist()
    for g, r, c in zip(got, rows, conts):
        want = sum(last_logprobs(lm.model, seqs[r] + c[:k])[c[k]].item() for k in range(len(c)))
        assert g == pytest.approx(want, abs=1e-3)
    check_rows(lm, state, seqs)   # scoring continuations leaves the state as it was
