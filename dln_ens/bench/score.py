"""`python -m dln_ens.bench score`: what the ensemble's ``score`` costs against its members'.

The shape of a DLN scoring call: ``--contexts`` prompts of ~``--context-tokens`` main-member
tokens, each with ``--targets`` targets of 8-30 words (48 pairs by default). Members as in
``bench decode``: the real tokenizers of ../shared/tokenizers (llama-spm main, gpt-2, falcon),
random weights (width 256, 4 layers), sparse k=64 matrices (cached in ``--workdir``).

Reports, as the fastest of ``--repeats`` runs taken in turn in one process (so the ratios
compare like with like on a shared machine): each member's own ``score`` of the pairs, their
sum, the ensemble's default one-pass ``score`` and its exact mode; the ratios to the sum; the
one-pass score's fastest run by part (`bench.decode.timed_parts`) and its ratio without the fusion; the
page faults of each fastest run (fresh pages the process took: see `dln_ens.allocator`); and
the gap between the one-pass and the exact scores (mean and max per target token, and the
share of prefixes a member had to compute on their own because its tokenisation of the
prefix is not a prefix of its tokenisation of the whole text).
"""
from __future__ import annotations

import argparse
import random
import time

from dln_ens.allocator import page_faults
from dln_ens.bench.decode import make_prompts, member_arguments, start, timed_parts


def make_pairs(main, contexts: int, targets: int, length: int, seed: int) -> tuple[list[str], list[str]]:
    """``contexts`` x ``targets`` (context, target) pairs; targets are 8-30 words of real text."""
    rng = random.Random(seed + 1)
    prompts = make_prompts(main, contexts, length, seed)
    words = " ".join(prompts).split()
    ctxs, tgts = [], []
    for p in prompts:
        for _ in range(targets):
            n = rng.randint(8, 30)
            start = rng.randrange(0, max(1, len(words) - n))
            ctxs.append(p + "\nAnswer:")
            tgts.append(" " + " ".join(words[start:start + n]))
    return ctxs, tgts


def fastest(fns: dict, repeats: int, faults: dict | None = None) -> tuple[dict, dict]:
    """Seconds of each callable, the fastest of ``repeats`` rounds (all callables once per round),
    and each one's last result;
    ``faults``, if given, gets the page faults of each one's fastest run (where the OS counts them)."""
    best = {k: float("inf") for k in fns}
    out = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            f0 = page_faults()
            t0 = time.perf_counter()
            out[k] = fn()
            took = time.perf_counter() - t0
            if took < best[k]:
                best[k] = took
                if faults is not None and f0 is not None:
                    faults[k] = page_faults() - f0
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    member_arguments(ap)
    ap.add_argument("--contexts", type=int, default=6)
    ap.add_argument("--targets", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8, help="members' and ensemble's batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-exact", action="store_true", help="skip the exact mode (slow) and the gap")
    args = ap.parse_args(argv)
    members, mats = start(args)

    from dln_ens.ensemble.model import EnsembleLanguageModel
    import dln_ens.ensemble.model as ensemble_model

    for m in members.values():
        m.batch_size = args.batch_size
    main_name = "llama"
    ctxs, tgts = make_pairs(members[main_name], args.contexts, args.targets, args.context_tokens, args.seed)
    ens = EnsembleLanguageModel(members, main_name, mats, batch_size=args.batch_size)
    parts: dict[str, float] = {}   # the one-pass score's fastest run by part (`timed_parts`)

    def one_pass():
        spent.clear()
        t0 = time.perf_counter()
        scores = ens.score(ctxs, tgts)
        took = time.perf_counter() - t0
        if took < parts.get("total", float("inf")):
            parts.clear()
            parts.update(spent, total=took)
        return scores

    fns = {n: (lambda m=m: m.score(ctxs, tgts)) for n, m in members.items()}
    fns["ensemble (one-pass)"] = one_pass
    if not args.no_exact:
        exact = EnsembleLanguageModel(members, main_name, mats, batch_size=args.batch_size, score_mode="exact")
        fns["ensemble (exact)"] = lambda: exact.score(ctxs, tgts)
    ens.score(ctxs[:2], tgts[:2])   # warm-up
    faults: dict[str, int] = {}
    with timed_parts(ens) as spent:
        best, out = fastest(fns, args.repeats, faults)
    total = sum(best[n] for n in members)
    ntok = sum(s.num_tokens for s in out["ensemble (one-pass)"])
    print(f"\n{len(ctxs)} pairs ({args.contexts} contexts of ~{args.context_tokens} tokens x {args.targets} "
          f"targets, {ntok} main-member target tokens), batch {args.batch_size}; seconds, fastest of "
          f"{args.repeats}")
    for k, v in best.items():
        print(f"  {k:24s} {v:8.3f} s" + (f"   {faults[k]:9,d} page faults" if k in faults else ""))
    print(f"  {'sum of members':24s} {total:8.3f} s")
    for k in ("ensemble (one-pass)", "ensemble (exact)"):
        if k in best:
            print(f"  {k + ' / sum of members':44s} {best[k] / total:6.2f} x")
    rest = parts["total"] - sum(v for k, v in parts.items() if k != "total")
    print("  one-pass by part (its fastest run, parts timed): " + ", ".join(
        f"{n} {parts.get(n, 0.0):.3f} s (alone {best[n]:.3f})" for n in members)
        + f", fusion {parts.get('fusion', 0.0):.3f} s, the rest {rest:.3f} s; without the fusion "
        f"{(parts['total'] - parts.get('fusion', 0.0)) / total:.2f} x the sum of members")
    counts = {}
    orig = ensemble_model.member_reads

    def counting(*a, **kw):
        reads = orig(*a, **kw)
        c = counts.setdefault(kw["name"], [0, 0])
        c[0], c[1] = c[0] + reads.exact, c[1] + len(reads.order)
        return reads
    ensemble_model.member_reads = counting
    try:
        ens.score(ctxs, tgts)
    finally:
        ensemble_model.member_reads = orig
    for n, (e, k) in counts.items():
        print(f"  {n}: {e} of {k} prefixes computed on their own ({e / max(k, 1):.1%})")
    if "ensemble (exact)" in out:
        gaps = [abs(a.logprob - b.logprob) for a, b in zip(out["ensemble (one-pass)"], out["ensemble (exact)"])]
        per_tok = [g / s.num_tokens for g, s in zip(gaps, out["ensemble (exact)"]) if s.num_tokens]
        print(f"  one-pass vs exact: mean |gap| per token {sum(gaps) / max(ntok, 1):.2e} nats, max per token "
              f"(one pair) {max(per_tok):.2e}, max per pair {max(gaps):.2e}")
    return 0


if __name__ == "__main__":
    main()
