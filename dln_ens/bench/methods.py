"""`python -m dln_ens.bench methods`: decoding speed of each fusion method on real vocabularies.

Two members with real tokenizers (../shared/tokenizers: llama-spm as the main member, gpt-2),
random weights as in `bench.decode` (only speed is meaningful), prompts of ``--prompt-tokens``
main-member tokens, greedy. Reports seconds per 100 generated tokens (decode only: the time of
a 1-token run, i.e. prefill, subtracted) for each method and weighting, at each batch size.
"""
from __future__ import annotations

import argparse
import time

import torch

from dln_ens.bench.decode import make_members, make_prompts, matrices, member_arguments, per_token
from dln_ens.io import markdown_table

VARIANTS = ["main", "deepen", "union", "unite", "unite:entropy", "unite:perplexity", "surface", "surface:entropy"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench methods", description=__doc__.split("\n\n")[0])
    member_arguments(ap, workdir="/tmp/dln_ens_bench_methods")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help="method[:weighting] ...")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dln_ens.ensemble.model import EnsembleLanguageModel

    members = make_members(args.tokenizers, args.width, args.layers, args.head_scale, args.seed)
    members = {n: members[n] for n in ("llama", "gpt2")}
    mats = matrices(members, args.workdir / "sparse", 64)
    rows = []
    for B in args.batches:
        prompts = make_prompts(members["llama"], B, args.prompt_tokens, args.seed)
        for spec in args.variants:
            method, _, weighting = spec.partition(":")
            ens = EnsembleLanguageModel(members, main="llama", matrices=mats, method=method,
                                        weighting=weighting or None, batch_size=B)

            def run(n):
                gens = ens.generate(prompts, max_new_tokens=n)
                return min(g.num_tokens for g in gens)
            t0 = time.perf_counter()
            s = per_token(run, args.new_tokens)
            rows.append({"method": method, "weighting": weighting or "uniform", "batch": B,
                         "s_per_100_tokens": round(100 * s, 2), "s_per_100_tokens_per_row": round(100 * s / B, 3),
                         "bench_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    print(f"\nmembers: llama-spm (main, 32000) + gpt-2 (50257), random weights width {args.width}, "
          f"{args.layers} layers; prompts {args.prompt_tokens} tokens; {args.new_tokens} new tokens; "
          f"threads {torch.get_num_threads()}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
