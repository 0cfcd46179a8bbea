"""`python -m dln_ens.bench dln`: cost of a DLN training iteration, and what batching saves.

For DLN-1 and DLN-2 on one backend (default: the first DLN system's backend of the config),
runs ``--iters`` training iterations twice from the same initial prompts: as the trainer sends
them (every stage one batched call; duplicate requests sent once; score requests sorted so
those sharing a context / prompt prefix are adjacent and reuse its KV cache), and with every
request sent alone (`OneAtATimeLM`: no batching, no shared prefix). Reports per iteration the
backend calls, requests and wall time of each (the fastest of ``--repeats`` alternating runs),
and the speed-up. The two modes do the same
work: greedy calls and scores are identical, and sampled calls reuse the same seeds.

When the backend is an ensemble, each of its members also runs the same iterations alone
(batched), in the same rounds, and the table adds "ensemble / sum of members": the ensemble's
seconds per iteration over the sum of its members' (each run follows its own trajectory:
prompts, generations and their lengths differ from backend to backend, and so do the number
of calls and requests; "updated iters" counts the iterations that ran the backward pass: the
trainer skips a batch its forward pass got all right, as DLN does, and such an iteration
costs one forward pass). A second table separates the ensemble's own cost from those
differences: the requests the ensemble received in one batched run are replayed, call by call
and in the same rounds, on the ensemble and on each member alone ("same requests"), per
method and in all. The prompts and contexts are then the same; how long each generation runs
is still each backend's own (its EOS against ``max_new_tokens``).

    python -m dln_ens.bench dln --conf conf/default.json [--backend ens] [--iters 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dln_ens.backends import BackendPool
from dln_ens.config import DLNSystem, load_config
from dln_ens.data.registry import load_task
from dln_ens.dln.calls import CountingLM, OneAtATimeLM
from dln_ens.dln.run import build_system
from dln_ens.dln.templates import TemplateLibrary
from dln_ens.dln.trainer import batch_indices
from dln_ens.io import atomic_write_text, markdown_table


class RecordingLM:
    """Passes the protocol's calls to ``inner`` and keeps each as (method, args, kwargs)."""

    def __init__(self, inner, calls: list):
        self.inner, self.name, self.calls = inner, inner.name, calls

    def __getattr__(self, name):   # everything else of the backend, unchanged
        return getattr(self.inner, name)

    def generate(self, prompts, **kwargs):
        self.calls.append(("generate", (list(prompts),), dict(kwargs)))
        return self.inner.generate(prompts, **kwargs)

    def score(self, contexts, targets):
        self.calls.append(("score", (list(contexts), list(targets)), {}))
        return self.inner.score(contexts, targets)

    def next_token_logprobs(self, contexts, candidates, **kwargs):
        self.calls.append(("next_token_logprobs", (list(contexts), list(candidates)), dict(kwargs)))
        return self.inner.next_token_logprobs(contexts, candidates, **kwargs)


def replay(lm, calls: list) -> dict[str, float]:
    """Seconds per method of sending the recorded ``calls`` to ``lm``, in their order."""
    out: dict[str, float] = {}
    for method, args, kwargs in calls:
        t0 = time.perf_counter()
        getattr(lm, method)(*args, **kwargs)
        out[method] = out.get(method, 0.0) + time.perf_counter() - t0
    return out


def same_requests_rows(lms: dict, name: str, members: list[str], calls: list, iters: int, repeats: int,
                       layers: int) -> list[dict]:
    """Rows of the "same requests" table: ``calls`` replayed on the ensemble and each member,
    in turn, ``repeats`` times; the fastest run of each backend per method, per iteration."""
    best: dict[tuple[str, str], float] = {}
    for _ in range(max(1, repeats)):
        for b in [name] + members:
            for method, sec in replay(lms[b], calls).items():
                best[b, method] = min(best.get((b, method), float("inf")), sec)
    methods = sorted({m for _, m in best})
    rows = []
    for method in methods + ["all"]:
        pick = methods if method == "all" else [method]
        ens = sum(best[name, m] for m in pick) / iters
        alone = {b: sum(best[b, m] for m in pick) / iters for b in members}
        rows.append({"DLN": layers, "method": method,
                     "requests/iter": sum(len(a[0]) for m, a, _ in calls if m in pick) / iters,
                     "ensemble s/iter": round(ens, 3), **{f"{b} s/iter": round(v, 3) for b, v in alone.items()},
                     "ensemble / sum of members": round(ens / sum(alone.values()), 2)})
    return rows


