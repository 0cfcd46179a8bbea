"""`dln-ens zoo`: build the tiny default models (tokenizer + model per member) under zoo_cfg.dir.

A member whose directory exists and whose recorded spec hash (zoo.json) matches is skipped, so
`sh sh/mat.sh` can call this on every run. Each member is written to a temporary directory and
renamed into place; zoo.json is replaced atomically after each member.

    python -m dln_ens.zoo.build --dir models/zoo [--size tiny] [--seed 0] [--force] [--workers N]

Members train in parallel processes (spawned: a script calling build_zoo at import time needs
the usual ``if __name__ == "__main__":`` guard); the weights do not depend on the worker count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from dln_ens.config import ZooConfig
from dln_ens.data.synthetic import make_facts
from dln_ens.io import write_json
from dln_ens.zoo.corpus import member_corpus, tokenizer_corpus
from dln_ens.zoo.models import MemberSpec, make_model, member_specs
from dln_ens.zoo.tokenizers import train_tokenizer
from dln_ens.zoo.train import train_lm

# Bump when the corpus, tokenizers or training change in a way the spec does not show.
ZOO_VERSION = 1
TASK_SEED = 0   # the facts_qa / navigate world the zoo is trained on (load_task's default seed)
MANIFEST = "zoo.json"


def member_seed(zoo_seed: int, index: int) -> int:
    return 1000 * zoo_seed + index


def spec_hash(spec: MemberSpec, seed: int) -> str:
    blob = json.dumps({"spec": spec.to_dict(), "seed": seed, "task_seed": TASK_SEED, "version": ZOO_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(zoo_dir: Path) -> dict:
    path = zoo_dir / MANIFEST
    if not path.is_file():
        return {"members": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rebuild with force=True") from None


def build_member(spec: MemberSpec, seed: int, tok_texts: list[str], out_dir: Path) -> dict:
    """Train the tokenizer and the model of one member and save both into ``out_dir``."""
    t0, c0 = time.time(), time.process_time()
    tok = train_tokenizer(spec.family, tok_texts, spec.vocab_size)
    docs = member_corpus(spec.name, seed, spec.num_navigate, spec.qa_repeats, task_seed=TASK_SEED,
                         num_proposals=spec.num_proposals)
    torch.manual_seed(seed)
    model = make_model(spec, tok)
    losses = train_lm(model, tok, docs, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                      seed=seed, desc=spec.name)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"spec": spec.to_dict(), "seed": seed, "build_s": round(time.time() - t0, 1),
            "build_cpu_s": round(time.process_time() - c0, 1),   # wall time on a quiet machine, 1 thread
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "num_docs": len(docs), "num_facts": sum(spec.name in f.members for f in make_facts(TASK_SEED)),
            "first_losses": losses[:5], "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def _install(tmp: Path, final: Path) -> None:
    """Move a finished member directory into place (replacing an old one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _one_thread_build(spec: MemberSpec, seed: int, tok_texts: list[str], out_dir: Path) -> dict:
    """Train with one torch thread (restored afterwards): tiny matrices gain little from more,
    and the weights are then the same whether members are built in parallel or one by one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_member(spec, seed, tok_texts, out_dir)
    finally:
        torch.set_num_threads(previous)


def build_zoo(zoo_cfg: ZooConfig, force: bool = False, workers: int | None = None) -> dict[str, Path]:
    """Build (or reuse) every member of the zoo; returns {member name: model directory}.
    ``workers``: members trained at once, each in its own process with one thread; None = one
    per CPU core for the default size (up to the number of members), 1 for "tiny" (where
    starting processes costs more than the training)."""
    if workers is None:
        workers = 1 if zoo_cfg.size == "tiny" else max(1, os.cpu_count() or 1)
    return _build_zoo(zoo_cfg, force, workers)


def _build_zoo(zoo_cfg: ZooConfig, force: bool, workers: int) -> dict[str, Path]:
    zoo_dir = Path(zoo_cfg.dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    specs = member_specs(zoo_cfg.size)
    manifest = read_manifest(zoo_dir)
    if manifest.get("size") not in (None, zoo_cfg.size) or manifest.get("seed") not in (None, zoo_cfg.seed):
        manifest = {"members": {}}   # a different zoo lived here: rebuild every member
    manifest |= {"size": zoo_cfg.size, "seed": zoo_cfg.seed, "task_seed": TASK_SEED, "version": ZOO_VERSION}
    paths, todo = {}, []
    for i, spec in enumerate(specs):
        seed = member_seed(zoo_cfg.seed, i)
        out = zoo_dir / spec.name
        entry = manifest["members"].get(spec.name)
        if not force and entry and entry.get("hash") == spec_hash(spec, seed) and (out / "config.json").is_file():
            paths[spec.name] = out
        else:
            todo.append((spec, seed))
    if todo:
        tok_texts = tokenizer_corpus(TASK_SEED)
        tmps = {}
        try:
            for spec, _ in todo:
                tmps[spec.name] = Path(tempfile.mkdtemp(dir=zoo_dir, prefix=f".{spec.name}."))
                tmps[spec.name].chmod(0o755)
            bar = tqdm(total=len(todo), desc=f"zoo ({zoo_cfg.size})", unit="model")

            def finish(spec: MemberSpec, seed: int, entry: dict) -> None:
                _install(tmps[spec.name], zoo_dir / spec.name)
                manifest["members"][spec.name] = entry | {"hash": spec_hash(spec, seed)}
                write_json(zoo_dir / MANIFEST, manifest, indent=1)
                paths[spec.name] = zoo_dir / spec.name
                bar.update()

            if workers > 1 and len(todo) > 1:
                ctx = multiprocessing.get_context("spawn")   # fork after torch's thread pools is unsafe
                with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                    futures = {pool.submit(_one_thread_build, spec, seed, tok_texts, tmps[spec.name]): (spec, seed)
                               for spec, seed in todo}
                    for fut in as_completed(futures):
                        finish(*futures[fut], fut.result())
            else:
                for spec, seed in todo:
                    finish(spec, seed, _one_thread_build(spec, seed, tok_texts, tmps[spec.name]))
            bar.close()
        finally:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)
    paths = {spec.name: paths[spec.name] for spec in specs}
    manifest["members"] = {k: v for k, v in manifest["members"].items() if k in paths}   # drop stale members
    write_json(zoo_dir / MANIFEST, manifest, indent=1)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build the tiny zoo models.")
    ap.add_argument("--dir", default=ZooConfig.dir)
    ap.add_argument("--size", default=ZooConfig.size, choices=["default", "tiny"])
    ap.add_argument("--seed", type=int, default=ZooConfig.seed)
    ap.add_argument("--force", action="store_true", help="rebuild members even when up to date")
    ap.add_argument("--workers", type=int, default=None,
                    help="members trained at once, one process each (default: one per core)")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = build_zoo(ZooConfig(dir=args.dir, size=args.size, seed=args.seed), force=args.force,
                       workers=args.workers)
    print(f"zoo ready in {time.time() - t0:.1f}s: " + ", ".join(f"{k} -> {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
