"""Real-data loaders: the public files in ../shared/data (skipped when absent), malformed input
errors naming file and line, deterministic splits, answer normalisation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dln_ens.data.loaders import DataError, normalize_choice, normalize_number
from dln_ens.data.registry import load_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

REAL = {  # name -> (classes, a file it reads)
    "bbh/navigate": (["Yes", "No"], "bbh/navigate.json"),
    "bbh/date_understanding": (["(A)", "(B)", "(C)", "(D)", "(E)", "(F)"], "bbh/date_understanding.json"),
    "bbh/logical_deduction_seven_objects": ([f"({c})" for c in "ABCDEFG"], "bbh/logical_deduction_seven_objects.json"),
    "ordered_prompt/mpqa": (["negative", "positive"], "ordered_prompt/mpqa/train.jsonl"),
    "ordered_prompt/subj": (["subjective", "objective"], "ordered_prompt/subj/train.jsonl"),
    "leopard/disaster": (["no", "yes"], "leopard/disaster/disaster_eval.json"),
    "deepen/nq": (None, "deepen/NaturalQuestions/test/natural-questions.jsonl"),
    "deepen/triviaqa": (None, "deepen/TriviaQA/wikipedia-test-6000.jsonl"),
    "deepen/arc_c": (["(A)", "(B)", "(C)", "(D)"], "deepen/ARC-Challenge/test.jsonl"),
    "deepen/gsm8k": (None, "deepen/GSM/data/test.cleand.jsonl"),
    "deepen/piqa": (["(A)", "(B)"], "deepen/PIQA/physicaliqa-train-dev/dev_our.jsonl"),
    "deepen/mmlu/anatomy": (["(A)", "(B)", "(C)", "(D)"], "deepen/MMLU/test-jsonl/anatomy.jsonl"),
}


def count_records(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    data = json.loads(path.read_text(encoding="utf-8"))
    return len(data["examples"] if isinstance(data, dict) else data)


@needs_shared
@pytest.mark.filterwarnings("ignore:.*options are all empty")
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files_load(name):
    classes, _ = REAL[name]
    t = load_task(name, root=str(SHARED))
    assert t.name == name and t.instruction and t.classes == classes
    assert t.train and t.dev and t.test
    inputs = [[e.input for e in s] for s in (t.train, t.dev, t.test)]
    if not name.startswith(("ordered_prompt", "deepen/mmlu")):   # those ship their own dev file
        assert not set(inputs[0]) & set(inputs[2]) and not set(inputs[1]) & set(inputs[2])
    for e in t.train[:50] + t.test[:50]:
        assert e.input.strip() and t.is_correct(e.target, e.target)
        if classes:
            assert e.target in classes
    again = load_task(name, root=str(SHARED))
    assert [e.input for e in again.train] == inputs[0]
    if name.startswith(("bbh", "leopard", "deepen/piqa")):       # one pool shuffled by the seed
        other = load_task(name, root=str(SHARED), seed=1)
        assert [e.input for e in other.train] != inputs[0]


@needs_shared
def test_sizes_follow_the_documented_splits():
    nav = load_task("bbh/navigate", root=str(SHARED))
    assert (len(nav.train), len(nav.dev), len(nav.test)) == (100, 50, 100)
    n = count_records(SHARED / "deepen/ARC-Challenge/test.jsonl")
    with pytest.warns(UserWarning, match="options are all empty"):
        arc = load_task("deepen/arc_c", root=str(SHARED))
    assert len(arc.test) == n - sum('"A": ""' in line for line in
                                    (SHARED / "deepen/ARC-Challenge/test.jsonl").read_text().splitlines())
    tqa = load_task("deepen/triviaqa", root=str(SHARED))
    assert len(tqa.test) == 6000 - 1900 and len(tqa.dev) == 400 and len(tqa.train) == 1500


@needs_shared
def test_answers_and_normalisation_on_real_records():
    gsm = load_task("deepen/gsm8k", root=str(SHARED))
    first = json.loads((SHARED / "deepen/GSM/data/test.cleand.jsonl").read_text().splitlines()[0])
    assert first["answer"].endswith("the answer is 18") and gsm.test[0].target == "18"
    assert gsm.is_correct("She makes $18 every day.", "18") and not gsm.is_correct("18.5", "18")
    tqa = load_task("deepen/triviaqa", root=str(SHARED))
    e = tqa.test[0]
    assert e.target.aliases and all(tqa.is_correct(a, e.target) for a in e.target.aliases)
    assert not tqa.is_correct("certainly not this", e.target)
    date = load_task("bbh/date_understanding", root=str(SHARED))
    assert date.is_correct("(B) 12/25/1937", "(B)") and date.is_correct("B", "(B)")
    assert not date.is_correct("(C)", "(B)")


def test_normalizers():
    assert normalize_number("so 1,234.50 apples") == "1234.5" and normalize_number("-7") == "-7"
    assert normalize_number("3 then 4.0\n99") == "4"
    assert normalize_choice("The answer is (C).") == "(C)" and normalize_choice("D) blue") == "(D)"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = '{"sentence": "fine", "label": "0"}\n'
    folder = tmp_path / "ordered_prompt" / "mpqa"
    write(folder / "dev_subsample.jsonl", good)
    write(folder / "test.jsonl", good)
    f = write(folder / "train.jsonl", good + good + '{"sentence": "broken", "label": \n')
    with pytest.raises(DataError, match=rf"{f}:3: invalid JSON"):
        load_task("ordered_prompt/mpqa", root=str(tmp_path))
    write(f, good + '{"sentence": "no label"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: missing key 'label'"):
        load_task("ordered_prompt/mpqa", root=str(tmp_path))
    write(f, good + '{"sentence": "odd", "label": "7"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: label '7' is not one of"):
        load_task("ordered_prompt/mpqa", root=str(tmp_path))
    g = write(tmp_path / "deepen/GSM/data/train_sample300_seed42.cleand.jsonl",
              '{"question": "q", "answer": "so the answer is 4"}\n{"question": "q", "answer": "no number"}\n')
    write(tmp_path / "deepen/GSM/data/test.cleand.jsonl", '{"question": "q", "answer": "answer is 1"}\n')
    with pytest.raises(DataError, match=rf"{g}:2: no final 'answer is <number>'"):
        load_task("deepen/gsm8k", root=str(tmp_path))


def test_malformed_json_records_name_file_and_line(tmp_path):
    recs = [{"input": f"q{i}", "target": "Yes"} for i in range(3)] + [{"input": "q3"}]
    text = json.dumps({"canary": "x {not an object}", "examples": recs}, indent=2)
    f = write(tmp_path / "bbh" / "navigate.json", text)
    line = [i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == "{"][-1]   # record 3 opens here
    with pytest.raises(DataError, match=rf"{f}:{line}: record 3: missing key 'target'"):
        load_task("bbh/navigate", root=str(tmp_path))
    write(f, '{"examples": [\n{"input": "a", "target": "Yes"},\n{"input": "b" "target": "No"}\n]}')
    with pytest.raises(DataError, match=rf"{f}:3: invalid JSON"):
        load_task("bbh/navigate", root=str(tmp_path))
    write(f, json.dumps({"examples": [{"input": "a", "target": "Maybe"}]}))
    with pytest.raises(DataError, match=rf"{f}:1: target 'Maybe' is not one of"):
        load_task("bbh/navigate", root=str(tmp_path))
    d = write(tmp_path / "leopard/disaster/disaster_eval.json", '[\n {"sentence1": "s", "label": "Relevant"},\n'
              ' {"sentence1": "s", "label": "Unknown"}\n]')
    with pytest.raises(DataError, match=rf"{d}:3: label 'Unknown'"):
        load_task("leopard/disaster", root=str(tmp_path))


def test_missing_files_say_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="sh sh/data.sh"):
        load_task("deepen/piqa", root=str(tmp_path))


@needs_shared
def test_data_script_copies_from_a_local_folder(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    import subprocess
    out = subprocess.run(["sh", str(repo / "sh" / "data.sh"), "--from", str(SHARED), "--to", str(tmp_path / "ds")],
                         capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ds" / "bbh" / "navigate.json").read_bytes() == (SHARED / "bbh" / "navigate.json").read_bytes()
    assert len(load_task("deepen/mmlu/virology", root=str(tmp_path / "ds")).test) == \
        count_records(SHARED / "deepen/MMLU/test-jsonl/virology.jsonl")
    shutil.rmtree(tmp_path / "ds")
