"""`python -m dln_ens.bench parallel`: how much of a DLN step data parallelism can speed up.

Reads finished run directories (``dln-ens run`` writes them); nothing is run again. A training
step's wall time (``seconds`` in ``dln_<system>.jsonl``) splits into the backend calls (the
``lm_calls`` seconds: what `distributed.ShardedLanguageModel` divides among processes) and the
rest (trainer logic, template rendering, ELBO and weight arithmetic, log and state writes),
which every process repeats. Read from a one-process run, the rest's share f is the
non-parallel fraction and bounds the speed-up on N processes by 1 / (f + (1 - f) / N)
(Amdahl). For a run with several processes the table adds, per process, the requests it
served and its seconds computing versus waiting for the others (load imbalance).

    python -m dln_ens.bench parallel runs/zoo [more run directories]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dln_ens.io import markdown_table, read_jsonl


def step_rows(run_dir: Path) -> list[dict]:
    results = run_dir / "results.json"   # the run's systems (older logs may share the directory)
    systems = json.loads(results.read_text(encoding="utf-8"))["systems"] if results.exists() else None
    rows = []
    for log in sorted(run_dir.glob("dln_*.jsonl")):
        steps = [r for r in read_jsonl(log, allow_torn_tail=True) if r.get("iteration", 0) > 0 and "seconds" in r]
        if not steps or (systems is not None and steps[0]["system"] not in systems):
            continue
        wall = sum(r["seconds"] for r in steps)
        backend = sum(m["seconds"] for r in steps for calls in r.get("lm_calls", {}).values()
                      for m in calls.values())
        f = max(0.0, wall - backend) / wall if wall else 0.0
        rows.append({"run": str(run_dir), "system": steps[0]["system"], "steps": len(steps),
                     "step s": round(wall / len(steps), 3), "backend s": round(backend / len(steps), 3),
                     "non-parallel": round(f, 4), "bound N=2": round(1 / (f + (1 - f) / 2), 2),
                     "bound N=8": round(1 / (f + (1 - f) / 8), 2)})
    return rows


def process_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "results.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text(encoding="utf-8"))
    return [{"run": str(run_dir), "processes": res.get("num_processes", 1), "rank": p["rank"],
             **p["requests"], "share": p["share"], "computing s": p["seconds_computing"],
             "waiting s": p["seconds_waiting"]} for p in res.get("processes", [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    args = ap.parse_args(argv)
    steps, procs = [], []
    for run in map(Path, args.runs):
        if not run.is_dir():
            raise SystemExit(f"{run}: not a run directory (dln-ens run writes runs/<name>/)")
        steps += step_rows(run)
        procs += process_rows(run)
    print("## DLN steps: backend calls (parallel) vs the rest (every process repeats it)\n")
    print(markdown_table(steps))
    if steps:
        wall = sum(r["step s"] * r["steps"] for r in steps)
        rest = sum((r["step s"] - r["backend s"]) * r["steps"] for r in steps)
        print(f"all systems: non-parallel fraction {rest / wall:.4f} of {wall:.1f} s of steps\n")
    if procs:
        print("## Requests per process (results.json)\n")
        print(markdown_table(procs))
    return 0
