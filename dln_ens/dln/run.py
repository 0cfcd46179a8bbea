"""`run_dln`: train every DLN system of a config, log each iteration, resume, summarise.

Run directory (``runs/<name>/`` by default)::

    config.json                 the resolved config
    dln_<system>.jsonl          one line per iteration (iteration 0 = the initial prompts):
                                candidates with their ELBOs, chosen prompts, train loss,
                                dev accuracy when validated, backend calls and seconds
    dln_<system>.state.json     trainer state after the last completed iteration (resume)
    best_prompts.json           the best dev prompts per system
    results.json                initial vs learned prompts: dev and test accuracy per system
    summary.md                  the same as a Markdown table (also printed)

All randomness is derived from (seed, iteration, stage), so a run interrupted at any point and
resumed ends with the same prompts and accuracies as an uninterrupted one.
"""
from __future__ import annotations

import json
import hashlib
import os
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from dln_ens.config import Config, ConfigError, DLNConfig, DLNSystem, check_dln_config, config_to_dict
from dln_ens.data.registry import load_task
from dln_ens.data.task import Task
from dln_ens.dln.calls import CountingLM, diff_snapshots
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.dln.network import DeepLanguageNetwork
from dln_ens.dln.samplers import PosteriorSampler, PromptProposer
from dln_ens.dln.templates import TemplateLibrary
from dln_ens.dln.trainer import VariationalTrainer, batch_indices
from dln_ens.io import atomic_write_text, markdown_table, read_jsonl, write_json, write_jsonl


# ----------------------------------------------------------------------------- files

def _read_log(path: Path) -> list[dict]:
    """The iteration log; a torn last line (a crash while appending) is dropped, since its
    iteration was not checkpointed and will run again."""
    if not path.exists():
        return []
    return read_jsonl(path, allow_torn_tail=True)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ----------------------------------------------------------------------------- building

def build_system(system: DLNSystem, dcfg: DLNConfig, task: Task, get_backend, library: TemplateLibrary):
    """(network, trainer) for one system; each part runs on the backend the system names."""
    out_backend = get_backend(system.backend)
    out_tpl = library.get(dcfg.output_template if system.layers == 1 else dcfg.residual_template)
    output = OutputLayer(out_tpl, out_backend, task.instruction, task.classes,
                         dcfg.output_max_new_tokens, dcfg.length_normalize)
    hidden = posterior = None
    if system.layers == 2:
        hidden = HiddenLayer(library.get(dcfg.hidden_template), get_backend(system.hidden_backend or system.backend),
                             dcfg.hidden_prompt if dcfg.hidden_prompt is not None else task.instruction,
                             dcfg.hidden_max_new_tokens, dcfg.length_normalize)
        posterior = PosteriorSampler(library.get(dcfg.posterior_template),
                                     get_backend(system.posterior or system.backend),
                                     dcfg.hidden_max_new_tokens, dcfg.h_temperature)
    proposer = PromptProposer(library.get(dcfg.proposal_template), get_backend(system.proposer or system.backend),
                              dcfg.proposal_max_new_tokens, dcfg.proposal_temperature,
                              dcfg.proposal_max_examples)
    network = DeepLanguageNetwork(output, hidden)
    return network, VariationalTrainer(network, proposer, posterior, task, dcfg)


# ----------------------------------------------------------------------------- the run

def run_dln(cfg: Config, pool, run_dir: Path | None = None, resume: bool = True,
            extra_results=None) -> dict:
    """Train every system of ``cfg.dln`` on its task; ``pool.get(name)`` gives the backends.
    ``extra_results()`` (if given) adds its keys to results.json (the processes of a
    data-parallel run, `distributed.ShardedPool.shares`).
    Returns {"run_dir", "task", "systems": {name: {...}}, "summary"}."""
    if cfg.dln is None:
        raise ConfigError(f"{cfg.source}: no \"dln\" section; add one (see conf/default.json)")
    dcfg = cfg.dln
    check_dln_config(dcfg)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = config_to_dict(cfg)
    write_json(run_dir / "config.json", resolved)
    fingerprint = experiment_fingerprint(resolved)

    splits: dict[str, tuple] = {}   # task name -> (task, dev, test), each loaded once

    def task_splits(name: str) -> tuple:
        if name not in splits:
            task = load_task(name, **dcfg.task_kwargs)
            dev = task.dev[:dcfg.num_dev] if dcfg.num_dev is not None else task.dev
            test = task.test[:dcfg.num_test] if dcfg.num_test is not None else task.test
            if not dev or not test:
                raise ConfigError(f"task {task.name!r}: empty dev ({len(dev)}) or test ({len(test)}) split")
            splits[name] = (task, dev, test)
        return splits[name]

    library = TemplateLibrary(dcfg.templates, dcfg.template_dir)
    counters: dict[int, CountingLM] = {}

    def get_backend(name: str) -> CountingLM:
        lm = pool.get(name)
        return counters.setdefault(id(lm), CountingLM(lm))

    results = {}
    for system in dcfg.systems:
        task, dev, test = task_splits(system.task or dcfg.task)
        results[system.name] = {"task": task.name, "num_dev": len(dev), "num_test": len(test),
                                **_run_system(system, dcfg, task, dev, test, get_backend, counters,
                                              library, run_dir, resume, fingerprint)}
    summary = format_summary(results)
    write_json(run_dir / "best_prompts.json", {n: r["best_prompts"] for n, r in results.items()})
    extra = extra_results() if extra_results is not None else {}
    write_json(run_dir / "results.json", {"task": dcfg.task, **extra, "systems": results})
    atomic_write_text(run_dir / "summary.md", summary)
    print(summary)
    return {"run_dir": str(run_dir), "task": dcfg.task, "systems": results, "summary": summary}


