"""`run_dln`: train every DLN system of a config, log each iteration, resume, summarise.

Run directory (``runs/<name>/`` by default), locked for the length of the run
(`dln_ens.rundir`)::

    config.json                 the resolved config (written once every check has passed)
    dln_<system>.jsonl          one line per iteration (iteration 0 = the initial prompts):
                                candidates with their ELBOs, chosen prompts, train loss,
                                dev accuracy when validated, backend calls and seconds
    dln_<system>.state.json     trainer state after the last completed iteration (resume)
    traces_<system>.jsonl       one line per example of every dev / test evaluation
    <system>/output.log         the DLN reference's result lines (INIT DEV ACC ... COST)
    baselines.json              zero- / k-shot accuracy per (task, backend, k) on the test split
    best_prompts.json           the best dev prompts per system
    results.json                initial vs learned prompts: dev and test accuracy per system,
                                tokens per backend, the settings each system trained with
    summary.md                  the same as a Markdown table with the baselines (also printed)

All randomness is derived from (seed, iteration, stage), so a run interrupted at any point and
resumed ends with the same prompts and accuracies as an uninterrupted one. A saved state
resumes only when the fingerprints it was made with (resolved settings, the task's examples,
each backend's files: weights, MoD head, matrices) are unchanged.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dln_ens.config import (Config, ConfigError, DLNConfig, DLNSystem, check_dln_config, check_names,
                            config_to_dict)
from dln_ens.data.registry import load_task
from dln_ens.data.task import Task
from dln_ens.dln.baselines import evaluate_baseline
from dln_ens.dln.calls import CountingLM, diff_snapshots
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.dln.network import DeepLanguageNetwork
from dln_ens.dln.outputs import output_log_lines, sum_tokens, trace_rows
from dln_ens.dln.presets import settings_for
from dln_ens.dln.samplers import PosteriorSampler, PromptProposer
from dln_ens.dln.templates import TemplateLibrary
from dln_ens.dln.trainer import VariationalTrainer
from dln_ens.fingerprint import backend_fingerprint, combine, task_fingerprint
from dln_ens.io import atomic_write_text, markdown_table, read_jsonl, write_json, write_jsonl
from dln_ens.rundir import lock_run_dir


# ----------------------------------------------------------------------------- files

def _read_log(path: Path) -> list[dict]:
    """The iteration log; a torn last line (a crash while appending) is dropped, since its
    iteration was not checkpointed and will run again."""
    if not path.exists():
        return []
    return read_jsonl(path, allow_torn_tail=True)


def _append_jsonl(path: Path, record: dict | list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in record if isinstance(record, list) else [record]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class SystemState:
    """A system's run state after its last completed iteration (``dln_<system>.state.json``)."""
    system: str
    fingerprint: str                 # `combine(fingerprint_parts)`: what a resumed run must share
    fingerprint_parts: dict
    iteration: int = 0
    dev_cache: dict[str, float] = field(default_factory=dict)   # dev accuracy per prompts (JSON)
    done: bool = False               # test evaluated
    init: dict | None = None         # {"prompts", "dev"} of the initial prompts
    trainer: dict | None = None      # `VariationalTrainer.state_dict()`
    test: dict | None = None         # {"init", "best"} test accuracy
    test_tokens: dict | None = None  # tokens per backend of the test evaluation


# ----------------------------------------------------------------------------- building

