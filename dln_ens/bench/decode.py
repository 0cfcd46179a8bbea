"""`python -m dln_ens.bench decode`: what one ensemble decoding step costs.

Three members with real vocabularies (the tokenizers in ../shared/tokenizers: llama-spm main,
gpt-2, falcon), random weights (width 256, 4 layers; the LM head scaled so next-token
distributions are peaked like a trained model's), prompts of ~512 main-member tokens, greedy.
Reports per generated token (decode only: the time of a 1-token run, i.e. prefill, subtracted;
the fastest of ``--repeats`` rounds that time every model in turn):

- each member alone (`HFLanguageModel.generate`), their sum, and "ensemble / sum of members";
- the ensemble with the default sparse matrices (top-k anchors per row + uniform residual)
  and with dense matrices, both with the default support-restricted fusion;
- a reference-style loop (batch 1, dense, exact): every member re-run on the whole
  re-tokenised text at every step without a cache, as the published DeePEn code does;
- fidelity, along a greedy run, with both fusions on the same member logits (argmax agreement
  and mean KL): (1) sparse k=64 and dense-with-support against the exact dense search, on a
  fixed subset of ``--dense-anchors`` anchors (dense matrices of all ~17.7k common anchors
  would take 10 GB; both builds get the subset through an anchors.json); (2) sparse k=64 at
  ALL anchors against dense rows computed on demand from the embeddings (`LazyDenseRows`).

Models are re-created from a seed; matrices are cached in ``--workdir``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest.mock import patch

import torch

from dln_ens.io import atomic_write_text

SHARED = Path(__file__).resolve().parents[3] / "shared"
MEMBERS = {"llama": "llama-spm", "gpt2": "gpt-2", "falcon": "falcon"}


def make_members(tok_dir: Path, width: int, layers: int, head_scale: float, seed: int):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dln_ens.lm.hf import HFLanguageModel

    out = {}
    for i, (name, tok_name) in enumerate(MEMBERS.items()):
        path = tok_dir / tok_name
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}/tokenizer.json not found: the benchmark needs the real tokenizers "
                                    f"of ../shared/tokenizers (or pass --tokenizers DIR)")
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed + i)
        V = len(tok)
        if name == "gpt2":
            cfg = GPT2Config(vocab_size=V, n_embd=width, n_layer=layers, n_head=4, n_positions=2048,
                             tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            model = GPT2LMHeadModel(cfg)
        else:
            cfg = LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head.mul_(head_scale)
            if tok.eos_token_id is not None:   # keep random models from stopping early
                head[tok.eos_token_id] = -head.mean(0) * 4
        out[name] = HFLanguageModel(model.eval(), tok, name=name, batch_size=8)
    return out


def make_prompts(main, n: int, length: int, seed: int) -> list[str]:
    """~``length`` main-member tokens of real text (DeePEn's QA sets in ../shared/data), else words."""
    import random

    rng = random.Random(seed)
    lines = []
    for f in sorted((SHARED / "data" / "deepen").rglob("*.jsonl"))[:20]:
        for line in f.read_text(encoding="utf-8").splitlines()[:200]:
            lines.append(" ".join(str(v) for v in json.loads(line).values() if isinstance(v, str)))
    if not lines:
        words = "the of and to in is was for on that with as by at from his an were are which".split()
        lines = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    prompts = []
    for _ in range(n):
        text = ""
        while len(main.encode(text)) < length:
            text += rng.choice(lines) + "\n"
        ids = main.encode(text)[:length]
        prompts.append(main.tokenizer.decode(ids, skip_special_tokens=True))
    return prompts


def anchors_subset(full_dir: Path, out: Path, n: int) -> Path:
    data = json.loads((full_dir / "anchors.json").read_text())
    step = max(1, len(data["surfaces"]) // n)
    keep = list(range(0, len(data["surfaces"]), step))[:n]
    sub = {"members": data["members"], "ids": {m: [data["ids"][m][i] for i in keep] for m in data["members"]},
           "surfaces": [data["surfaces"][i] for i in keep]}
    atomic_write_text(out, json.dumps(sub))
    return out


def matrices(members, directory: Path, topk, anchors=None):
    from dln_ens.relrep.build import build_matrices, build_params
    from dln_ens.relrep.store import is_up_to_date, load_matrices

    params = build_params(100.0, topk, None, anchors, "float16")
    if not is_up_to_date(directory, members, params):
        build_matrices(members, directory, topk=topk, anchors=anchors, progress=True)
    return load_matrices(directory, members)[0]


def reference_loop(members, main, dense, prompt: str, new_tokens: int, lr=0.15, steps=5) -> int:
    """DeePEn's published loop (batch 1): every member on the whole re-tokenised text each
    step, no cache, dense matrices, exact inverse."""
    from dln_ens.ensemble.align import visible_text
    from dln_ens.fusion.registry import make_fusion
    from dln_ens.relrep.vocab import token_surfaces

    fuse = make_fusion("deepen", list(members), main, matrices=dense, lr=lr, steps=steps, tail_mass=0.0)
    m = members[main]
    surf = token_surfaces(m.tokenizer)
    text, ids = prompt.encode(), m.encode(prompt)
    for _ in range(new_tokens):
        logits = {}
        with torch.no_grad():
            for n, mem in members.items():
                x = torch.tensor([ids if n == main else mem.encode(visible_text(text))])
                logits[n] = mem.forward(x, torch.ones_like(x))[0][:, -1]
        tok = int(fuse(logits).argmax())
        ids, text = ids + [tok], text + (surf[tok] or b"")
    return new_tokens


class Compare:
    """A fusion that returns the exact result and records how other fusions differ from it."""

    def __init__(self, exact, variants: dict):
        self.exact, self.variants, self.n = exact, variants, 0
        self.agree = {k: 0 for k in variants}
        self.kl = {k: 0.0 for k in variants}
        self.device = exact.device

    def __call__(self, logits):
        a = self.exact(logits)
        for k, f in self.variants.items():
            b = f(logits)
            self.agree[k] += int((a.argmax(-1) == b.argmax(-1)).sum())
            self.kl[k] += float((a.exp() * (a - b)).sum(-1).sum())
        self.n += a.shape[0]
        return a

    def active(self):
        return self.exact.active()

    def results(self):
        return {k: (self.agree[k] / self.n, self.kl[k] / self.n) for k in self.variants}


class LazyDenseRows:
    """Dense matrix rows computed on demand from the embeddings with the build's formula
    (`relrep.build.relrep_rows`): the dense reference at ALL anchors without its 10 GB. Only
    the support-restricted fusion can use it (it never asks for the whole matrix)."""

    def __init__(self, weight: torch.Tensor, anchor_ids: torch.Tensor, temperature: float):
        import torch.nn.functional as F

        self.weight = weight.detach().float()
        self.eaT = F.normalize(self.weight[anchor_ids], dim=-1).T.contiguous()
        self.temperature = temperature
        self.shape = (self.weight.shape[0], self.eaT.shape[1])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        from dln_ens.relrep.build import relrep_rows

        rows = relrep_rows(self.weight[idx.reshape(-1)], self.eaT, self.temperature)
        return rows.view(*idx.shape, self.shape[1])

    def to(self, device):
        return self


def lazy_dense(members, directory: Path):
    from dln_ens.relrep.anchors import Anchors
    from dln_ens.relrep.matrix import RelRepMatrix

    anchors = Anchors.load(directory / "anchors.json")
    temperature = json.loads((directory / "meta.json").read_text())["temperature"]
    out = {}
    for n, m in members.items():
        rows = LazyDenseRows(m.model.get_input_embeddings().weight, anchors.id_tensor(n), temperature)
        out[n] = RelRepMatrix(rows.shape[1], dense=rows)
    return out


def tokens_per_main_token(members, main: str, prompts: list[str], gens) -> dict[str, float]:
    """Per non-main member: its tokens of the generated text (after the prompt) per main token.
    Random-weight members pick odd tokens (rare words, other scripts) that a byte-level BPE
    splits into several: the ensemble's members then run that many tokens per step."""
    made = sum(g.num_tokens for g in gens)
    out = {}
    for n, m in members.items():
        if n != main:
            grown = sum(len(m.encode(p + g.text)) - len(m.encode(p)) for p, g in zip(prompts, gens))
            out[n] = grown / max(made, 1)
    return out


def per_token_seconds(t_one: float, t_new: float, made: int) -> float:
    """Seconds per generated token, prefill excluded: the time of a ``made``-token run minus
    that of a 1-token run, over the ``made - 1`` tokens between them."""
    return (t_new - t_one) / max(made - 1, 1)


def per_token(fn, new_tokens: int) -> float:
    """`per_token_seconds` of one 1-token and one ``new_tokens`` run of ``fn(n)`` (which returns
    the tokens it made)."""
    t0 = time.perf_counter()
    fn(1)
    t1 = time.perf_counter()
    made = fn(new_tokens)
    return per_token_seconds(t1 - t0, time.perf_counter() - t1, made)


@contextmanager
def timed_parts(ens):
    """While active, the seconds of each member's model calls and of the fusion of ``ens`` (its
    distributions and its target log-probs) add up in the yielded dict (keys: member names,
    "fusion"). A call made inside another of the same key counts once, and a member's calls made
    by the fusion itself (the `surface` method, perplexity weighting) count as fusion. Wall
    clock: on a GPU a part's queued work may be waited for in the next one. The timers cost
    microseconds a step; every patched attribute is put back on exit."""
    spent: dict[str, float] = {}
    active: set[str] = set()

    def timed(key, fn):
        def call(*args, **kwargs):
            if key in active or (key != "fusion" and "fusion" in active):
                return fn(*args, **kwargs)
            active.add(key)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                active.discard(key)
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
        return call

    fusion = ens.fusion

    class TimedFusion:   # the fusion, its calls timed
        target_logprobs = staticmethod(timed("fusion", fusion.target_logprobs))

        def __getattr__(self, name):
            return getattr(fusion, name)

        def __call__(self, *args, **kwargs):
            return timed("fusion", fusion)(*args, **kwargs)

    with ExitStack() as patches:
        patches.enter_context(patch.object(ens, "fusion", TimedFusion()))
        for n, m in ens.members.items():
            for attr in ("last_logits", "forward"):
                patches.enter_context(patch.object(m, attr, timed(n, getattr(m, attr))))
        yield spent


def member_arguments(ap: argparse.ArgumentParser, workdir: str = "/tmp/dln_ens_bench_decode") -> None:
    """The options of the random real-vocabulary members (shared with ``bench score`` and
    ``bench methods``); ``workdir``: where their matrices are cached by default."""
    ap.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers")
    ap.add_argument("--workdir", type=Path, default=Path(workdir))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-scale", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def start(args):
    """Threads, the header line, the members and their sparse k=64 matrices (cached in --workdir)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)
    torch.set_grad_enabled(False)
    members = make_members(args.tokenizers, args.width, args.layers, args.head_scale, args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return members, matrices(members, args.workdir / "sparse", 64)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dln_ens.bench decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    member_arguments(ap)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (each timing keeps its fastest)")
    ap.add_argument("--reference-tokens", type=int, default=8)
    ap.add_argument("--compare-tokens", type=int, default=32)
    ap.add_argument("--compare-all-prompts", type=int, default=2)
    ap.add_argument("--dense-anchors", type=int, default=4096)
    ap.add_argument("--tail-mass", type=float, default=None, help="override the ensemble's default")
    ap.add_argument("--max-support", type=int, default=None)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--only-all-anchor-compare", action="store_true",
                    help="skip the timings and the subset comparison")
    args = ap.parse_args(argv)
    members, sparse = start(args)

    from dln_ens.ensemble.model import EnsembleLanguageModel
    from dln_ens.fusion.registry import make_fusion

    main_name = "llama"
    print(f"anchors: {sparse[main_name].num_anchors} (sparse k=64)", flush=True)
    kw = {}
    if args.tail_mass is not None:
        kw["tail_mass"] = args.tail_mass
    if args.max_support is not None:
        kw["max_support"] = args.max_support
    ens_sparse = EnsembleLanguageModel(members, main_name, sparse, **kw)
    prompts = make_prompts(members[main_name], max(args.batches + [args.compare_all_prompts]), args.prompt_tokens,
                           args.seed)
    probe = members[main_name].next_token_distribution(prompts[:2]).exp().max(-1).values
    print(f"main member's top-1 probability on two prompts: {probe.tolist()}", flush=True)

    dense = ens_dense = None
    if args.only_all_anchor_compare:
        args.batches = []
    if not args.skip_dense and not args.only_all_anchor_compare:
        sub = anchors_subset(args.workdir / "sparse", args.workdir / "anchors_subset.json", args.dense_anchors)
        dense = matrices(members, args.workdir / "dense_subset", None, anchors=sub)
        sparse_sub = matrices(members, args.workdir / "sparse_subset", 64, anchors=sub)
        ens_sparse_sub = EnsembleLanguageModel(members, main_name, sparse_sub, **kw)
        ens_dense = EnsembleLanguageModel(members, main_name, dense, **kw)

    for B in args.batches:
        batch = prompts[:B]
        runs = {n: m for n, m in members.items()}
        runs["ensemble sparse"] = ens_sparse
        if ens_dense is not None:
            runs[f"ensemble dense {args.dense_anchors} anchors"] = ens_dense
        one, full, made, texts = {k: float("inf") for k in runs}, {k: float("inf") for k in runs}, {}, {}
        parts = {}   # the ensemble's fastest runs' seconds by part
        with timed_parts(ens_sparse) as spent:
            for _ in range(args.repeats):   # in turn, keeping each run's fastest (a shared machine is noisy)
                for k, lm in runs.items():
                    for n, best in ((1, one), (args.new_tokens, full)):
                        spent.clear()
                        t0 = time.perf_counter()
                        gens = lm.generate(batch, max_new_tokens=n)
                        took = time.perf_counter() - t0
                        if took < best[k] and k == "ensemble sparse":
                            parts[n] = dict(spent)
                        best[k] = min(best[k], took)
                        made[k, n], texts[k] = max(g.num_tokens for g in gens), gens
        # per generated token, prefill excluded: (t(new) - t(1)) / (tokens - 1)
        res = {k: per_token_seconds(one[k], full[k], made[k, args.new_tokens]) for k in runs}
        res["sum of members"] = sum(res[n] for n in members)
        if B == 1 and dense is not None:
            t0 = time.perf_counter()
            n = reference_loop(members, main_name, dense, batch[0], args.reference_tokens)
            res["reference-style loop (dense)"] = (time.perf_counter() - t0) / n
        print(f"\nbatch {B}: seconds per generated token (per step of the whole batch)")
        for k, v in res.items():
            print(f"  {k:40s} {v * 1e3:9.2f} ms")
        print(f"  ensemble / sum of members (sparse)    {res['ensemble sparse'] / res['sum of members']:9.2f} x")
        print("  tokens each other member runs per main-member token of the ensemble's text (a member alone "
              "runs one): " + ", ".join(f"{n} {r:.2f}" for n, r in tokens_per_main_token(
                  members, main_name, batch, texts["ensemble sparse"]).items()))
        made_n = made["ensemble sparse", args.new_tokens]
        part = {key: per_token_seconds(parts[1].get(key, 0.0), parts[args.new_tokens].get(key, 0.0), made_n)
                for key in parts[args.new_tokens]}
        rest = res["ensemble sparse"] - sum(part.values())
        print("  the ensemble's step by part (its fastest runs, parts timed): " + ", ".join(
            f"{n} {part.get(n, 0.0) * 1e3:.2f} ms (alone {res[n] * 1e3:.2f})" for n in members)
            + f", fusion {part.get('fusion', 0.0) * 1e3:.2f} ms, the rest {rest * 1e3:.2f} ms; without the "
            f"fusion {(res['ensemble sparse'] - part.get('fusion', 0.0)) / res['sum of members']:.2f} x the sum of members")
        if "reference-style loop (dense)" in res:
            print(f"  reference loop / ensemble sparse      "
                  f"{res['reference-style loop (dense)'] / res['ensemble sparse']:9.1f} x")

    if ens_dense is not None:
        exact = make_fusion("deepen", list(members), main_name, matrices=dense, tail_mass=0.0)
        variants = {"sparse k=64 (default fusion)": ens_sparse_sub.fusion, "dense (default fusion)": ens_dense.fusion}
        cmp = Compare(exact, variants)
        runner = EnsembleLanguageModel(members, main_name, dense, **kw)
        runner.fusion = cmp
        runner.generate(prompts[:max(args.batches)], max_new_tokens=args.compare_tokens)
        print(f"\nagainst the exact dense fusion ({args.dense_anchors} anchors, the published computation), "
              f"{cmp.n} fused steps along its greedy run:")
        for label, (agree, kl) in cmp.results().items():
            print(f"  {label:32s} argmax agreement {agree:.4f}   mean KL(exact || it) {kl:.2e}")
    if not args.skip_dense:
        lazy = lazy_dense(members, args.workdir / "sparse")
        ref = make_fusion("deepen", list(members), main_name, matrices=lazy, tail_mass=ens_sparse.fusion.settings.tail_mass,
                          max_support=ens_sparse.fusion.settings.max_support)
        cmp = Compare(ref, {"sparse k=64 (default fusion)": ens_sparse.fusion})
        runner = EnsembleLanguageModel(members, main_name, sparse, **kw)
        runner.fusion = cmp
        runner.generate(prompts[:args.compare_all_prompts], max_new_tokens=args.compare_tokens)
        print(f"\nagainst dense rows at ALL {sparse[main_name].num_anchors} anchors (computed on demand from "
              f"the embeddings; default support-restricted fusion), {cmp.n} fused steps along its greedy run:")
        for label, (agree, kl) in cmp.results().items():
            print(f"  {label:32s} argmax agreement {agree:.4f}   mean KL(dense || it) {kl:.2e}")
    return 0


if __name__ == "__main__":
    main()
