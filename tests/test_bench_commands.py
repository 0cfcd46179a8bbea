"""Every `python -m dln_ens.bench` command imports and answers --help (a benchmark that no
longer imports fails here, not when someone needs its figures)."""
from __future__ import annotations

import importlib

import pytest

from dln_ens.bench.__main__ import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bench_command_imports_and_parses_help(name, capsys):
    module = importlib.import_module(COMMANDS[name])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


class _LogLM:
    """A backend that logs what it is sent."""

    def __init__(self, name):
        self.name, self.log = name, []

    def generate(self, prompts, **kw):
        self.log.append(("generate", list(prompts), kw))
        return []

    def score(self, contexts, targets):
        self.log.append(("score", list(contexts), list(targets)))
        return []

    def next_token_logprobs(self, contexts, candidates, **kw):
        self.log.append(("next_token_logprobs", list(contexts), list(candidates), kw))
        return []


def test_bench_dln_replays_the_ensembles_requests_on_each_member():
    from dln_ens.bench.dln import RecordingLM, same_requests_rows
    ens, a, b = _LogLM("ens"), _LogLM("a"), _LogLM("b")
    calls = []
    rec = RecordingLM(ens, calls)
    rec.generate(["p1", "p2"], max_new_tokens=3, seed=7)
    rec.score(["c"], ["t"])
    rec.next_token_logprobs(["c1", "c2", "c3"], ["Yes", "No"], aggregate="sum")
    assert rec.name == "ens" and len(ens.log) == 3
    rows = same_requests_rows({"ens": ens, "a": a, "b": b}, "ens", ["a", "b"], calls, iters=1, repeats=2, layers=2)
    assert a.log == b.log == ens.log[:3] * 2 and ens.log[3:] == ens.log[:3] * 2   # the same calls, every round
    assert [r["method"] for r in rows] == ["generate", "next_token_logprobs", "score", "all"]
    assert [r["requests/iter"] for r in rows] == [2, 3, 1, 6]
    assert all(r["ensemble / sum of members"] > 0 for r in rows)


class _Member:
    def forward(self, x):
        return x

    def last_logits(self, x):
        return self.forward(x)   # a nested call of the same part


class _Fusion:
    def __init__(self, member):
        self.member = member

    def __call__(self, x):
        return self.member.forward(x)   # member work done by the fusion (the surface method)

    def target_logprobs(self, x, t):
        return x


class _Ens:
    def __init__(self, members):
        self.members = members
        self.fusion = _Fusion(next(iter(members.values())))


def test_timed_parts_counts_each_part_once_and_restores_everything(monkeypatch):
    from dln_ens.bench import decode
    ticks = iter(range(1000))
    monkeypatch.setattr(decode.time, "perf_counter", lambda: next(ticks))   # each timed call lasts 1 tick
    a, b = _Member(), _Member()
    own = lambda x: "own"   # noqa: E731  an instance attribute that must survive
    b.forward = own
    ens = _Ens({"a": a, "b": b})
    fusion = ens.fusion
    with decode.timed_parts(ens) as spent:
        a.last_logits(1)
        ens.fusion(2)
        ens.fusion.target_logprobs(3, 0)
        assert b.forward(4) == "own"
        with decode.timed_parts(_Ens({"a": a})):   # a member shared by a second ensemble
            a.forward(5)
        assert spent == {"a": 2, "fusion": 2, "b": 1}   # a: last_logits (its forward inside), then forward
    assert ens.fusion is fusion and "last_logits" not in vars(a) and "forward" not in vars(a)
    assert b.forward is own and "last_logits" not in vars(b)
    broken = _Ens({"a": a, "c": object()})   # no model calls to time: refused, nothing left patched
    with pytest.raises(AttributeError):
        with decode.timed_parts(broken):
            pass
    assert broken.fusion.__class__ is _Fusion and "forward" not in vars(a)
