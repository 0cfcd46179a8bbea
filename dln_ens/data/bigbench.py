"""The DLN paper's data protocol for BBH tasks (``"protocol": "bigbench"``): train and dev come
from the original BIG-bench task with the BBH examples taken out, test is the BBH file.

As the DLN reference does it (microsoft/deep-language-networks, `scripts/split_bigbench_*.py`
and `dln/dataset.py`, class `BBH`), for the four tasks it covers:

- each BIG-bench example (``input``, ``target_scores``) is rendered as BBH renders it (the task's
  BBH preamble, "Options:" lines listed in the order of ``target_scores``, the target the option
  scored 1), so the same templates and verbalizers apply;
- a BIG-bench example whose rendering is a BBH input (date_understanding: whose question is the
  first line of a BBH input) is left out, and every BBH example must be found this way (else
  the file is another version and the split could hold test examples: a `DataError`);
- the rest is shuffled with ``numpy.random.RandomState(42 + seed)`` (seed 0: the reference's
  42): train = the first min(n // 2, 1000), dev = the next min(n - n // 2, 1000); the options of
  each multiple-choice example drawn are shuffled with the same generator (navigate's Yes/No are
  not); date_understanding's dev also holds its train examples; hyperbaton's dev is cut to 300;
- test: every BBH example, in file order.

BIG-bench's files are read from ``bigbench`` (its ``bigbench/benchmark_tasks`` folder or a copy
with that layout: ``navigate/task.json``, ``logical_deduction/seven_objects/task.json``...).
Nothing is downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dln_ens.data.records import DataError, MissingDataError, read_json_records
from dln_ens.data.task import Example

UPSTREAM = "https://github.com/google/BIG-bench/tree/main/bigbench/benchmark_tasks"
LETTERS = [f"({chr(c)})" for c in range(ord("A"), ord("Z") + 1)]
_NAVIGATE = "If you follow these instructions, do you return to the starting point? "
_HYPERBATON = "Which sentence has the correct adjective order:"
_LOGICAL = ("The following paragraphs each describe a set of seven objects arranged in a fixed order. "
            "The statements are logically consistent within each paragraph. ")


def _lettered(options: list[str]) -> list[str]:
    return [f"{L} {o}" for L, o in zip(LETTERS, options)]


def _navigate(text: str, keys: list[str]) -> tuple[str, list[str], dict[str, str]]:
    names = {"True": "Yes", "False": "No"}
    if set(keys) - set(names):
        raise ValueError(f"target_scores keys must be 'True' and 'False', got {keys}")
    return _NAVIGATE + text, [f"- {names[k]}" for k in keys], {k: names[k] for k in keys}


def _date(text: str, keys: list[str]):
    return text, _lettered(keys), dict(zip(keys, LETTERS))


def _hyperbaton(text: str, keys: list[str]):
    quoted = text.split(_HYPERBATON)[-1].strip().split('"')
    if len(quoted) < 4:
        raise ValueError(f"expected two quoted sentences after {_HYPERBATON!r}")
    return _HYPERBATON, _lettered([quoted[1].strip(), quoted[3].strip()]), dict(zip(keys, LETTERS))


def _logical(text: str, keys: list[str]):
    return _LOGICAL + text, _lettered([k[:-1] if k.endswith(".") else k for k in keys]), dict(zip(keys, LETTERS))


# BBH task -> (task.json under the benchmark_tasks folder, renderer, key of a BBH input that
# identifies it among BIG-bench's renderings)
TASKS = {
    "navigate": ("navigate/task.json", _navigate, lambda x: x),
    "date_understanding": ("date_understanding/task.json", _date, lambda x: x.split("\n")[0]),
    "hyperbaton": ("hyperbaton/task.json", _hyperbaton, lambda x: x),
    "logical_deduction_seven_objects": ("logical_deduction/seven_objects/task.json", _logical, lambda x: x),
}


def task_json(task: str, bigbench: str | Path) -> Path:
    """The BIG-bench file of a BBH task, or a `MissingDataError` saying where to get it."""
    if task not in TASKS:
        raise DataError(f"bbh/{task}: the \"bigbench\" protocol covers {', '.join(sorted(TASKS))} (the DLN "
                        f"reference's BBH tasks); use \"protocol\": \"bbh\" for bbh/{task}")
    path = Path(bigbench) / TASKS[task][0]
    if not path.is_file():
        raise MissingDataError(
            f"{path}: BIG-bench file not found; \"protocol\": \"bigbench\" draws bbh/{task}'s train and dev "
            f"from it. Get {TASKS[task][0]} from {UPSTREAM} (a clone of google/BIG-bench, or "
            f"`sh sh/data.sh`, which fetches it into datasets/bigbench/) and set \"bigbench\" in task_kwargs to "
            f"the folder holding it (default <root>/bigbench); nothing is downloaded by the loader")
    return path


def read_bigbench(task: str, path: Path) -> list[tuple[str, Example]]:
    """(key, example) per BIG-bench record, rendered as BBH renders the task."""
    _, render, _ = TASKS[task]
    out = []
    for i, (line, rec) in enumerate(read_json_records(path, {"input": str, "target_scores": dict}, key="examples")):
        where = f"{path}:{line or ''} record {i}"
        scores = rec["target_scores"]
        keys = list(scores)
        best = [k for k in keys if scores[k] == 1]
        if len(best) != 1 or not all(isinstance(v, (int, float)) for v in scores.values()):
            raise DataError(f"{where}: 'target_scores' must score exactly one option 1 (the answer), got {scores}")
        try:
            question, options, targets = render(rec["input"], keys)
        except ValueError as e:
            raise DataError(f"{where}: cannot render as BBH's {task}: {e}") from None
        text = question + "\nOptions:\n" + "\n".join(options)
        key = rec["input"] if task == "date_understanding" else text
        out.append((key, Example(text, targets[best[0]])))
    return out


def _shuffle_options(ex: Example, rng: np.random.RandomState) -> Example:
    """The reference's `option_shuffle`: options permuted, relettered, target following its text."""
    question, _, block = ex.input.partition("\nOptions:\n")
    texts = [re.findall(r"\([A-Z]\)\s(.*)", o)[-1] for o in block.strip().split("\n")]
    order = list(rng.permutation(len(texts)))
    target = LETTERS[order.index(LETTERS.index(ex.target))]
    return Example(question + "\nOptions:\n" + "\n".join(_lettered([texts[i] for i in order])), target)


