"""`python -m dln_ens.bench mod-lora`: the MoD paper's two settings on the zoo, same budget.

Per zoo member and task: the base model; LoRA alone (k_last=1, final norm frozen: plain LoRA on
the final layer's output); MoD alone (norms + router of the last k layers, base frozen); MoD +
LoRA (adapters trained jointly with the head under the same loss). Every tuned row trains with
`tune_mod` on the train split (same epochs, learning rate, early stopping on dev, seed) and is
measured on the test split like `bench mod`: held-out loss = mean per-token NLL of " {target}\\n"
(`score`), accuracy as the project's evaluation computes it. Reports trainable parameters and
tuning seconds (feature extraction, training and the dev evaluations; not the test measurement).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dln_ens.bench.mod import add_common_args, measure, report, zoo_members
from dln_ens.config import LoraSettings
from dln_ens.data import load_task
from dln_ens.lm.hf import HFLanguageModel
from dln_ens.mod.model import DepthEnsembleLanguageModel
from dln_ens.mod.tune import tune_mod


def settings(args) -> list[tuple[str, int, str, bool, bool]]:
    """(label, k_last, router, with LoRA, train the head) after the base row."""
    k = args.k
    return [("LoRA alone", 1, "uniform", True, False), (f"MoD k={k} alone", k, "learned", False, True),
            (f"MoD k={k} + LoRA", k, "learned", True, True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench mod-lora", description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--k", type=int, default=2, help="k_last of the MoD rows")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--layers", choices=["all", "late"], default="all", help="LoRA on every layer or the last k")
    ap.add_argument("--lora-lr", type=float, default=None, help="the adapters' learning rate (default --lr)")
    args = ap.parse_args(argv)

    zoo, names = Path(args.zoo), zoo_members(args)
    lora = LoraSettings(r=args.r, alpha=args.alpha, dropout=args.dropout, layers=args.layers)
    rows = []
    for name in names:
        base = HFLanguageModel.from_pretrained(zoo / name, device=args.device, name=name, batch_size=args.batch_size)
        for task_name in args.tasks.split(","):
            task = load_task(task_name)
            test = task.test[:args.num_test]
            loss, acc = measure(base, task, test, args.max_new_tokens, args.batch_size)
            rows.append({"member": name, "task": task_name, "variant": "base", "trainable": 0,
                         "test loss": loss, "test acc": acc})
            for label, k, router, with_lora, train_head in settings(args):
                mod = DepthEnsembleLanguageModel(base, k, router, lora=lora if with_lora else None,
                                                 lora_seed=args.seed)
                res = tune_mod(mod, task, epochs=args.epochs, lr=args.lr, lambda_kd=args.lambda_kd,
                               batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                               progress=False, train_head=train_head, lora_lr=args.lora_lr)
                loss, acc = measure(mod, task, test, args.max_new_tokens, args.batch_size)
                rows.append({"member": name, "task": task_name, "variant": label, "trainable": res.num_trainable,
                             "dev loss (untuned→best)": f"{res.initial_dev_loss:.3f}→{res.best_dev_loss:.3f}",
                             "best epoch": res.best_epoch, "test loss": loss, "test acc": acc,
                             "tuning s": round(res.seconds, 1)})
                print(f"[bench mod-lora] {name} {task_name} {label}: loss {loss:.4f} acc {acc:.3f} "
                      f"({res.num_trainable} params, tuned in {res.seconds:.1f}s)", flush=True)
    report(args, rows, "tuning s", f"MoD and LoRA on {zoo} (LoRA r {args.r}, alpha {args.alpha}, dropout "
           f"{args.dropout}, layers {args.layers}, LoRA lr {args.lora_lr or args.lr}; ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
