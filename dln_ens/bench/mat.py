"""`python -m dln_ens.bench mat`: matrix build cost at realistic vocabulary scale.

Real tokenizers (llama-spm 32000, gpt-2 50257, falcon 65024 from ../shared/tokenizers) give the
anchors (common to all three); each is paired with a random embedding of width 256 with
structure (rank-32 plus noise). Each member runs in its own subprocess so that its peak RSS
(``ru_maxrss``, read right after the build) is its own. Per member: anchors, sparse (default
k=64) build seconds, peak RSS, the seconds of the bare blocked ``E_norm @ E_A_norm.T`` product
in the same process (same block size, one reused output slab; build and product interleaved
``--reps`` times, minimum reported), and bytes on disk: dense = V*A*4
(computed, never materialised); sparse k=16/64/256 as actually written by the store (the file
size depends only on shapes and dtypes, so k=16 is the k=64 file's first columns and k=256 a
same-shaped file).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dln_ens.io import markdown_table

SHARED = Path(__file__).resolve().parents[3] / "shared"
MEMBERS = ["llama-spm", "gpt-2", "falcon"]


def _embedding(V: int, d: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, 32, generator=g) @ torch.randn(32, d, generator=g) + 0.5 * torch.randn(V, d, generator=g)


def worker(name: str, tok_dir: Path, d: int, k: int, out: Path, reps: int = 2) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from dln_ens.relrep import store
    from dln_ens.relrep.anchors import common_anchors
    from dln_ens.relrep.build import BLOCK_ELEMENTS, member_matrix
    from dln_ens.relrep.matrix import RelRepMatrix
    from dln_ens.relrep.vocab import token_surfaces

    surfaces = {m: token_surfaces(AutoTokenizer.from_pretrained(tok_dir / m)) for m in MEMBERS}
    anchors = common_anchors(surfaces)
    V = len(surfaces[name])
    E = _embedding(V, d, MEMBERS.index(name))
    ids = anchors.id_tensor(name)
    A = len(anchors)
    block = max(16, min(V, BLOCK_ELEMENTS // A))

    def build() -> float:
        nonlocal R
        t0 = time.perf_counter()
        R = member_matrix(E, ids, 100.0, k)
        return time.perf_counter() - t0

    R = None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    build_times = [build()]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # before the product's buffers exist
    En, EaT = F.normalize(E, dim=-1), F.normalize(E[ids], dim=-1).T.contiguous()
    out_buf = torch.empty(block, A)

    def bare() -> float:  # blocked like the build: the full V x A output is what we avoid
        t0 = time.perf_counter()
        for s in range(0, V, block):
            rows = En[s:s + block]
            torch.matmul(rows, EaT, out=out_buf[:rows.shape[0]])
        return time.perf_counter() - t0

    bare_times = [bare()]
    for _ in range(reps - 1):  # interleaved, min of each: the machine is shared
        build_times.append(build())
        bare_times.append(bare())
    build_s, bare_s = min(build_times), min(bare_times)
    sizes = {}
    for kk in (16, 64, 256):
        if kk <= k:
            Rk = RelRepMatrix(A, topk_idx=R.topk_idx[:, :kk], topk_val=R.topk_val[:, :kk])
        else:  # same shape and dtypes as a k=256 build: the same bytes on disk
            Rk = RelRepMatrix(A, topk_idx=torch.zeros(V, kk, dtype=torch.long), topk_val=torch.zeros(V, kk))
        sizes[kk] = store.save_member(out, f"{name}-k{kk}", Rk)
    return {"member": name, "vocab": V, "anchors": A, "build_s": build_s, "bare_s": bare_s,
            "peak_rss_mb": peak_kb / 1024, "rss_before_build_mb": rss0 / 1024, "dense_bytes": V * A * 4,
            "sparse_bytes": sizes, "threads": torch.get_num_threads(),
            "build_all_s": build_times, "bare_all_s": bare_times}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def table(rows: list[dict], k: int) -> str:
    out = []
    for r in rows:
        sp = {int(a): b for a, b in r["sparse_bytes"].items()}
        out.append({"member": r["member"], "vocab": r["vocab"], "anchors": r["anchors"],
                    f"build k={k} (s)": f"{r['build_s']:.1f}", "bare product (s)": f"{r['bare_s']:.1f}",
                    "build / bare": f"{r['build_s'] / r['bare_s']:.2f}x",
                    "peak RSS": f"{r['peak_rss_mb']:,.0f} MB", "dense fp32": _mb(r["dense_bytes"]),
                    "sparse k=16": _mb(sp[16]), "sparse k=64": _mb(sp[64]), "sparse k=256": _mb(sp[256]),
                    "k=64 / dense": f"{100 * sp[64] / r['dense_bytes']:.2f}%"})
    return markdown_table(out).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dln_ens.bench mat", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=64, help="k of the timed sparse build")
    p.add_argument("--members", nargs="+", default=MEMBERS, choices=MEMBERS)
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the minimum is reported")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokenizers, args.dim, max(args.k, 64), args.out, args.reps)))
        return 0
    if not all((args.tokenizers / m).is_dir() for m in MEMBERS):
        print(f"{args.tokenizers}: needs {', '.join(MEMBERS)} (see ../shared/README.md)", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.members:
            cmd = [sys.executable, "-m", "dln_ens.bench", "mat", "--worker", m, "--out", tmp,
                   "--tokenizers", str(args.tokenizers), "--dim", str(args.dim), "--k", str(args.k),
                   "--reps", str(args.reps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{m}: done in {rows[-1]['build_s']:.1f} s", file=sys.stderr)
    print(table(rows, max(args.k, 64)))
    print(f"\n(width {args.dim}, {rows[0]['threads']} torch threads; RSS before the build: "
          + ", ".join(f"{r['member']} {r['rss_before_build_mb']:,.0f} MB" for r in rows) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