def bigbench_splits(task: str, bigbench: str | Path, bbh: list[Example], bbh_path: Path,
                    seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) of the protocol (module docstring); ``bbh``: the BBH file's examples."""
    path = task_json(task, bigbench)
    identify = TASKS[task][2]
    held = {identify(e.input) for e in bbh}
    rendered = read_bigbench(task, path)
    found = {k for k, _ in rendered if k in held}
    if found != held:
        raise DataError(f"{path}: {len(held) - len(found)} of the {len(held)} examples of {bbh_path} are not in it "
                        f"(rendered as BBH renders them), so its train and dev could hold test examples; use "
                        f"the task.json of google/BIG-bench's main branch ({UPSTREAM}) that BBH was drawn from")
    pool = [e for k, e in rendered if k not in held]
    n = len(pool)
    n_train, n_dev = min(n // 2, 1000), min(n - n // 2, 1000)
    if n_train < 1:
        raise DataError(f"{path}: {n} examples outside BBH; the protocol needs at least 2 (one train, one dev)")
    rng = np.random.RandomState(42 + seed)
    rng.shuffle(pool)
    train, dev = [], []
    for i, ex in enumerate(pool[:n_train + n_dev]):
        if task != "navigate":
            ex = _shuffle_options(ex, rng)
        (train if i < n_train else dev).append(ex)
    if task == "date_understanding":   # the reference: its dev set is too small otherwise
        dev = train + dev
    if task == "hyperbaton":
        dev = dev[:300]
    return train, dev, list(bbh)
