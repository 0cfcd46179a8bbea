"""`python -m dln_ens.bench serve`: requests per second of `OpenAILanguageModel` over
`dln-ens serve` against the in-process backend, and the concurrency where it stops improving.

For each backend, the same ``--n`` generate requests (``--max-new-tokens``, greedy) and ``--n``
score requests run: in process (one batched call, then one request per call), and through the
client against ``dln-ens serve`` in a subprocess (one prompt per HTTP request, so the server's
batching of concurrent requests is what concurrency buys) at each ``--concurrency``. Overhead is
the client's time over the in-process batched time. Each figure is the fastest of ``--repeats``.

    OMP_NUM_THREADS=1 python -m dln_ens.bench serve --conf conf/default.json --backend zoo-gpt2 --backend ens
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from dln_ens.backends import BackendPool
from dln_ens.bench.score import fastest
from dln_ens.config import load_config
from dln_ens.io import markdown_table
from dln_ens.lm.openai import OpenAILanguageModel

WORDS = "red blue green cat dog left right north south one two three".split()


def workload(n: int) -> tuple[list[str], list[str]]:
    prompts = [f"Question: is the {WORDS[i % 12]} {WORDS[(i * 5) % 12]} number {i}?\nAnswer:" for i in range(n)]
    return prompts, [" Yes" if i % 2 else " No" for i in range(n)]


class OneByOne:
    def __init__(self, lm):
        self.lm = lm

    def generate(self, prompts, **kw):
        return [self.lm.generate([p], **kw)[0] for p in prompts]

    def score(self, contexts, targets):
        return [self.lm.score([c], [t])[0] for c, t in zip(contexts, targets)]


def start_server(conf: str, backend: str, timeout_s: float = 300.0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()   # never a pipe nobody reads: the server's progress bars would fill it
    proc = subprocess.Popen([sys.executable, "-m", "dln_ens", "serve", "--conf", conf, "--backend", backend,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"dln-ens serve exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            httpx.get(url + "/models", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"dln-ens serve did not answer within {timeout_s:.0f} s")


def bench_backend(args, backend: str) -> list[dict]:
    cfg = load_config(args.conf)
    lm = BackendPool(cfg).get(backend)
    prompts, targets = workload(args.n)
    kw = dict(max_new_tokens=args.max_new_tokens)
    rows = []

    def row(mode, conc, who):
        who.generate(prompts[:2], **kw)   # warm-up
        best, _ = fastest({"g": lambda: who.generate(prompts, **kw), "s": lambda: who.score(prompts, targets)},
                          args.repeats)
        g, s = best["g"], best["s"]
        rows.append({"backend": backend, "mode": mode, "concurrency": conc, "generate req/s": args.n / g,
                     "score req/s": args.n / s, "_g": g, "_s": s})

    row("in-process, one batched call", "-", lm)
    row("in-process, one request per call", "-", OneByOne(lm))
    proc, url = start_server(args.conf, backend)
    try:
        for c in args.concurrency:
            with OpenAILanguageModel(url, backend, concurrency=c, batch_size=1, timeout=600) as client:
                row("client over dln-ens serve", c, client)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base_g, base_s = rows[0]["_g"], rows[0]["_s"]
    for r in rows:
        r["generate overhead"] = f"x{r.pop('_g') / base_g:.2f}"
        r["score overhead"] = f"x{r.pop('_s') / base_s:.2f}"
    client_rows = [r for r in rows if r["mode"].startswith("client")]
    for key in ("generate req/s", "score req/s"):
        top = max(r[key] for r in client_rows)
        knee = next(r["concurrency"] for r in client_rows if r[key] >= 0.9 * top)
        print(f"{backend}: {key} stops improving at concurrency {knee} (>= 90% of the best, {top:.1f})")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--conf", default="conf/default.json")
    ap.add_argument("--backend", action="append", help="repeatable (default: zoo-gpt2)")
    ap.add_argument("--n", type=int, default=32, help="requests per measurement")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for backend in args.backend or ["zoo-gpt2"]:
        rows += bench_backend(args, backend)
    for r in rows:
        for key in ("generate req/s", "score req/s"):
            r[key] = f"{r[key]:.1f}"
    print(f"\nthreads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.n} requests, "
          f"{args.max_new_tokens} new tokens per generate request\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
