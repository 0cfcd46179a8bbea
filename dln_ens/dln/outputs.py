"""What a DLN run writes besides its iteration log: the reference's ``output.log`` result lines,
per-example traces, and token totals.

``output.log`` holds the lines the DLN reference (``projects/vi_dln/vi_main.py``) writes and its
``read_results.py`` parses: a first line ending in the run's settings as JSON, then
``INIT DEV ACC: x``, ``DEV ACC: x`` / ``BEST DEV ACC: x`` per validation, ``TRAINING TOKEN COST: n``
(the first ``COST:`` line, what the parser reads), ``TEST ACC: x``, ``TEST TOKEN COST: n``,
``TOTAL TOKEN COST: n``. Every line starts with ``<date time> - `` as the reference's logger does.
It is rebuilt from the iteration log and the run state, so a resumed run writes the same lines.
"""
from __future__ import annotations

import json
import time


def sum_tokens(per_backend: dict | None) -> int:
    """Total tokens over backends of a {backend: {"prompt", "completion", "total"}} record."""
    return sum(int(t.get("total", 0)) for t in (per_backend or {}).values())


def output_log_lines(settings: dict, rows: list[dict], best: dict, test: dict, test_tokens: dict | None) -> list[str]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    msgs = [json.dumps(settings, ensure_ascii=False)]
    for r in rows:
        if "dev_acc" not in r:
            continue
        if r["iteration"] == 0:
            msgs.append(f"INIT DEV ACC: {r['dev_acc']}")
        msgs.append(f"DEV ACC: {r['dev_acc']}")
        if r.get("improved"):
            msgs.append(f"BEST DEV ACC: {r['dev_acc']}")
        if r.get("reloaded"):
            msgs.append("Loading back the best prompts...")
    for key, prompt in best["prompts"].items():
        msgs.append(f"Best {'L1' if key == 'p1' else 'L2'} weights: {prompt}")
    train_cost = sum(sum_tokens(r.get("tokens")) for r in rows)
    test_cost = sum_tokens(test_tokens)
    msgs += [f"TRAINING TOKEN COST: {train_cost}", f"TEST ACC: {test['best']}", f"TEST TOKEN COST: {test_cost}",
             f"DEV ACC: {best['dev']}", f"TEST ACC: {test['best']}", f"TOTAL TOKEN COST: {train_cost + test_cost}"]
    return [f"{stamp} - {m}" for m in msgs]


def trace_rows(split: str, iteration: int, examples, preds, hidden, is_correct) -> list[dict]:
    """One JSON line per example of an evaluation ("dev" at an iteration, "test_init" /
    "test" at the end): input, target, output, hidden text (DLN-2), correctness. The prompts
    evaluated are those of that iteration in the iteration log."""
    rows = []
    for k, (e, p) in enumerate(zip(examples, preds)):
        row = {"split": split, "iteration": iteration, "index": k, "input": e.input, "target": e.target,
               "output": p, "correct": bool(is_correct(p, e.target))}
        if hidden is not None:
            row["hidden"] = hidden[k]
        rows.append(row)
    return rows
