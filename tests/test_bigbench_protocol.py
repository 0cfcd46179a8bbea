"""The DLN paper's BBH protocol (`data.bigbench`): train and dev from BIG-bench's task.json
without the BBH examples, test = BBH. Tiny files in BIG-bench's real format (``examples`` of
``input`` + ``target_scores``) are written here; the shared BBH files (when present) check that
BIG-bench records render exactly as BBH's inputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from dln_ens.data import load_task
from dln_ens.data.records import DataError, MissingDataError

SHARED_BBH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh"
NAV = "If you follow these instructions, do you return to the starting point? "
LOGICAL = ("The following paragraphs each describe a set of seven objects arranged in a fixed order. "
           "The statements are logically consistent within each paragraph. ")
SUBDIR = {"navigate": "navigate", "date_understanding": "date_understanding", "hyperbaton": "hyperbaton",
          "logical_deduction_seven_objects": "logical_deduction/seven_objects"}


def write(root: Path, task: str, bbh: list[dict], bigbench: list[dict]) -> None:
    (root / "bbh").mkdir(parents=True, exist_ok=True)
    (root / "bbh" / f"{task}.json").write_text(json.dumps({"examples": bbh}))
    folder = root / "bigbench" / SUBDIR[task]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"name": task, "examples": bigbench}))


def nav_record(steps: str, returns: bool) -> dict:
    return {"input": steps, "target_scores": {"True": int(returns), "False": int(not returns)}}


def nav_bbh(steps: str, returns: bool) -> dict:
    return {"input": f"{NAV}{steps}\nOptions:\n- Yes\n- No", "target": "Yes" if returns else "No"}


def test_navigate_splits_follow_the_reference(tmp_path):
    held = [(f"Take {k} steps left. Take {k} steps right.", True) for k in range(1, 4)]
    extra = [(f"Take {k} steps forward.", k % 2 == 0) for k in range(10, 17)]
    write(tmp_path, "navigate", [nav_bbh(*h) for h in held],
          [nav_record(*r) for r in extra[:3] + held + extra[3:]])
    task = load_task("bbh/navigate", root=str(tmp_path), protocol="bigbench")
    assert [(e.input, e.target) for e in task.test] == [(b["input"], b["target"]) for b in map(lambda h: nav_bbh(*h), held)]
    # the reference: RandomState(42) shuffles the BIG-bench-minus-BBH list; half train, rest dev
    pool = [nav_bbh(*r) for r in extra]
    np.random.RandomState(42).shuffle(pool)
    assert [(e.input, e.target) for e in task.train] == [(p["input"], p["target"]) for p in pool[:3]]
    assert [(e.input, e.target) for e in task.dev] == [(p["input"], p["target"]) for p in pool[3:]]
    assert task.classes == ["Yes", "No"] and task.meta["protocol"] == "bigbench"
    same = load_task("bbh/navigate", root=str(tmp_path), bigbench=str(tmp_path / "bigbench"))
    assert [e.input for e in same.train] == [e.input for e in task.train]   # a path alone opts in


def date_record(question: str, options: list[str], answer: int) -> dict:
    return {"input": question, "target_scores": {o: int(i == answer) for i, o in enumerate(options)}}


def date_bbh(question: str, options: list[str], answer: int) -> dict:
    lines = [f"({chr(65 + i)}) {o}" for i, o in enumerate(options)]
    return {"input": question + "\nOptions:\n" + "\n".join(lines), "target": f"({chr(65 + answer)})"}


def option_text(ex, letter: str) -> str:
    return re.search(rf"^\({letter[1]}\) (.*)$", ex.input, re.M).group(1)


def test_multiple_choice_options_are_shuffled_keeping_the_answer(tmp_path):
    opts = ["01/02/2000", "03/04/2001", "05/06/2002", "07/08/2003"]
    held = [(f"Today is day {k}. What is the date?", opts, k % 4) for k in range(2)]
    extra = [(f"Yesterday was day {k}. What is the date?", opts, k % 4) for k in range(9)]
    write(tmp_path, "date_understanding", [date_bbh(*h) for h in held], [date_record(*r) for r in held + extra])
    task = load_task("bbh/date_understanding", root=str(tmp_path), protocol="bigbench")
    assert len(task.train) == 4 and task.dev[:4] == task.train and len(task.dev) == 4 + 5   # dev holds train
    answers = {q: o[a] for q, o, a in extra}
    for ex in task.train + task.dev[4:]:
        question, _, block = ex.input.partition("\nOptions:\n")
        assert sorted(re.findall(r"^\([A-D]\) (.*)$", block, re.M)) == sorted(opts)
        assert option_text(ex, ex.target) == answers[question]
    assert {e.input.split("\n")[0] for e in task.train + task.dev} <= set(answers)
    assert task.classes == ["(A)", "(B)", "(C)", "(D)"]


def test_hyperbaton_renders_bigbench_quotes_as_bbh_options(tmp_path):
    q = "Which sentence has the correct adjective order:"
    recs = [{"input": f'{q} a " old {k} red car " b " red old {k} car "', "target_scores": {"a": 1, "b": 0}}
            for k in range(4)]
    bbh = [{"input": f"{q}\nOptions:\n(A) old 0 red car\n(B) red old 0 car", "target": "(A)"}]
    write(tmp_path, "hyperbaton", bbh, recs)
    task = load_task("bbh/hyperbaton", root=str(tmp_path), protocol="bigbench")
    rendered = {(e.input, e.target) for e in task.train + task.dev}
    for k in (1, 2, 3):
        a, b = f"old {k} red car", f"red old {k} car"
        assert {(f"{q}\nOptions:\n(A) {a}\n(B) {b}", "(A)"), (f"{q}\nOptions:\n(A) {b}\n(B) {a}", "(B)")} & rendered


def test_missing_bigbench_file_names_it_and_where_to_get_it(tmp_path):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "navigate.json").write_text(json.dumps({"examples": [nav_bbh("Take 1 step left.", False)]}))
    with pytest.raises(MissingDataError) as e:
        load_task("bbh/navigate", root=str(tmp_path), protocol="bigbench")
    msg = str(e.value)
    assert str(tmp_path / "bigbench" / "navigate" / "task.json") in msg
    assert "google/BIG-bench" in msg and '"bigbench"' in msg and "task_kwargs" in msg


def test_bad_bigbench_data_is_refused(tmp_path):
    held = [("Take 1 step left.", False)]
    write(tmp_path, "navigate", [nav_bbh(*h) for h in held], [nav_record("Take 2 steps left.", False)] * 3)
    with pytest.raises(DataError, match="1 of the 1 examples .* are not in it"):   # a BBH example missing
        load_task("bbh/navigate", root=str(tmp_path), protocol="bigbench")
    write(tmp_path, "navigate", [nav_bbh(*h) for h in held],
          [nav_record(*held[0]), {"input": "x", "target_scores": {"True": 1, "False": 1}}])
    with pytest.raises(DataError, match="record 1: 'target_scores' must score exactly one option 1"):
        load_task("bbh/navigate", root=str(tmp_path), protocol="bigbench")
    write(tmp_path, "navigate", [nav_bbh(*h) for h in held], [nav_record(*held[0]), {"input": "x"}])
    with pytest.raises(DataError, match="missing key 'target_scores'"):
        load_task("bbh/navigate", root=str(tmp_path), protocol="bigbench")
    with pytest.raises(DataError, match='"bigbench" is set but "protocol" is "bbh"'):
        load_task("bbh/navigate", root=str(tmp_path), protocol="bbh", bigbench=str(tmp_path))
    (tmp_path / "bbh" / "web_of_lies.json").write_text(json.dumps({"examples": [{"input": "x", "target": "Yes"}]}))
    with pytest.raises(DataError, match="covers date_understanding, hyperbaton"):
        load_task("bbh/web_of_lies", root=str(tmp_path), protocol="bigbench")


def to_bigbench(task: str, ex: dict) -> dict:
    """A BBH example written back as its BIG-bench record (the inverse of BBH's rendering)."""
    question, _, block = ex["input"].partition("\nOptions:\n")
    if task == "navigate":
        return nav_record(question[len(NAV):], ex["target"] == "Yes")
    texts = re.findall(r"^\(([A-Z])\) (.*)$", block, re.M)
    if task == "logical_deduction_seven_objects":
        return {"input": question[len(LOGICAL):],
                "target_scores": {t + ".": int(f"({L})" == ex["target"]) for L, t in texts}}
    return {"input": question, "target_scores": {t: int(f"({L})" == ex["target"]) for L, t in texts}}


@pytest.mark.skipif(not SHARED_BBH.is_dir(), reason="shared BBH data absent")
@pytest.mark.parametrize("task", ["navigate", "date_understanding", "logical_deduction_seven_objects"])
def test_bigbench_records_render_as_the_real_bbh_inputs(tmp_path, task):
    """Every real BBH example, written as a BIG-bench record, renders back to its BBH input (else
    the loader would not find it and refuse the file); new records come out in the same format."""
    bbh = json.loads((SHARED_BBH / f"{task}.json").read_text())["examples"]
    extra = []
    for ex in bbh[:6]:   # the same shape, another question
        rec = to_bigbench(task, ex)
        extra.append({**rec, "input": rec["input"].replace(".", ". Also, take no step.", 1) if task == "navigate"
                      else "Suppose so. " + rec["input"]})
    write(tmp_path, task, bbh, [to_bigbench(task, ex) for ex in bbh] + extra)
    got = load_task(f"bbh/{task}", root=str(tmp_path), protocol="bigbench")
    assert [(e.input, e.target) for e in got.test] == [(e["input"], e["target"]) for e in bbh]
    new = got.train + [e for e in got.dev if e not in got.train]
    assert len(new) == 6
    shape = re.compile(r"^.+\nOptions:\n- Yes\n- No$", re.S) if task == "navigate" else \
        re.compile(r"^.+\nOptions:\n(\([A-G]\) .+\n)+\([A-G]\) .+$", re.S)
    for e in new:
        assert shape.match(e.input) and e.target in got.classes
        assert e.input.startswith(NAV if task == "navigate" else LOGICAL if "logical" in task else "Suppose so. ")