def measure(lm, layers: int, cfg, task, iters: int, one_at_a_time: bool, record: list | None = None) -> dict:
    if record is not None:
        lm = RecordingLM(lm, record)
    counter = CountingLM(lm)   # counts what reaches the backend
    backend = OneAtATimeLM(counter) if one_at_a_time else counter
    library = TemplateLibrary(cfg.templates, cfg.template_dir)
    system = DLNSystem(name=f"bench{layers}", layers=layers, backend="bench")
    _, trainer = build_system(system, cfg, task, lambda name: backend, library)
    t0 = time.perf_counter()
    prompts, updates = [], 0
    for it in range(1, iters + 1):
        idx = batch_indices(len(task.train), cfg.batch_size, cfg.seed, it)
        updates += bool(trainer.step([task.train[i] for i in idx], it)["updated"])
        prompts.append(trainer.net.prompts)
    seconds = time.perf_counter() - t0
    snap = counter.snapshot()
    return {"calls": sum(v["calls"] for v in snap.values()) / iters,
            "requests": sum(v["requests"] for v in snap.values()) / iters,
            "seconds": seconds / iters, "updates": updates, "by_method": snap, "prompts": prompts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench dln", description=__doc__.split("\n\n")[0])
    ap.add_argument("--conf", default="conf/default.json")
    ap.add_argument("--backend", default=None, help="backend name (default: the first DLN system's)")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's dln.batch_size")
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternate the two modes this many times and keep each one's fastest run "
                         "(wall time on a shared machine is noisy; calls and requests are exact)")
    ap.add_argument("--no-one-at-a-time", action="store_true",
                    help="skip the one-request-at-a-time mode (slow over an ensemble)")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) and JSON here (a folder)")
    args = ap.parse_args(argv)

    cfg = load_config(args.conf)
    if cfg.dln is None or not cfg.dln.systems:
        raise SystemExit(f"{args.conf}: needs a \"dln\" section with at least one system")
    dcfg = cfg.dln
    if args.batch_size:
        dcfg.batch_size = args.batch_size
    name = args.backend or dcfg.systems[0].backend
    if name not in cfg.backends:
        raise SystemExit(f"{args.conf}: no backend {name!r}; defined: {', '.join(cfg.backends)}")
    task = load_task(dcfg.task, **dcfg.task_kwargs)

    spec = cfg.backends[name]
    members = list(spec.members) if spec.type == "ensemble" else []
    pool = BackendPool(cfg)
    lms = {b: pool.get(b) for b in [name] + members}
    modes = [(name, False)] + ([] if args.no_one_at_a_time else [(name, True)]) + [(m, False) for m in members]

    rows, same, raw = [], [], {}
    for layers in [int(x) for x in args.layers.split(",")]:
        for b in lms:
            measure(lms[b], layers, dcfg, task, 1, one_at_a_time=False)   # warm-up (first-call costs)
        runs = {key: [] for key in modes}
        calls: list = []
        for rnd in range(max(1, args.repeats)):
            for b, single_mode in modes:
                record = calls if members and rnd == 0 and (b, single_mode) == (name, False) else None
                runs[b, single_mode].append(measure(lms[b], layers, dcfg, task, args.iters, one_at_a_time=single_mode,
                                                    record=record))
        if members:
            same += same_requests_rows(lms, name, members, calls, args.iters, args.repeats, layers)
        best = {key: min(r, key=lambda x: x["seconds"]) for key, r in runs.items()}
        batched = best[name, False]
        single = best.get((name, True))
        raw[f"dln{layers}"] = {f"{b}{' one_at_a_time' if m else ''}": r for (b, m), r in best.items()}
        for (b, single_mode), m in best.items():
            row = {"DLN": layers, "backend": b,
                   "mode": "one request at a time" if single_mode else "batched + prefix reuse",
                   "updated iters": f"{m['updates']}/{args.iters}",
                   "calls/iter": round(m["calls"], 1), "requests/iter": round(m["requests"], 1),
                   "s/iter": round(m["seconds"], 2)}
            if single is not None and b == name:
                row["speed-up"] = 1.0 if single_mode else round(single["seconds"] / batched["seconds"], 2)
            if members and b == name and not single_mode:
                row["ensemble / sum of members"] = round(
                    batched["seconds"] / sum(best[x, False]["seconds"] for x in members), 2)
            rows.append(row)
        if single is not None and batched["prompts"] != single["prompts"]:
            print(f"note: DLN-{layers} chose different prompts in the two modes (the backend's "
                  f"batched and single scores differ numerically)")
    table = markdown_table(rows)
    head = (f"DLN iteration cost on backend {name!r}, task {task.name}, batch {dcfg.batch_size}, "
            f"{dcfg.num_p_samples} prompt / {dcfg.num_h_samples} hidden samples, {args.iters} iterations, "
            f"fastest of {max(1, args.repeats)} runs per mode, taken in turn\n\n")
    if same:
        table += (f"\nSame requests: the ensemble's requests of one batched run replayed on the ensemble and on "
                  f"each member alone, fastest of {max(1, args.repeats)} rounds, per iteration\n\n"
                  + markdown_table(same))
        raw["same_requests"] = same
    print(head + table)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "bench_dln.md", head + table)
        atomic_write_text(out / "bench_dln.json", json.dumps(raw, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
