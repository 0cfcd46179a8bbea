"""`python -m dln_ens.bench mod`: what Mixture-of-Depths tuning buys on the zoo.

For each zoo member and task: the base model; the base with only its final norm tuned (a MoD
with k_last=1, same budget); and MoD heads with k = 2, 3, 4 (uniform router, learned router,
learned router with top-K routing, K = ceil(k/2)). Every tuned variant trains on the task's
train split with the same epochs / lr / early stopping on dev (`tune_mod`), then is measured
on the test split: held-out loss = mean per-token NLL of " {target}\\n" after the forward
prompt (the protocol's `score`), accuracy as the project's evaluation computes it
(`dln_ens.evaluate.predict`: class verbalizers by `next_token_logprobs`, else greedy
generation to the end of the line). Prints a Markdown table (and writes it with ``--out``).

``--ensemble``: also the DeePEn ensemble of all members (main = the first) against the same
ensemble with the main member replaced by its tuned MoD (k = ``--ensemble-k``, learned
router). The MoD member reuses its base's relative-representation matrix: the matrices are
built once for the plain members and handed to both ensembles.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from dln_ens.data import Task, load_task
from dln_ens.evaluate import forward_prompts, predict
from dln_ens.io import atomic_write_text, markdown_table
from dln_ens.lm.hf import HFLanguageModel
from dln_ens.mod.model import DepthEnsembleLanguageModel
from dln_ens.mod.tune import tune_mod


def variants(ks: list[int], num_layers: int) -> list[tuple[str, int, str, int | None]]:
    """(label, k_last, router, top_k) rows after the base row."""
    out = [("final norm tuned", 1, "uniform", None)]
    for k in ks:
        if k > num_layers:
            continue
        out += [(f"MoD k={k} uniform", k, "uniform", None), (f"MoD k={k} learned", k, "learned", None),
                (f"MoD k={k} learned top-{math.ceil(k / 2)}", k, "learned", math.ceil(k / 2))]
    return out


def measure(lm, task: Task, examples, max_new_tokens: int, batch_size: int) -> tuple[float, float]:
    """(test loss per target token, test accuracy)."""
    prompts = forward_prompts(task, examples)
    scores = lm.score(prompts, [f" {e.target}\n" for e in examples])
    loss = -sum(s.logprob for s in scores) / max(1, sum(s.num_tokens for s in scores))
    preds = predict(lm, task, prompts, max_new_tokens, batch_size)
    acc = sum(task.is_correct(p, e.target) for p, e in zip(preds, examples)) / max(1, len(examples))
    return loss, acc


def ensemble_rows(args, names: list[str], bases: dict, tuned: dict) -> list[dict]:
    import tempfile

    from dln_ens.ensemble.model import EnsembleLanguageModel
    from dln_ens.relrep.build import build_matrices
    from dln_ens.relrep.store import load_matrices

    if len(names) < 2:
        raise SystemExit("--ensemble needs at least two members")
    main_name = names[0]
    mat_dir = Path(args.matrices) if args.matrices else Path(tempfile.mkdtemp(prefix="bench-mod-matrices-"))
    build_matrices(bases, mat_dir, progress=False)
    mats, _ = load_matrices(mat_dir, bases)
    rows = []
    for task_name in args.tasks.split(","):
        task = load_task(task_name)
        test = task.test[:args.num_test]
        mod = tuned.get((main_name, task_name))
        if mod is None:
            raise SystemExit(f"--ensemble: no MoD k={args.ensemble_k} learned head was tuned for {main_name} "
                             f"(is k={args.ensemble_k} in --ks and <= its layers?)")
        for label, main_lm in (("ensemble, plain main", bases[main_name]),
                               (f"ensemble, main = MoD k={args.ensemble_k} learned", mod)):
            members = {n: (main_lm if n == main_name else bases[n]) for n in names}
            ens = EnsembleLanguageModel(members, main=main_name, matrices=mats, name=label)
            t0 = time.time()
            loss, acc = measure(ens, task, test, args.max_new_tokens, args.batch_size)
            rows.append({"member": "+".join(names), "task": task_name, "variant": label,
                         "trainable": 0 if main_lm is bases[main_name] else mod.num_trainable(),
                         "test loss": loss, "test acc": acc, "seconds": round(time.time() - t0, 1)})
            print(f"[bench mod] {label} {task_name}: loss {loss:.4f} acc {acc:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench mod", description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--ks", default="2,3,4")
    ap.add_argument("--ensemble", action="store_true", help="also: ensemble with plain vs MoD main member")
    ap.add_argument("--ensemble-k", type=int, default=2)
    ap.add_argument("--matrices", default=None, help="matrix directory for --ensemble (default: a temp dir)")
    ap.add_argument("--ensemble-only", action="store_true",
                    help="with --ensemble: tune only the main member's MoD and measure only the ensembles")
    args = ap.parse_args(argv)

    zoo, names = Path(args.zoo), zoo_members(args)
    ks = [int(k) for k in args.ks.split(",")]
    rows, bases, tuned = [], {}, {}
    for name in names:
        base = HFLanguageModel.from_pretrained(zoo / name, device=args.device, name=name, batch_size=args.batch_size)
        bases[name] = base
        num_layers = base.model.config.num_hidden_layers
        for task_name in args.tasks.split(","):
            task = load_task(task_name)
            test = task.test[:args.num_test]
            if args.ensemble_only:
                if name == names[0]:
                    tuned[name, task_name] = mod = DepthEnsembleLanguageModel(base, args.ensemble_k, "learned")
                    tune_mod(mod, task, epochs=args.epochs, lr=args.lr, lambda_kd=args.lambda_kd,
                             batch_size=args.batch_size, patience=args.patience, seed=args.seed, progress=False)
                continue
            loss, acc = measure(base, task, test, args.max_new_tokens, args.batch_size)
            rows.append({"member": name, "task": task_name, "variant": "base", "trainable": 0,
                         "test loss": loss, "test acc": acc})
            print(f"[bench mod] {name} {task_name} base: loss {loss:.4f} acc {acc:.3f}", flush=True)
            for label, k, router, top_k in variants(ks, num_layers):
                mod = DepthEnsembleLanguageModel(base, k, router, top_k)
                t0 = time.time()
                res = tune_mod(mod, task, epochs=args.epochs, lr=args.lr, lambda_kd=args.lambda_kd,
                               batch_size=args.batch_size, patience=args.patience, seed=args.seed, progress=False)
                loss, acc = measure(mod, task, test, args.max_new_tokens, args.batch_size)
                rows.append({"member": name, "task": task_name, "variant": label, "trainable": res.num_trainable,
                             "dev loss (untuned→best)": f"{res.initial_dev_loss:.3f}→{res.best_dev_loss:.3f}",
                             "best epoch": res.best_epoch, "test loss": loss, "test acc": acc,
                             "seconds": round(time.time() - t0, 1)})
                print(f"[bench mod] {name} {task_name} {label}: loss {loss:.4f} acc {acc:.3f} "
                      f"({res.num_trainable} params, {time.time() - t0:.1f}s)", flush=True)
                if (k, router, top_k) == (args.ensemble_k, "learned", None):
                    tuned[name, task_name] = mod
    if args.ensemble or args.ensemble_only:
        rows += ensemble_rows(args, names, bases, tuned)
    report(args, rows, "seconds", f"MoD on {zoo} (")
    return 0


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The zoo, tasks, tuning budget and measurement options every MoD bench shares."""
    ap.add_argument("--zoo", default="models/zoo", help="directory of zoo members (dln-ens zoo)")
    ap.add_argument("--members", default=None, help="comma-separated member names (default: all in --zoo)")
    ap.add_argument("--tasks", default="facts_qa,navigate")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lambda-kd", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--num-test", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")


def zoo_members(args) -> list[str]:
    zoo = Path(args.zoo)
    names = args.members.split(",") if args.members else sorted(
        p.name for p in zoo.iterdir() if (p / "config.json").is_file()) if zoo.is_dir() else []
    if not names:
        raise SystemExit(f"no zoo members in {zoo}; build them with `dln-ens zoo --conf conf/default.json`")
    return names


def report(args, rows: list[dict], seconds: str, title: str) -> None:
    """Print the table (and write it with --out) under a line naming the shared settings."""
    table = markdown_table(rows, ["member", "task", "variant", "trainable", "dev loss (untuned→best)",
                                  "best epoch", "test loss", "test acc", seconds])
    header = (f"{title}epochs {args.epochs}, lr {args.lr}, lambda_kd {args.lambda_kd}, "
              f"batch {args.batch_size}, patience {args.patience}, seed {args.seed}; test split"
              + (f", first {args.num_test}" if args.num_test else "") + ")\n\n")
    print("\n" + header + table)
    if args.out:
        atomic_write_text(args.out, header + table)


if __name__ == "__main__":
    raise SystemExit(main())
