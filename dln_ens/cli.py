"""`dln-ens zoo | mat | run | ablate | tune-mod | serve | tasks`: the command line.

Every command takes ``--conf`` (default ``conf/default.json``) and validates the whole config
before anything loads, so a typo fails in a second, not after the models are in memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_CONF = "conf/default.json"


def _conf(args, check_paths: bool = True):
    from dln_ens.config import load_config
    return load_config(args.conf, check_paths=check_paths)


def cmd_zoo(args) -> int:
    from dln_ens.zoo.build import build_zoo
    cfg = _conf(args, check_paths=False)
    if cfg.zoo is None:
        print(f"{args.conf}: no \"zoo\" section; nothing to build (add \"zoo\": {{\"dir\": \"models/zoo\"}})")
        return 1
    if args.size:
        cfg.zoo.size = args.size
    paths = build_zoo(cfg.zoo, force=args.force)
    for name, path in paths.items():
        print(f"zoo member {name}: {path}")
    return 0


def cmd_mat(args) -> int:
    """Under `accelerate launch` / `torchrun` each process builds its share of the members."""
    from dln_ens.distributed import init_processes, quiet_unless_main
    from dln_ens.distributed.devices import with_local_rank
    from dln_ens.relrep.cli import build_all
    cfg = _conf(args, check_paths=False)
    procs = init_processes()
    try:
        with quiet_unless_main(procs):
            build_all(cfg, force=args.force, procs=procs,
                      device=with_local_rank(args.device, procs.local_rank) if args.device else None)
    finally:
        procs.close()
    return 0


def cmd_run(args) -> int:
    """Under `accelerate launch` / `torchrun` every process runs this; each backend call's
    requests are split across them (`dln_ens.distributed`) and rank 0 alone writes."""
    from dln_ens.backends import BackendPool
    from dln_ens.distributed import ShardedPool, init_processes, process_run_dir, quiet_unless_main

    cfg = _conf(args)
    procs = init_processes()
    try:
        pool = ShardedPool(BackendPool(cfg), procs)
        with process_run_dir(Path(cfg.runs_dir) / cfg.name, procs) as run_dir, quiet_unless_main(procs):
            _run(args, cfg, pool, run_dir)
    finally:
        procs.close()
    return 0


def _run(args, cfg, pool, run_dir: Path) -> None:
    from dln_ens.config import config_to_dict
    from dln_ens.io import write_json
    from dln_ens.rundir import lock_run_dir

    t0 = time.perf_counter()
    parts = args.only or ["eval", "dln"]
    do_eval = "eval" in parts and cfg.eval is not None and bool(cfg.eval.backends)
    do_dln = "dln" in parts and cfg.dln is not None and bool(cfg.dln.systems)
    with lock_run_dir(run_dir):   # one run at a time; checks first, then config.json, then work
        tasks = plan = None
        if do_eval:
            from dln_ens.evaluate import load_eval_tasks
            tasks = load_eval_tasks(cfg)
        if do_dln:
            from dln_ens.dln.run import check_dln_run
            plan = check_dln_run(cfg, run_dir, resume=not args.fresh)
        from dln_ens.relrep.cli import check_matrices
        check_matrices(cfg, (cfg.eval.backends if do_eval else []) + [
            n for s in (cfg.dln.systems if do_dln else []) for n in (s.backend, s.hidden_backend, s.proposer, s.posterior) if n])
        write_json(run_dir / "config.json", config_to_dict(cfg))
        if do_eval:
            from dln_ens.evaluate import eval_table, evaluate, fusion_summary
            rows = evaluate(cfg, pool, run_dir, resume=not args.fresh, tasks=tasks)
            print(f"\n## Backends on held-out tasks ({cfg.eval.split})\n")
            print(eval_table(rows))
            print(fusion_summary(cfg, rows))
        if do_dln:
            from dln_ens.dln.run import run_dln
            run_dln(cfg, pool, run_dir, resume=not args.fresh, plan=plan, extra_results=pool.shares)
    print(f"run {cfg.name}: {time.perf_counter() - t0:.0f} s; results in {run_dir}/")


def cmd_ablate(args) -> int:
    from dln_ens.ablate import run_ablate
    from dln_ens.backends import BackendPool
    from dln_ens.io import markdown_table

    cfg = _conf(args)
    if cfg.ablate is None:
        print(f"{args.conf}: no \"ablate\" section; add \"ablate\": {{\"backends\": [\"<ensemble>\"], "
              f"\"variants\": [{{\"method\": \"deepen\"}}, {{\"method\": \"unite\"}}]}}")
        return 1
    out = Path(cfg.runs_dir) / cfg.name / "ablate"
    t0 = time.perf_counter()
    rows = run_ablate(cfg, BackendPool(cfg), out, resume=not args.fresh)
    from dln_ens.ablate import COLUMNS
    print(markdown_table(rows, COLUMNS))
    print(f"ablate {cfg.name}: {len(rows)} cells, {time.perf_counter() - t0:.0f} s; results in {out}/")
    return 0


def cmd_tune_mod(args) -> int:
    from dln_ens.mod.tune import tune_mod_from_config
    cfg = _conf(args, check_paths=False)
    tune_mod_from_config(cfg)
    return 0


def cmd_serve(args) -> int:
    from dln_ens.errors import UserError
    try:
        import uvicorn  # noqa: F401
        from dln_ens.serve.app import serve
    except ImportError as e:
        raise UserError(f"serving needs starlette and uvicorn ({e}); install them with pip install -e '.[serve]'") from None
    serve(_conf(args), args.backend, host=args.host, port=args.port, api_key_env=args.api_key_env)
    return 0


def cmd_tasks(args) -> int:
    from dln_ens.data import task_names
    print("\n".join(task_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dln-ens",
        description="Deep Language Networks over heterogeneous LLM ensembles (DeePEn fusion, "
                    "Mixture-of-Depths members). Typical use: `dln-ens mat` then `dln-ens run`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--conf", default=DEFAULT_CONF,
                        help=f"JSON config (// comments allowed); default {DEFAULT_CONF}")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("zoo", cmd_zoo, "build the tiny model zoo (the embedded default) on the CPU")
    sp.add_argument("--size", choices=["default", "tiny"], help="override zoo.size")
    sp.add_argument("--force", action="store_true", help="rebuild members that are up to date")

    sp = add("mat", cmd_mat, "build the zoo if missing, then the relative-representation matrices "
                             "of every ensemble in the config (up-to-date ones are skipped)")
    sp.add_argument("--force", action="store_true", help="rebuild all matrices")
    sp.add_argument("--device", help="compute the matrices on this device, e.g. cuda:{local_rank} (each "
                                     "process of `accelerate launch` builds its own members' matrices)")

    sp = add("run", cmd_run, "evaluate the configured backends and train/evaluate the configured "
                             "Deep Language Networks; writes runs/<name>/ and resumes by default")
    sp.add_argument("--fresh", action="store_true", help="ignore saved progress and start over")
    sp.add_argument("--only", action="append", choices=["eval", "dln"],
                    help="run only this part (repeatable)")

    sp = add("ablate", cmd_ablate, "evaluate the config's ablation grid (fusion variants x ensemble backends "
                                   "x tasks); writes runs/<name>/ablate/ (tables, plots) and resumes by default")
    sp.add_argument("--fresh", action="store_true", help="recompute every cell")

    add("tune-mod", cmd_tune_mod, "train the norms and router of a Mixture-of-Depths member "
                                  "(config section tune_mod) and save its head beside the base model")
    sp = add("serve", cmd_serve, "serve a configured backend (an HF model, a MoD member, a fused ensemble) "
                                 "behind an OpenAI-compatible /v1/completions API")
    sp.add_argument("--backend", required=True, help="name of the backend in the config")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key-env", metavar="VAR",
                    help="require \"Authorization: Bearer <key>\", the key read from environment variable VAR")

    add("tasks", cmd_tasks, "list the task names the loaders know")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dln_ens.allocator import keep_freed_memory_unless_disabled
    from dln_ens.errors import UserError
    try:
        keep_freed_memory_unless_disabled()
        return args.fn(args)
    except UserError as e:  # inputs to fix: the message says what and how; no traceback
        print(f"dln-ens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