def build_system(system: DLNSystem, dcfg: DLNConfig, task: Task, get_backend, library: TemplateLibrary):
    """(network, trainer) for one system; each part runs on the backend the system names. The
    trainer's ``cfg`` holds the settings the system trains with (its preset applied)."""
    dcfg = settings_for(dcfg, system.layers, task.name)
    out_backend = get_backend(system.backend)
    out_tpl = library.get(dcfg.output_template if system.layers == 1 else dcfg.residual_template)
    output = OutputLayer(out_tpl, out_backend,
                         dcfg.output_prompt if dcfg.output_prompt is not None else task.instruction,
                         task.classes, dcfg.output_max_new_tokens, dcfg.length_normalize, dcfg.class_aggregation,
                         dcfg.space_variants)
    hidden = posterior = None
    if system.layers == 2:
        newline = ("\n",) if dcfg.hidden_stop_at_newline else ()
        hid_tpl = library.get(dcfg.hidden_template)
        hidden = HiddenLayer(hid_tpl, get_backend(system.hidden_backend or system.backend),
                             dcfg.hidden_prompt if dcfg.hidden_prompt is not None else task.instruction,
                             dcfg.hidden_max_new_tokens, dcfg.length_normalize,
                             stop=tuple(dict.fromkeys(hid_tpl.stop + newline)),
                             strip_options=dcfg.strip_options_for_hidden)
        post_tpls = [library.get(t) for t in dcfg.posterior_template.split("|")]
        posterior = PosteriorSampler(post_tpls, get_backend(system.posterior or system.backend),
                                     dcfg.hidden_max_new_tokens, dcfg.h_temperature,
                                     stop=tuple(dict.fromkeys(post_tpls[0].stop + newline)))
    proposer = PromptProposer(library.get(dcfg.proposal_template), get_backend(system.proposer or system.backend),
                              dcfg.proposal_max_new_tokens, dcfg.proposal_temperature,
                              dcfg.proposal_max_examples)
    network = DeepLanguageNetwork(output, hidden)
    return network, VariationalTrainer(network, proposer, posterior, task, dcfg)


# ----------------------------------------------------------------------------- the run

def _template_specs(dcfg: DLNConfig, system: DLNSystem) -> list[str]:
    """Every template a system renders ("a|b" mixes count each part)."""
    specs = [dcfg.output_template, dcfg.proposal_template] if system.layers == 1 else \
        [dcfg.residual_template, dcfg.hidden_template, dcfg.posterior_template, dcfg.proposal_template]
    return [part for spec in specs for part in spec.split("|")]


def _system_fingerprint(cfg: Config, system: DLNSystem, task: Task, settings: str) -> dict:
    used = sorted({n for n in (system.backend, system.hidden_backend, system.proposer, system.posterior) if n})
    return {"settings": settings, "task": task_fingerprint(task),
            **{f"backend {n}": combine(backend_fingerprint(cfg, n)) for n in used if n in cfg.backends}}


def _changed(old: dict | None, new: dict, task: str) -> str:
    if not old or old.get("settings") != new["settings"]:
        return "different backends or DLN settings"
    parts = [f"other data for task {task!r} (a data file changed)" if k == "task" else
             f"other files for {k} (model weights, MoD head or matrices changed)"
             for k in new if k != "settings" and old.get(k) != new[k]]
    return "; ".join(parts) or "different backends or DLN settings"


def _task_splits(dcfg: DLNConfig, tasks: dict, name: str, layers: int) -> tuple:
    """(task, dev, test) of a task as a system of ``layers`` layers uses it (the paper preset
    sizes dev and test per task and depth); ``tasks`` caches each loaded task."""
    if name not in tasks:
        tasks[name] = load_task(name, **dcfg.task_kwargs)
    task = tasks[name]
    settings = settings_for(dcfg, layers, task.name)
    dev = task.dev[:settings.num_dev] if settings.num_dev is not None else task.dev
    test = task.test[:settings.num_test] if settings.num_test is not None else task.test
    if not task.train or not dev or not test:
        raise ConfigError(f"task {task.name!r}: empty train ({len(task.train)}), dev ({len(dev)}) or "
                          f"test ({len(test)}) split; check its data files or num_dev / num_test")
    return task, dev, test


@dataclass
class RunPlan:
    """What a DLN run needs, found by `check_dln_run` before anything is written."""
    splits: dict[tuple[str, int], tuple]   # (task name, layers) -> (task, dev, test)
    library: TemplateLibrary
    fingerprints: dict[str, dict]          # system name -> fingerprint parts

    def split(self, dcfg: DLNConfig, system: DLNSystem) -> tuple:
        return self.splits[(system.task or dcfg.task, system.layers)]


