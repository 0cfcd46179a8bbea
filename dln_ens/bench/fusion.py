"""`python -m dln_ens.bench fusion`: what one DeePEn fusion call costs, support-restricted against
exact, by matrix size and rows.

Three members, dense relative-representation matrices of V x A entries (random rows; the
members' vocabularies V, V + 100, V + 200), random logits scaled by ``--logit-scale``. For each
size and number of rows it times the fusion with ``tail_mass`` 1e-4 forced to restrict every
member to a support (`fusion.relative`) and the exact computation (``tail_mass`` 0), fastest of
``--repeats`` rounds of ``--calls`` calls, the two taken in turn. `deepen.EXACT_ENTRIES` (dense
matrices at most that large are computed exactly even with ``tail_mass`` > 0) is chosen from
this table: the column "default" shows what the default settings run (members differ in size,
so a row near the threshold may be mixed).
"""
from __future__ import annotations

import argparse
from unittest.mock import patch

import torch

from dln_ens.bench.score import fastest


def main(argv=None):
    from dln_ens.fusion import deepen
    from dln_ens.fusion.registry import make_fusion
    from dln_ens.relrep.matrix import RelRepMatrix

    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench fusion", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    ap.add_argument("--anchors", type=int, nargs="+", default=[212, 1000])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--logit-scale", type=float, default=4.0)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(args.seed)
    names = ["a", "b", "c"]
    print(f"torch threads {torch.get_num_threads()}; ms per fusion call (3 members), fastest of {args.repeats} x "
          f"{args.calls} calls; EXACT_ENTRIES = {deepen.EXACT_ENTRIES:,}\n")
    print("| V x A | entries | rows | restricted ms | exact ms | default |")
    print("|---|---|---|---|---|---|")
    for A in args.anchors:
        for V in args.vocab:
            mats = {n: RelRepMatrix(A, dense=torch.softmax(3 * torch.randn(V + 100 * i, A, generator=g), -1))
                    for i, n in enumerate(names)}
            with patch.object(deepen, "EXACT_ENTRIES", 0):
                restricted = make_fusion("deepen", names, "a", matrices=mats, tail_mass=1e-4)
            exact = make_fusion("deepen", names, "a", matrices=mats, tail_mass=0.0)
            default = make_fusion("deepen", names, "a", matrices=mats)
            which = [n for n in names if default.restricted[n]]
            runs = "exact" if not which else "restricted" if len(which) == len(names) else \
                f"mixed ({', '.join(which)} restricted)"
            for B in args.rows:
                logits = {n: args.logit_scale * torch.randn(B, V + 100 * i, generator=g) for i, n in enumerate(names)}
                restricted(logits), exact(logits)   # warm-up
                best, _ = fastest({"r": lambda: [restricted(logits) for _ in range(args.calls)],
                                   "e": lambda: [exact(logits) for _ in range(args.calls)]}, args.repeats)
                r, e = best["r"] / args.calls, best["e"] / args.calls
                print(f"| {V} x {A} | {V * A / 1e6:.2f}M | {B} | {r * 1e3:.2f} | {e * 1e3:.2f} | {runs} |", flush=True)
    return 0


if __name__ == "__main__":
    main()
