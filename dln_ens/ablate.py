"""`dln-ens ablate`: a grid of fusion variants x ensemble backends x tasks, one resumable cell each.

The grid is the config's ``ablate`` section: every ``backends`` entry (an ensemble: its members,
main member and matrices, so DeePEn's matrix settings, temperature and num_anchors, are ablated
by declaring one ensemble backend per setting) x every expanded variant (a list value of a fusion
setting, ``weighting`` or ``weighting_temperature`` is an axis; a variant's ``backends`` restricts
it to some of them) x every task. Each member of
each ensemble is also evaluated once per task on the same examples.

``runs/<name>/ablate/``::

    cells/<key>.json     one per (backend, variant, task) and per (member, task): per-example
                         correctness and seconds, written atomically when done (a rerun skips
                         cells whose key, a hash of everything they depend on, is unchanged)
    ablate.md / .csv     per cell: accuracy, the main member's, the best member's, the oracle
                         (any member right), questions gained / lost against the main member, seconds
    accuracy.png         accuracy per cell and task, best member and oracle marked
    gains.png            questions gained and lost against the main member per cell and task
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from dln_ens.config import Config, config_to_dict
from dln_ens.data import load_task
from dln_ens.evaluate import forward_prompts, predict
from dln_ens.io import atomic_write_bytes, atomic_write_text, markdown_table

AXES = ("weighting", "weighting_temperature")
PLOTS_HINT = "plots skipped: matplotlib is not installed; install it with `pip install 'dln-ens[plots]'`"


def expand(variant) -> list[dict]:
    """A variant's cells: every combination of its list-valued settings."""
    fixed = {"method": variant.method}
    axes: dict[tuple[str, str | None], list] = {}
    for key in AXES:
        v = getattr(variant, key)
        axes[(key, None)] = v if isinstance(v, list) else [v]
    for key, v in variant.fusion.items():
        axes[("fusion", key)] = v if isinstance(v, list) else [v]
    out = []
    for combo in itertools.product(*axes.values()):
        cell = dict(fixed, fusion={})
        for (key, sub), v in zip(axes, combo):
            if sub is None:
                cell[key] = v
            else:
                cell["fusion"][sub] = v
        out.append(cell)
    return out


def label(variant: dict) -> str:
    parts = [f"{k}={v}" for k, v in variant["fusion"].items()]
    if variant.get("weighting"):
        parts.append(variant["weighting"])
        if variant["weighting"] in ("entropy", "perplexity"):
            parts.append(f"T={variant['weighting_temperature']}")
    return variant["method"] + (f" ({', '.join(parts)})" if parts else "")