def experiment_fingerprint(resolved: dict) -> str:
    """What a resumed run must share with the run it continues: backends and DLN settings."""
    blob = json.dumps({k: resolved.get(k) for k in ("backends", "dln")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_system(system, dcfg, task, dev, test, get_backend, counters, library, run_dir, resume,
                fingerprint) -> dict:
    network, trainer = build_system(system, dcfg, task, get_backend, library)
    log_path = run_dir / f"dln_{_safe(system.name)}.jsonl"
    state_path = run_dir / f"dln_{_safe(system.name)}.state.json"
    if not resume:
        for p in (log_path, state_path):
            p.unlink(missing_ok=True)

    def calls() -> dict:
        return {c.name: c.snapshot() for c in counters.values()}

    def dev_accuracy(state: dict) -> float:
        key = json.dumps(network.prompts, sort_keys=True)
        if key not in state["dev_cache"]:
            state["dev_cache"][key] = network.evaluate(dev, task.is_correct, desc=f"{system.name} dev")[0]
        return state["dev_cache"][key]

    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{state_path}: this run directory holds a run of system {system.name!r} "
                              f"with different backends or DLN settings; resuming would mix two "
                              f"experiments. Use another \"name\", or start over with resume=False "
                              f"(dln-ens run --fresh)")
        trainer.load_state_dict(state["trainer"])
        # drop log lines of an iteration that was logged but not checkpointed
        lines = [r for r in _read_log(log_path) if r["iteration"] <= state["iteration"]]
        write_jsonl(log_path, lines)
    else:
        log_path.unlink(missing_ok=True)
        state = {"system": system.name, "fingerprint": fingerprint, "iteration": 0, "dev_cache": {},
                 "done": False}
        init_dev = dev_accuracy(state)
        trainer.remember(network.prompts, init_dev)
        state.update(init={"prompts": network.prompts, "dev": init_dev},
                     best={"prompts": network.prompts, "dev": init_dev, "iteration": 0},
                     trainer=trainer.state_dict())
        _append_jsonl(log_path, {"system": system.name, "iteration": 0, "prompts": network.prompts,
                                 "dev_acc": init_dev})
        write_json(state_path, state)

    bar = tqdm(range(state["iteration"] + 1, dcfg.iters + 1), desc=f"DLN-{system.layers} {system.name}",
               initial=state["iteration"], total=dcfg.iters)
    for it in bar:
        before, t0 = calls(), time.perf_counter()
        idx = batch_indices(len(task.train), dcfg.batch_size, dcfg.seed, it)
        record = trainer.step([task.train[i] for i in idx], it)
        record = {"system": system.name, **record, "batch": idx}
        if it % dcfg.val_freq == 0 or it == dcfg.iters:
            acc = dev_accuracy(state)
            record["dev_acc"] = acc
            trainer.remember(network.prompts, acc)
            if acc > state["best"]["dev"]:
                state["best"] = {"prompts": network.prompts, "dev": acc, "iteration": it}
        record["best_dev"] = state["best"]["dev"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        after = calls()
        used = {n: diff_snapshots(a, before[n]) if n in before else a for n, a in after.items()}
        record["lm_calls"] = {n: d for n, d in used.items() if any(v["calls"] for v in d.values())}
        _append_jsonl(log_path, record)
        state.update(iteration=it, trainer=trainer.state_dict())
        write_json(state_path, state)
        bar.set_postfix(loss=f"{record['train_loss']:.2f}", dev=f"{state['best']['dev']:.2f}")
    bar.close()

    if not state["done"]:
        init_net_prompts = network.prompts
        network.set_prompts(state["init"]["prompts"])
        init_test = network.evaluate(test, task.is_correct, desc=f"{system.name} test (init)")[0]
        if state["best"]["prompts"] == state["init"]["prompts"]:
            best_test = init_test  # greedy evaluation: the same prompts give the same answers
        else:
            network.set_prompts(state["best"]["prompts"])
            best_test = network.evaluate(test, task.is_correct, desc=f"{system.name} test (learned)")[0]
        network.set_prompts(init_net_prompts)
        state.update(done=True, test={"init": init_test, "best": best_test})
        write_json(state_path, state)
    return {"layers": system.layers, "backend": system.backend,
            "hidden_backend": system.hidden_backend or (system.backend if system.layers == 2 else None),
            "proposer": system.proposer or system.backend,
            "posterior": (system.posterior or system.backend) if system.layers == 2 else None,
            "iterations": state["iteration"],
            "init_prompts": state["init"]["prompts"], "best_prompts": state["best"]["prompts"],
            "best_iteration": state["best"]["iteration"],
            "dev": {"init": state["init"]["dev"], "learned": state["best"]["dev"]},
            "test": {"init": state["test"]["init"], "learned": state["test"]["best"]}}


def format_summary(results: dict) -> str:
    rows = [{"system": name, "task": r["task"], "layers": r["layers"], "backend": r["backend"],
             "dev init": f"{r['dev']['init']:.3f}", "dev learned": f"{r['dev']['learned']:.3f}",
             "test init": f"{r['test']['init']:.3f}", "test learned": f"{r['test']['learned']:.3f}",
             "n dev / test": f"{r['num_dev']} / {r['num_test']}", "best iter": r["best_iteration"]}
            for name, r in results.items()]
    lines = ["# DLN results", "",
             "Accuracy of the initial prompt vs the learned one (best dev) on the dev and test splits.", "",
             markdown_table(rows).rstrip("\n"), "", "## Learned prompts", ""]
    for name, r in results.items():
        for key, prompt in r["best_prompts"].items():
            lines.append(f"- **{name}** {key}: {json.dumps(prompt, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
