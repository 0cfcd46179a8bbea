"""Class scoring over verbalizer forms (`scoring.class_logprobs`): the alternatives "a|A" and each
one's with / without leading-space forms, summed (the DLN reference's default) or maxed, against
probabilities written out by hand; and backends that cannot sum refused by name."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dln_ens.dln.calls import CountingLM
from dln_ens.scoring import BackendCapabilityError, class_logprobs

# A next-token distribution (the rest of the mass on other tokens) and the token each form
# starts with: " yes" and "yes" share "▁yes", as a SentencePiece tokenizer may have it.
PROBS = {"▁Yes": 0.30, "Yes": 0.10, "▁yes": 0.05, "▁No": 0.20, "No": 0.05}
FIRST = {" Yes": "▁Yes", "Yes": "Yes", " yes": "▁yes", "yes": "▁yes", " No": "▁No", "No": "No"}


class TableLM:
    """Every context has the distribution PROBS; a candidate's forms are read off FIRST."""
    name = "table"

    def __init__(self):
        self.calls = []

    def next_token_logprobs(self, contexts, candidates, *, aggregate="max"):
        self.calls.append((list(candidates), aggregate))
        row = []
        for cand in candidates:
            tokens = [FIRST[v] for a in cand.split("|") for v in (" " + a, a)]
            p = sum(PROBS[t] for t in set(tokens)) if aggregate == "sum" else max(PROBS[t] for t in tokens)
            row.append(math.log(p))
        return np.array([row for _ in contexts])


class TwoArgLM(TableLM):
    """A user backend written to the protocol's two-argument form."""

    def next_token_logprobs(self, contexts, candidates):
        return super().next_token_logprobs(contexts, candidates)


# class "Yes|yes": forms " Yes", "Yes", " yes", "yes" -> tokens ▁Yes .30, Yes .10, ▁yes .05 (twice)
HAND = {   # (class_aggregation, space_variants) -> (p(Yes|yes), p(No))
    ("sum", "sum"): (0.30 + 0.10 + 0.05, 0.20 + 0.05),       # every distinct token once
    ("sum", "max"): (max(0.30, 0.10) + 0.05, 0.20),          # alternatives summed, forms maxed
    ("max", "sum"): (max(0.30 + 0.10, 0.05), 0.20 + 0.05),   # forms summed, alternatives maxed
    ("max", "max"): (0.30, 0.20),
}


@pytest.mark.parametrize("aggregation,space_variants", list(HAND))
def test_class_logprobs_against_hand_probabilities(aggregation, space_variants):
    lm = TableLM()
    got = class_logprobs(lm, ["c1", "c2"], ["Yes|yes", "No"], aggregation=aggregation, space_variants=space_variants)
    want = np.log(HAND[(aggregation, space_variants)])
    np.testing.assert_allclose(got, [want, want], atol=1e-12)
    # "max" forms ask with the two-argument call every backend has; "sum" with the keyword
    assert {agg for _, agg in lm.calls} == {"max" if space_variants == "max" else "sum"}


def test_default_is_the_reference_sum():
    got = class_logprobs(TableLM(), ["c"], ["Yes|yes", "No"])
    np.testing.assert_allclose(got, [np.log(HAND[("sum", "sum")])], atol=1e-12)


def test_a_backend_without_the_keyword_is_refused_by_name_under_sum_and_served_under_max():
    lm = TwoArgLM()
    for wrapped in (lm, CountingLM(lm)):
        with pytest.raises(BackendCapabilityError) as e:
            class_logprobs(wrapped, ["c"], ["Yes", "No"])
        msg = str(e.value)
        assert "'table'" in msg and "TwoArgLM" in msg and "aggregate" in msg and '"space_variants": "max"' in msg
    got = class_logprobs(CountingLM(lm), ["c"], ["Yes|yes", "No"], space_variants="max")
    np.testing.assert_allclose(got, [np.log(HAND[("sum", "max")])], atol=1e-12)


def test_wrappers_pass_the_keyword_through():
    lm = TableLM()
    got = class_logprobs(CountingLM(lm), ["c"], ["Yes|yes", "No"])
    np.testing.assert_allclose(got, [np.log(HAND[("sum", "sum")])], atol=1e-12)
    assert lm.calls == [(["Yes|yes", "No"], "sum")]