def ensemble_options(backend, variant: dict):
    """The backend's `EnsembleOptions` with the variant's method and settings."""
    return dataclasses.replace(backend.options(), method=variant["method"], fusion=dict(variant["fusion"]),
                               weighting=variant["weighting"], weighting_temperature=variant["weighting_temperature"])


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Cells:
    """Per-example correctness of one (LM, task) on the section's examples, cached on disk."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool):
        self.cfg, self.ab, self.dir, self.resume = cfg, cfg.ablate, out_dir / "cells", resume
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tasks = {t: load_task(t) for t in self.ab.tasks}

    def instruction(self, task: str):
        return self.ab.instructions.get(task, (self.cfg.eval.instructions if self.cfg.eval else {}).get(task))

    def examples(self, task: str):
        return getattr(self.tasks[task], self.ab.split)[: self.ab.num_examples]

    def get(self, what: dict, task: str, make_lm) -> dict:
        ab = self.ab
        # class scoring: `predict`'s default (the reference's sum over verbalizer forms)
        key = _key(what, task, ab.split, ab.num_examples, ab.max_new_tokens, self.instruction(task), "classes:sum+sum")
        path = self.dir / f"{key}.json"
        if self.resume and path.is_file():
            return json.loads(path.read_text())
        lm = make_lm()
        t = self.tasks[task]
        examples = self.examples(task)
        prompts = forward_prompts(t, examples, self.instruction(task))
        t0 = time.perf_counter()
        preds = []
        for i in tqdm(range(0, len(prompts), ab.batch_size), desc=f"ablate {task}", leave=False):
            preds += predict(lm, t, prompts[i:i + ab.batch_size], ab.max_new_tokens, ab.batch_size)
        cell = {"what": what, "task": task, "seconds": round(time.perf_counter() - t0, 2),
                "correct": [t.is_correct(p, ex.target) for p, ex in zip(preds, examples)],
                "predictions": preds}
        atomic_write_text(path, json.dumps(cell, indent=1))
        return cell


def run_ablate(cfg: Config, pool, out_dir: Path, resume: bool = True) -> list[dict]:
    from dln_ens.ensemble.model import EnsembleLanguageModel

    ab = cfg.ablate
    out_dir = Path(out_dir)
    cells = _Cells(cfg, out_dir, resume)
    rows = []
    for bname in ab.backends:
        b = cfg.backends[bname]
        member_cfg = {m: config_to_dict(cfg.backends[m]) for m in b.members}
        for task in ab.tasks:
            members = {m: cells.get({"member": m, "config": member_cfg[m]}, task, lambda m=m: pool.get(m))
                       for m in b.members}
            right = {m: c["correct"] for m, c in members.items()}
            n = len(right[b.main])
            acc = {m: sum(r) / max(n, 1) for m, r in right.items()}
            best = max(b.members, key=lambda m: acc[m])
            oracle = sum(any(right[m][i] for m in b.members) for i in range(n)) / max(n, 1)
            for variant in (v for spec in ab.variants if not spec.backends or bname in spec.backends
                            for v in expand(spec)):
                opts = ensemble_options(b, variant)
                what = {"backend": bname, "config": config_to_dict(b), "variant": variant}

                def make(b=b, opts=opts):
                    return EnsembleLanguageModel({m: pool.get(m) for m in b.members}, main=b.main,
                                                 matrices=b.matrices, options=opts, name=bname)
                cell = cells.get(what, task, make)
                ens = cell["correct"]
                rows.append({"backend": bname, "variant": label(variant), "method": variant["method"],
                             "weighting": opts.weighting or ("fixed" if opts.weights else "uniform"),
                             "task": task, "n": n, "accuracy": round(sum(ens) / max(n, 1), 4),
                             "main": f"{b.main} {acc[b.main]:.3f}", "best_member": f"{best} {acc[best]:.3f}",
                             "vs_best": round(sum(ens) / max(n, 1) - acc[best], 4), "oracle": round(oracle, 4),
                             "gained": sum(e and not m for e, m in zip(ens, right[b.main])),
                             "lost": sum(m and not e for e, m in zip(ens, right[b.main])),
                             "seconds": cell["seconds"], "_best": acc[best], "_main": acc[b.main]})
    write_tables(rows, out_dir)
    try:
        write_plots(rows, out_dir)
    except ImportError:
        print(PLOTS_HINT)
    return rows


COLUMNS = ["backend", "variant", "weighting", "task", "n", "accuracy", "main", "best_member", "vs_best", "oracle",
           "gained", "lost", "seconds"]


def write_tables(rows: list[dict], out_dir: Path) -> None:
    atomic_write_text(out_dir / "ablate.md", markdown_table(rows, COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "ablate.csv", buf.getvalue())


def write_plots(rows: list[dict], out_dir: Path) -> None:
    """accuracy.png and gains.png, one panel per task (raises ImportError without matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    if not tasks:
        return
    per_task = max(sum(r["task"] == t for r in rows) for t in tasks)
    longest = max(len(n) for n in _names(rows))
    size = (max(6.0, 0.45 * per_task + 4), (3.0 + 0.07 * longest) * len(tasks))   # room for the tick labels
    for name, draw in (("accuracy", _accuracy_panel), ("gains", _gains_panel)):
        fig, axes = plt.subplots(len(tasks), 1, figsize=size, squeeze=False)
        for ax, task in zip(axes[:, 0], tasks):
            draw(ax, [r for r in rows if r["task"] == task], task)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out_dir / f"{name}.png", buf.getvalue())


def _names(rows):
    multi = len({r["backend"] for r in rows}) > 1
    return [(f"{r['backend']}: " if multi else "") + r["variant"] for r in rows]


def _accuracy_panel(ax, rows, task):
    x = range(len(rows))
    ax.bar(x, [r["accuracy"] for r in rows], color="tab:blue")
    first = rows[0]
    ax.axhline(first["_best"], color="tab:green", ls="--", label=f"best member {first['best_member']}")
    ax.axhline(first["_main"], color="tab:gray", ls="-", lw=0.8, label=f"main member {first['main']}")
    ax.axhline(first["oracle"], color="tab:red", ls=":", label=f"oracle (any member right) {first['oracle']:.3f}")
    ax.set_xticks(list(x), _names(rows), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task} (n={first['n']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _gains_panel(ax, rows, task):
    x = range(len(rows))
    ax.bar(x, [r["gained"] for r in rows], color="tab:green", label="gained vs main member")
    ax.bar(x, [-r["lost"] for r in rows], color="tab:red", label="lost vs main member")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), _names(rows), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("questions")
    ax.set_title(f"{task}: against the main member ({rows[0]['main']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