def check_dln_run(cfg: Config, run_dir: Path, resume: bool = True) -> RunPlan:
    """Every check of a DLN run that loads no model, before anything is written: settings and
    names, every system's task (an unknown or empty task fails before any system trains), its
    templates, and that saved state in ``run_dir`` belongs to this experiment."""
    if cfg.dln is None:
        raise ConfigError(f"{cfg.source}: no \"dln\" section; add one (see conf/default.json)")
    dcfg = cfg.dln
    check_dln_config(dcfg)
    check_names(cfg)
    tasks: dict[str, Task] = {}   # each task loaded once
    splits: dict[tuple[str, int], tuple] = {}   # (task name, layers) -> (task, dev, test)
    for system in dcfg.systems:
        key = (system.task or dcfg.task, system.layers)
        if key not in splits:
            splits[key] = _task_splits(dcfg, tasks, *key)
    library = TemplateLibrary(dcfg.templates, dcfg.template_dir)
    settings = experiment_fingerprint(config_to_dict(cfg))
    fingerprints = {}
    for system in dcfg.systems:
        task = splits[(system.task or dcfg.task, system.layers)][0]
        for spec in _template_specs(settings_for(dcfg, system.layers, task.name), system):
            library.get(spec)
        fingerprints[system.name] = parts = _system_fingerprint(cfg, system, task, settings)
        state_path = Path(run_dir) / f"dln_{_safe(system.name)}.state.json"
        if resume and state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != combine(parts):
                raise ConfigError(f"{state_path}: this run directory holds a run of system {system.name!r} "
                                  f"made with {_changed(state.get('fingerprint_parts'), parts, task.name)}; "
                                  f"resuming would mix two experiments. Use another \"name\", or start over "
                                  f"with resume=False (dln-ens run --fresh)")
    return RunPlan(splits, library, fingerprints)


def run_dln(cfg: Config, pool, run_dir: Path | None = None, resume: bool = True,
            plan: RunPlan | None = None, extra_results=None) -> dict:
    """Train every system of ``cfg.dln`` on its task; ``pool.get(name)`` gives the backends.
    ``plan``: what `check_dln_run` returned (checked again when None). ``extra_results()`` (if
    given) adds its keys to results.json (the processes of a data-parallel run,
    `distributed.ShardedPool.shares`).
    Returns {"run_dir", "task", "systems": {name: {...}}, "summary"}."""
    check_names(cfg)   # before the run directory is created
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name
    with lock_run_dir(run_dir):
        if plan is None:
            plan = check_dln_run(cfg, run_dir, resume)
        write_json(run_dir / "config.json", config_to_dict(cfg))
        return _run_all(cfg, pool, run_dir, resume, plan, extra_results)


def _run_all(cfg: Config, pool, run_dir: Path, resume: bool, plan: RunPlan, extra_results=None) -> dict:
    dcfg = cfg.dln
    counters: dict[int, CountingLM] = {}

    def get_backend(name: str) -> CountingLM:
        lm = pool.get(name)
        return counters.setdefault(id(lm), CountingLM(lm))

    results = {system.name: _run_system(system, dcfg, plan, get_backend, counters, run_dir, resume)
               for system in dcfg.systems}
    baselines = _run_baselines(dcfg, results, plan, get_backend, run_dir, resume)
    summary = format_summary(results, baselines)
    write_json(run_dir / "best_prompts.json", {n: r["best_prompts"] for n, r in results.items()})
    extra = extra_results() if extra_results is not None else {}
    write_json(run_dir / "results.json", {"task": dcfg.task, **extra, "systems": results, "baselines": baselines})
    atomic_write_text(run_dir / "summary.md", summary)
    print(summary)
    return {"run_dir": str(run_dir), "task": dcfg.task, "systems": results, "baselines": baselines,
            "summary": summary}


def _run_baselines(dcfg, results, plan: RunPlan, get_backend, run_dir, resume) -> list[dict]:
    """Zero- / k-shot rows for every (task, layer backend) a system trains on, on the test split
    the systems use; finished rows are kept in baselines.json and not recomputed on resume."""
    path = run_dir / "baselines.json"
    done = {(b["task"], b["backend"], b["shots"]): b for b in
            (json.loads(path.read_text(encoding="utf-8")) if resume and path.exists() else [])}
    rows = []
    for system in dcfg.systems:
        r = results[system.name]
        for k in dcfg.baseline_shots:
            key = (r["task"], r["backend"], k)
            if key not in done:
                task, _, test = plan.split(dcfg, system)
                counter = get_backend(r["backend"])
                before = counter.token_snapshot()
                layer = OutputLayer(plan.library.get(dcfg.output_template), counter, task.instruction, task.classes,
                                    dcfg.output_max_new_tokens, dcfg.length_normalize, dcfg.class_aggregation,
                                    dcfg.space_variants)
                row = evaluate_baseline(layer, task, test, k, dcfg.seed)
                after = counter.token_snapshot()
                done[key] = {"task": r["task"], "backend": r["backend"], "shots": k, "num_test": len(test),
                             "test": row["accuracy"], "prompt": row["prompt"],
                             "tokens": None if after is None else after["total"] - before["total"]}
                write_json(path, list(done.values()))
            if done[key] not in rows:
                rows.append(done[key])
    return rows


