"""Plain evaluation: each configured backend on each configured task, one results table.

This is the members-versus-ensemble comparison of the default run. A task with output classes
is scored by `next_token_logprobs` over its verbalizers (argmax); a task without classes by
greedy `generate` up to the end of the line, compared after the task's normalisation.
Each (backend, task) result is written atomically as soon as it is done, so an interrupted run
picks up where it stopped; a saved cell is reused only when its key (the resolved settings, the
backend's fingerprint: weights, MoD head, matrices, and the task's examples) is unchanged.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dln_ens.backends import BackendPool, describe_backend
from dln_ens.config import Config, check_names, config_to_dict
from dln_ens.data import Task, load_task
from dln_ens.fingerprint import backend_fingerprint, combine, task_fingerprint
from dln_ens.io import atomic_write_text, markdown_table, write_jsonl
from dln_ens.lm.context import ContextLengthError
from dln_ens.rundir import lock_run_dir
from dln_ens.scoring import class_logprobs


def forward_prompts(task: Task, examples, prompt: str | None = None) -> list[str]:
    from dln_ens.dln.templates import load_template
    template = load_template("classify_forward")
    instruction = task.instruction if prompt is None else prompt
    return [template.render(prompt=instruction, input=ex.input) for ex in examples]


def predict(lm, task: Task, prompts: list[str], max_new_tokens: int, batch_size: int,
            class_aggregation: str = "sum", space_variants: str = "sum") -> list[str]:
    """Class scoring combines verbalizer forms as `scoring.class_logprobs` says."""
    preds: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        if task.classes:
            lp = class_logprobs(lm, chunk, list(task.classes), aggregation=class_aggregation,
                                space_variants=space_variants)
            preds += [task.classes[j] for j in lp.argmax(axis=1)]
        else:
            gens = lm.generate(chunk, max_new_tokens=max_new_tokens, stop=["\n"], temperature=0.0)
            preds += [g.text for g in gens]
    return preds


def _cell_key(cfg: Config, backend: str, task_name: str, task: Task) -> str:
    """Changes whenever anything that could change the cell's result changes."""
    ev = cfg.eval
    return combine([config_to_dict(cfg.backends), backend, task_name, ev.split, ev.num_examples,
                    ev.max_new_tokens, ev.instructions.get(task_name), ev.class_aggregation, ev.space_variants,
                    backend_fingerprint(cfg, backend),
                    task_fingerprint(task)])[:16]


def load_eval_tasks(cfg: Config) -> dict[str, Task]:
    """The evaluation's tasks, loaded (and so checked) before anything runs."""
    return {name: load_task(name) for name in cfg.eval.tasks}


def evaluate(cfg: Config, pool: BackendPool, run_dir: Path, resume: bool = True,
             tasks: dict[str, Task] | None = None) -> list[dict]:
    """Each backend of ``cfg.eval`` on each task; ``tasks``: what `load_eval_tasks` returned."""
    check_names(cfg)
    with lock_run_dir(run_dir):
        return _evaluate(cfg, pool, Path(run_dir), resume, tasks if tasks is not None else load_eval_tasks(cfg))


def _evaluate(cfg: Config, pool: BackendPool, run_dir: Path, resume: bool, tasks: dict[str, Task]) -> list[dict]:
    ev = cfg.eval
    cells_dir = run_dir / "eval"
    cells_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in ev.backends:
        for task_name, task in tasks.items():
            stem = f"{backend}__{task_name.replace('/', '_')}"
            cell = cells_dir / f"{stem}.json"
            key = _cell_key(cfg, backend, task_name, task)
            if resume and cell.exists():
                saved = json.loads(cell.read_text())
                if saved.get("key") == key:
                    rows.append(saved["row"])
                    continue
            examples = getattr(task, ev.split)[: ev.num_examples]
            lm = pool.get(backend)
            t0 = time.perf_counter()
            prompts = forward_prompts(task, examples, ev.instructions.get(task_name))
            preds = []
            truncated_before = getattr(lm, "truncated", 0)
            with tqdm(total=len(prompts), desc=f"eval {backend} on {task_name}", leave=False) as bar:
                for i in range(0, len(prompts), ev.batch_size):
                    try:
                        preds += predict(lm, task, prompts[i:i + ev.batch_size], ev.max_new_tokens,
                                         ev.batch_size, ev.class_aggregation, ev.space_variants)
                    except ContextLengthError as e:   # name the example in the split, not in the batch
                        raise e.within(prompts[i:i + ev.batch_size], i, f"task {task_name!r} ({ev.split} split)") from None
                    bar.update(len(prompts[i:i + ev.batch_size]))
            seconds = time.perf_counter() - t0
            correct = [task.is_correct(p, ex.target) for p, ex in zip(preds, examples)]
            row = {**describe_backend(cfg, backend), "task": task_name,
                   "instruction": ev.instructions.get(task_name, task.instruction), "split": ev.split,
                   "n": len(examples), "accuracy": round(float(np.mean(correct)) if correct else 0.0, 4),
                   "truncated": getattr(lm, "truncated", 0) - truncated_before, "seconds": round(seconds, 2)}
            write_jsonl(cells_dir / f"{stem}.predictions.jsonl",
                        [{"input": ex.input, "target": str(ex.target), **_aliases(ex.target), "prediction": p, "correct": c}
                         for ex, p, c in zip(examples, preds, correct)])
            atomic_write_text(cell, json.dumps({"key": key, "row": row}, indent=1))
            rows.append(row)
    write_jsonl(run_dir / "eval_results.jsonl", rows)
    atomic_write_text(run_dir / "eval_results.md", eval_table(rows) + "\n" + fusion_summary(cfg, rows))
    return rows


def fusion_summary(cfg: Config, rows: list[dict]) -> str:
    """Per task: the best evaluated ensemble against the best of its evaluated members, and
    each DeePEn ensemble's figure beside it (Markdown lines; empty without an ensemble)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        acc = {r["backend"]: r["accuracy"] for r in rows if r["task"] == task}
        ens = [n for n in acc if cfg.backends[n].type == "ensemble"]
        members = [m for m in dict.fromkeys(m for n in ens for m in cfg.backends[n].members) if m in acc]
        if not ens or not members:
            continue
        best = max(members, key=lambda m: acc[m])
        top = max(ens, key=lambda n: acc[n])
        b = cfg.backends[top]
        how = b.method + (f", {b.weighting} weighting" if b.weighting else "")
        line = (f"- {task}: best fusion **{top}** ({how}) {acc[top]:.3f} vs the best member "
                f"{best} {acc[best]:.3f}: **{acc[top] - acc[best]:+.3f}**")
        deepen = [n for n in ens if cfg.backends[n].method == "deepen" and n != top]
        line += "".join(f"; DeePEn ({n}) {acc[n]:.3f} ({acc[n] - acc[best]:+.3f})" for n in deepen)
        lines.append(line)
    return "Fusion against the best member:\n" + "\n".join(lines) + "\n" if lines else ""


def eval_table(rows: list[dict]) -> str:
    """Backend, fusion method and every fusion setting some row has, task, accuracy."""
    from dln_ens.fusion.registry import setting_names
    cols = ["backend", "type", "method", "weighting", *setting_names(), "matrix", "task", "instruction", "n",
            "accuracy", "truncated", "seconds"]
    return markdown_table(rows, cols)


def _aliases(target) -> dict:
    """A QA target's other accepted answers (`loaders.Answer`), kept in the written records."""
    aliases = getattr(target, "aliases", None)
    return {"aliases": list(aliases)} if aliases and list(aliases) != [str(target)] else {}
