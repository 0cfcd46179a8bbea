"""`python -m dln_ens.bench.score_gap --zoo DIR`: how far the ensemble's default one-pass
``score`` is from the exact one on the zoo.

``exact``: a forced decode, each member conditioned on exactly the text before each target
token (tokenised as in generation). ``fast`` (the default, `ensemble.onepass`): one batched
pass per member, reading a prefix's distribution off the pair's sequence where the member's
tokenisation of the prefix is a prefix of it, the other prefixes run on their own; the two
should differ only by float rounding. The prompts are the project's forward format,
``"{instruction}\n\nInput: {input}\nAnswer:"`` with the target ``" {target}"``, on the
synthetic tasks. Prints per-task mean |exact - fast| of the summed log-probabilities, the
largest gap, the mean gap per target token, and whether the two rank the task's classes (or
the gold target among distractors) the same way.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench.score_gap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("models/zoo"))
    ap.add_argument("--matrices", type=Path, default=None, help="built matrices (default: build in a temp dir)")
    ap.add_argument("--tasks", nargs="+", default=["facts_qa", "navigate"])
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--main", default=None, help="main member (default: the first)")
    args = ap.parse_args(argv)

    import torch

    from dln_ens.data import load_task
    from dln_ens.evaluate import forward_prompts
    from dln_ens.ensemble.model import EnsembleLanguageModel
    from dln_ens.lm.hf import HFLanguageModel
    from dln_ens.relrep.build import build_matrices

    torch.set_grad_enabled(False)
    dirs = sorted(p for p in args.zoo.iterdir() if (p / "config.json").is_file() and not p.name.startswith("."))
    if len(dirs) < 2:
        raise SystemExit(f"{args.zoo}: found {len(dirs)} member checkpoints; build the zoo first (`dln-ens zoo`)")
    members = {p.name: HFLanguageModel.from_pretrained(p) for p in dirs}
    main_name = args.main or dirs[0].name
    mat_dir = args.matrices
    if mat_dir is None:
        mat_dir = Path(tempfile.mkdtemp(prefix="dln_score_gap_"))
        build_matrices(members, mat_dir, progress=False)
    exact = EnsembleLanguageModel(members, main_name, mat_dir, score_mode="exact")
    fast = EnsembleLanguageModel(members, main_name, mat_dir, score_mode="fast")
    print(f"members {list(members)}, main {main_name}")
    for name in args.tasks:
        task = load_task(name)
        exs = task.test[:args.examples]
        contexts, targets, counts = [], [], []
        for ex, ctx in zip(exs, forward_prompts(task, exs)):
            cands = task.classes or [ex.target] + [e.target for e in task.test if e.target != ex.target][:3]
            contexts += [ctx] * len(cands)
            targets += [" " + c for c in cands]
            counts.append(len(cands))
        t0 = time.perf_counter()
        e = exact.score(contexts, targets)
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = fast.score(contexts, targets)
        tf = time.perf_counter() - t0
        gaps = [abs(a.logprob - b.logprob) for a, b in zip(e, f)]
        per_token = sum(gaps) / max(1, sum(s.num_tokens for s in e))
        same_rank, i = 0, 0
        for k in counts:
            ea = max(range(k), key=lambda j: e[i + j].logprob)
            fa = max(range(k), key=lambda j: f[i + j].logprob)
            same_rank += ea == fa
            i += k
        print(f"{name}: {len(gaps)} (context, target) pairs, mean |exact - fast| {sum(gaps) / len(gaps):.2e} nats, "
              f"max {max(gaps):.2e}, mean per token {per_token:.2e}, same argmax candidate {same_rank}/{len(exs)}; "
              f"time exact {te:.1f}s fast {tf:.1f}s")


if __name__ == "__main__":
    main()