def experiment_fingerprint(resolved: dict) -> str:
    """What a resumed run must share with the run it continues: backends and DLN settings."""
    return combine({k: resolved.get(k) for k in ("backends", "dln")})


def _run_system(system, dcfg, plan: RunPlan, get_backend, counters, run_dir, resume) -> dict:
    task, dev, test = plan.split(dcfg, system)
    network, trainer = build_system(system, dcfg, task, get_backend, plan.library)
    log_path = run_dir / f"dln_{_safe(system.name)}.jsonl"
    state_path = run_dir / f"dln_{_safe(system.name)}.state.json"
    trace_path = run_dir / f"traces_{_safe(system.name)}.jsonl"
    if not resume:
        for p in (log_path, state_path, trace_path):
            p.unlink(missing_ok=True)

    def calls() -> dict:
        return {c.name: c.snapshot() for c in counters.values()}

    def tokens() -> dict:
        return {c.name: c.token_snapshot() for c in counters.values() if c.tokens is not None}

    def used_tokens(before: dict) -> dict:
        used = {n: {k: a[k] - before.get(n, {}).get(k, 0) for k in a} for n, a in tokens().items()}
        return {n: d for n, d in used.items() if d["total"]}

    def dev_accuracy(state: SystemState, iteration: int) -> float:
        key = json.dumps(network.prompts, sort_keys=True)
        if key not in state.dev_cache:
            acc, preds, hidden = network.evaluate(dev, task.is_correct, desc=f"{system.name} dev")
            _append_jsonl(trace_path, trace_rows("dev", iteration, dev, preds, hidden, task.is_correct))
            state.dev_cache[key] = acc
        return state.dev_cache[key]

    if state_path.exists():   # check_dln_run has checked its fingerprint
        state = SystemState(**json.loads(state_path.read_text(encoding="utf-8")))
        trainer.load_state_dict(state.trainer)
        # drop log and trace lines of work that was logged but not checkpointed
        write_jsonl(log_path, [r for r in _read_log(log_path) if r["iteration"] <= state.iteration])
        write_jsonl(trace_path, [r for r in _read_log(trace_path)
                                 if (r["split"] == "dev" and r["iteration"] <= state.iteration) or state.done])
    else:
        for p in (log_path, trace_path):
            p.unlink(missing_ok=True)
        parts = plan.fingerprints[system.name]
        state = SystemState(system.name, combine(parts), parts)
        before = tokens()
        init_dev = dev_accuracy(state, 0)
        checked = trainer.validated(init_dev, 0)
        state.init, state.trainer = {"prompts": network.prompts, "dev": init_dev}, trainer.state_dict()
        _append_jsonl(log_path, {"system": system.name, "iteration": 0, "prompts": network.prompts,
                                 "dev_acc": init_dev, **checked, "tokens": used_tokens(before)})
        write_json(state_path, asdict(state))

    settings = trainer.cfg
    bar = tqdm(range(state.iteration + 1, settings.iters + 1), desc=f"DLN-{system.layers} {system.name}",
               initial=state.iteration, total=settings.iters)
    for it in bar:
        before, before_tokens, t0 = calls(), tokens(), time.perf_counter()
        idx = trainer.batch_indices(task.train, it)
        record = trainer.step([task.train[i] for i in idx], it)
        record = {"system": system.name, **record, "batch": idx}
        if it % settings.val_freq == 0 or it == settings.iters:
            acc = dev_accuracy(state, it)
            record["dev_acc"] = acc
            record.update(trainer.validated(acc, it))
            record["prompts_after_validation"] = network.prompts
        record["best_dev"] = trainer.best["dev"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        after = calls()
        used = {n: diff_snapshots(a, before[n]) if n in before else a for n, a in after.items()}
        record["lm_calls"] = {n: d for n, d in used.items() if any(v["calls"] for v in d.values())}
        record["tokens"] = used_tokens(before_tokens)
        _append_jsonl(log_path, record)
        state.iteration, state.trainer = it, trainer.state_dict()
        write_json(state_path, asdict(state))
        bar.set_postfix(loss=f"{record['train_loss']:.2f}", dev=f"{trainer.best['dev']:.2f}")
    bar.close()

    best = trainer.best
    if not state.done:
        before = tokens()
        init_net_prompts = network.prompts
        network.set_prompts(state.init["prompts"])
        init_test, preds, hidden = network.evaluate(test, task.is_correct, desc=f"{system.name} test (init)")
        _append_jsonl(trace_path, trace_rows("test_init", state.iteration, test, preds, hidden, task.is_correct))
        if best["prompts"] != state.init["prompts"]:
            network.set_prompts(best["prompts"])   # greedy: the same prompts give the same answers
            _, preds, hidden = network.evaluate(test, task.is_correct, desc=f"{system.name} test (learned)")
        best_test = float(sum(task.is_correct(p, e.target) for p, e in zip(preds, test)) / len(test))
        _append_jsonl(trace_path, trace_rows("test", state.iteration, test, preds, hidden, task.is_correct))
        network.set_prompts(init_net_prompts)
        state.done, state.test, state.test_tokens = True, {"init": init_test, "best": best_test}, used_tokens(before)
        write_json(state_path, asdict(state))

    rows = _read_log(log_path)
    settings_dict = {k: v for k, v in config_to_dict(settings).items() if k != "systems"}
    out_dir = run_dir / _safe(system.name)
    out_dir.mkdir(exist_ok=True)
    atomic_write_text(out_dir / "output.log", "\n".join(
        output_log_lines({"system": system.name, "layers": system.layers, "task": task.name, **settings_dict},
                         rows, best, state.test, state.test_tokens)) + "\n")
    train_tokens = _tokens_by_backend(rows)
    return {"task": task.name, "num_dev": len(dev), "num_test": len(test),
            "layers": system.layers, "backend": system.backend,
            "hidden_backend": system.hidden_backend or (system.backend if system.layers == 2 else None),
            "proposer": system.proposer or system.backend,
            "posterior": (system.posterior or system.backend) if system.layers == 2 else None,
            "iterations": state.iteration,
            "init_prompts": state.init["prompts"], "best_prompts": best["prompts"],
            "best_iteration": best["iteration"],
            "dev": {"init": state.init["dev"], "learned": best["dev"]},
            "test": {"init": state.test["init"], "learned": state.test["best"]},
            "tokens": {"train": train_tokens, "test": state.test_tokens or {}},
            "settings": settings_dict}


def _tokens_by_backend(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        for n, t in (r.get("tokens") or {}).items():
            acc = out.setdefault(n, {k: 0 for k in t})
            for k, v in t.items():
                acc[k] += v
    return out


def format_summary(results: dict, baselines: list[dict] | None = None) -> str:
    rows = [{"system": name, "task": r["task"], "layers": r["layers"], "backend": r["backend"],
             "dev init": f"{r['dev']['init']:.3f}", "dev learned": f"{r['dev']['learned']:.3f}",
             "test init": f"{r['test']['init']:.3f}", "test learned": f"{r['test']['learned']:.3f}",
             "n dev / test": f"{r['num_dev']} / {r['num_test']}", "best iter": r["best_iteration"],
             "tokens train / test": _tokens_cell(r.get("tokens"))}
            for name, r in results.items()]
    for b in baselines or []:
        rows.append({"system": f"{b['shots']}-shot", "task": b["task"], "layers": "-", "backend": b["backend"],
                     "dev init": "", "dev learned": "", "test init": f"{b['test']:.3f}", "test learned": "",
                     "n dev / test": f"- / {b['num_test']}", "best iter": "",
                     "tokens train / test": f"- / {b['tokens']}" if b["tokens"] is not None else "n/a"})
    lines = ["# DLN results", "",
             "Accuracy of the initial prompt vs the learned one (best dev) on the dev and test splits; "
             "k-shot rows: the task's instruction with k training examples, on the same test split. "
             "Tokens: all backends, prompt + completion.", "",
             markdown_table(rows).rstrip("\n"), "", "## Learned prompts", ""]
    for name, r in results.items():
        for key, prompt in r["best_prompts"].items():
            lines.append(f"- **{name}** {key}: {json.dumps(prompt, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _tokens_cell(tokens: dict | None) -> str:
    if not tokens or not (tokens.get("train") or tokens.get("test")):
        return "n/a"
    return f"{sum_tokens(tokens['train'])} / {sum_tokens(tokens['test'])}"
