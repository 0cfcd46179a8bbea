"""Measure the zoo: per member accuracy on facts_qa and navigate, and the facts known by at least
one member (what an ensemble could reach). Uses plain transformers models, independent of the
library's backends, so it can check them.

    python -m dln_ens.zoo.report --dir models/zoo [--split test] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dln_ens.data import synthetic as syn
from dln_ens.data.registry import load_task
from dln_ens.data.task import Example, normalize_answer
from dln_ens.io import atomic_write_text, markdown_table


def forward_prompt(instruction: str, x: str) -> str:
    return f"{instruction}\n\nInput: {x}\nAnswer:"


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt up to the first newline (left-padded batches, no cache)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    for b in range(0, len(prompts), batch_size):
        enc = [tok(p)["input_ids"] for p in prompts[b:b + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        new = [[] for _ in enc]
        done = [False] * len(enc)
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :len(tok)]
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    new[i].append(t)
                    done[i] = t == tok.eos_token_id or "\n" in tok.decode(new[i])
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        outs += [tok.decode(n, skip_special_tokens=True).split("\n")[0] for n in new]
    return outs


@torch.no_grad()
def choose(model, tok, prompts: list[str], options: list[str], batch_size: int = 32) -> list[str]:
    """The option whose " option\n" continuation has the highest log-likelihood."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []   # (prompt index, option index, ids, number of context tokens)
    for i, p in enumerate(prompts):
        ctx = tok(p)["input_ids"]
        for j, o in enumerate(options):
            full = tok(p + f" {o}\n")["input_ids"]
            if full[:len(ctx)] != ctx:
                raise ValueError(f"{type(tok).__name__}: the prompt's tokens change when {o!r} follows")
            rows.append((i, j, full, len(ctx)))
    scores = torch.full((len(prompts), len(options)), float("-inf"))
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        width = max(len(r[2]) for r in chunk)
        ids = torch.tensor([r[2] + [pad] * (width - len(r[2])) for r in chunk])
        mask = torch.tensor([[1] * len(r[2]) + [0] * (width - len(r[2])) for r in chunk])
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for k, (i, j, full, n_ctx) in enumerate(chunk):
            scores[i, j] = tok_logp[k, n_ctx - 1:len(full) - 1].sum()
    return [options[j] for j in scores.argmax(-1).tolist()]


def accuracy(preds: list[str], examples: list[Example]) -> float:
    return sum(normalize_answer(p) == normalize_answer(e.target) for p, e in zip(preds, examples)) / max(1, len(examples))


def evaluate_member(path: Path, name: str, split: str = "test", num_navigate: int | None = None) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    facts = load_task("facts_qa")
    nav = load_task("navigate")
    fx = getattr(facts, split)
    nx = getattr(nav, split)[:num_navigate]
    known = [name in facts.meta["known_by"][e.input] for e in fx]
    oracle = syn.FACTS_SHORT[0]
    t0 = time.time()
    pred_oracle = greedy(model, tok, [forward_prompt(oracle, e.input) for e in fx])
    pred_generic = greedy(model, tok, [forward_prompt(facts.instruction, e.input) for e in fx])
    para = [e for e, k in zip(facts.meta["paraphrase_test"], known) if k] if split == "test" else []
    pred_para = greedy(model, tok, [forward_prompt(oracle, e.input) for e in para])
    nav_oracle = syn.NAV_FORMATS["yes_no"][1][0]
    nav_gen = greedy(model, tok, [forward_prompt(nav_oracle, e.input) for e in nx], max_new_tokens=3)
    nav_gen_generic = greedy(model, tok, [forward_prompt(nav.instruction, e.input) for e in nx], max_new_tokens=3)
    nav_cls = choose(model, tok, [forward_prompt(nav_oracle, e.input) for e in nx], nav.classes)
    nav_cls_generic = choose(model, tok, [forward_prompt(nav.instruction, e.input) for e in nx], nav.classes)
    ok = [normalize_answer(p) == normalize_answer(e.target) for p, e in zip(pred_oracle, fx)]
    kn = [o for o, k in zip(ok, known) if k]
    un = [o for o, k in zip(ok, known) if not k]
    return {
        "member": name,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tok),
        "logits_width": model.get_output_embeddings().weight.shape[0],
        "facts_known_acc": sum(kn) / max(1, len(kn)),
        "facts_unknown_acc": sum(un) / max(1, len(un)),
        "facts_acc": accuracy(pred_oracle, fx),
        "facts_acc_generic_prompt": accuracy(pred_generic, fx),
        "facts_paraphrase_known_acc": accuracy(pred_para, para),
        "navigate_acc": accuracy(nav_gen, nx),
        "navigate_acc_generic_prompt": accuracy(nav_gen_generic, nx),
        "navigate_cls_acc": accuracy(nav_cls, nx),
        "navigate_cls_acc_generic_prompt": accuracy(nav_cls_generic, nx),
        "correct": ok,
        "eval_s": time.time() - t0,
    }


def report(zoo_dir: str | Path, split: str = "test", num_navigate: int | None = None) -> dict:
    zoo_dir = Path(zoo_dir)
    manifest_path = zoo_dir / "zoo.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist; build the zoo with `dln-ens zoo` "
                                f"(dln_ens.zoo.build.build_zoo) first")
    manifest = json.loads(manifest_path.read_text())
    rows = []
    for name, entry in manifest["members"].items():
        r = evaluate_member(zoo_dir / name, name, split, num_navigate)
        r |= {"family": entry["spec"]["family"], "arch": entry["spec"]["arch"], "build_s": entry["build_s"]}
        rows.append(r)
    union = [any(c) for c in zip(*(r.pop("correct") for r in rows))]
    return {"split": split, "size": manifest["size"], "members": rows,
            "facts_union_acc": sum(union) / max(1, len(union))}


def markdown(rep: dict) -> str:
    cols = ["member", "family", "arch", "params", "vocab", "build_s", "facts_known_acc", "facts_unknown_acc",
            "facts_acc", "facts_acc_generic_prompt", "facts_paraphrase_known_acc", "navigate_acc",
            "navigate_acc_generic_prompt", "navigate_cls_acc", "navigate_cls_acc_generic_prompt"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
    table = markdown_table([{c: fmt(r[c]) for c in cols} for r in rep["members"]], cols)
    return (f"{table}\nfacts_qa {rep['split']}: fraction answered correctly by at least one member "
            f"(one-word instruction): {rep['facts_union_acc']:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="models/zoo")
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--num-navigate", type=int, default=None, help="evaluate on the first n navigate examples")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    rep = report(args.dir, args.split, args.num_navigate)
    print(markdown(rep))
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
