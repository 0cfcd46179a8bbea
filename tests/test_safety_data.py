"""Loaders: undecodable, empty and missing files are DataErrors naming the file; a BBH target
outside its input's options is refused; dev/test overlap is reported and can be dropped (issue 11)."""
from __future__ import annotations

import json
import warnings

import pytest

from dln_ens.data.loaders import DataError
from dln_ens.data.registry import EmptySplitError, load_task


def bbh(tmp_path, records, name="date_understanding"):
    path = tmp_path / "bbh" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"examples": records}, indent=1))
    return path


def mc(i, target="(A)"):
    return {"input": f"Question {i}?\nOptions:\n(A) one\n(B) two", "target": target}


def test_non_utf8_empty_and_missing_files_are_data_errors(tmp_path):
    path = bbh(tmp_path, [mc(i) for i in range(10)])
    path.write_bytes(path.read_bytes().replace(b"Question 3", b"Question \xe9"))
    with pytest.raises(DataError, match=rf"{path}:\d+: not UTF-8 text \(byte 0xe9 at offset \d+\); re-save the file as UTF-8"):
        load_task("bbh/date_understanding", root=str(tmp_path))
    path.write_text("  \n")
    with pytest.raises(DataError, match=rf"{path}: the file is empty; fetch the public data"):
        load_task("bbh/date_understanding", root=str(tmp_path))
    jl = tmp_path / "deepen" / "GSM" / "data" / "train_sample300_seed42.cleand.jsonl"
    with pytest.raises(DataError, match=rf"{jl}: data file not found; fetch the public data with `sh sh/data.sh`"):
        load_task("deepen/gsm8k", root=str(tmp_path))
    bbh(tmp_path, [])
    with pytest.raises(DataError, match=r"date_understanding.json: no records under 'examples'"):
        load_task("bbh/date_understanding", root=str(tmp_path))


def test_empty_split_is_named(tmp_path):
    bbh(tmp_path, [mc(i) for i in range(4)])     # 40/20/40%: 1 train, no dev example
    with pytest.raises(EmptySplitError, match=r"task 'bbh/date_understanding' \(.*date_understanding.json\): "
                                              r"the dev split is empty"):
        load_task("bbh/date_understanding", root=str(tmp_path))


def test_bbh_target_outside_the_inputs_options_is_refused(tmp_path):
    records = [mc(i) for i in range(10)]
    records[4] = mc(4, target="(C)")             # only (A) and (B) are offered
    path = bbh(tmp_path, records)
    with pytest.raises(DataError, match=rf"{path}:\d+: target '\(C\)' is not one of the options its input offers "
                                        r"\(\(A\), \(B\)\)"):
        load_task("bbh/date_understanding", root=str(tmp_path))
    records[4] = mc(4)
    bbh(tmp_path, records)
    assert load_task("bbh/date_understanding", root=str(tmp_path)).classes == ["(A)", "(B)"]


def test_dev_test_overlap_is_reported_and_can_be_dropped(tmp_path):
    records = [mc(i) for i in range(20)] + [mc(i) for i in range(5)]   # 5 inputs appear twice
    bbh(tmp_path, records)
    with pytest.warns(UserWarning, match=r"dev examples also appear in test") as rec:
        task = load_task("bbh/date_understanding", root=str(tmp_path))
    test_inputs = {e.input for e in task.test}
    overlap = [e for e in task.dev if e.input in test_inputs]   # independent count
    assert overlap and task.meta["dev_test_overlap"] == len(overlap)
    assert f"{len(overlap)} of {len(task.dev)} dev examples" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = load_task("bbh/date_understanding", root=str(tmp_path), drop_dev_test_overlap=True)
    assert [e for e in task.dev if e.input not in test_inputs] == dropped.dev
    assert dropped.test == task.test
