"""Fingerprints: short digests of everything a cached result depends on.

- ``embedding_fingerprint``: what `dln-ens mat` records per member (vocabulary surfaces and the
  input embedding, computed from the loaded model);
- ``file_digest`` / ``folder_digest``: the bytes of files (model weights, tokenizer, config,
  a matrix, a MoD head), streamed so that a large checkpoint never sits in memory whole;
- ``task_fingerprint``: the examples a task actually loaded (covers data files, loader code and
  seeds at once, synthetic or real);
- ``backend_fingerprint``: a configured backend, recursively (its files, its members, its
  matrices) plus its resolved settings;
- ``combine``: one digest of named parts.

Digests of files are memoised by (path, size, mtime, ctime, inode): per process, and for large
files (a checkpoint: hashing runs at a few hundred MiB/s) also across runs in
``$DLN_ENS_CACHE/file_digests.json`` (default ``~/.cache/dln-ens``). Any write, rename or
chmod of a file changes its ctime, which no tool can set back, so a stale digest is never reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_FILE_MEMO: dict[tuple, str] = {}
CHUNK = 1 << 22
PERSIST_BYTES = 64 << 20   # files at least this large keep their digest across runs
_persisted: dict[str, str] | None = None


def _cache_file() -> Path:
    return Path(os.environ.get("DLN_ENS_CACHE") or Path.home() / ".cache" / "dln-ens") / "file_digests.json"


def _persisted_digests() -> dict[str, str]:
    global _persisted
    if _persisted is None:
        try:
            _persisted = json.loads(_cache_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _persisted = {}
    return _persisted


def _remember(key: tuple, digest: str) -> None:
    from dln_ens.io import write_json
    cache = _persisted_digests()
    cache[json.dumps(key)] = digest
    try:
        write_json(_cache_file(), cache, indent=0)
    except OSError:
        pass   # a read-only home: digests are recomputed next time


def combine(parts: Any) -> str:
    """One digest of JSON-able data (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def file_digest(path: str | os.PathLike) -> str:
    """blake2b of the file's bytes (memoised on its stat)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _FILE_MEMO:
        return _FILE_MEMO[key]
    large = st.st_size >= PERSIST_BYTES
    digest = _persisted_digests().get(json.dumps(key)) if large else None
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if large:
            _remember(key, digest)
    _FILE_MEMO[key] = digest
    return digest


def folder_digest(folder: str | os.PathLike) -> dict[str, str]:
    """{file name: digest} of the regular files directly in ``folder`` (a checkpoint directory:
    weights, config, tokenizer; hidden files skipped)."""
    folder = Path(folder)
    return {p.name: file_digest(p) for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


# ----------------------------------------------------------------------------- embeddings (mat)

def vocab_hash(surfaces: list[bytes | None]) -> str:
    h = hashlib.sha256()
    for s in surfaces:
        h.update(b"\xff" if s is None else len(s).to_bytes(4, "little") + s)
    return h.hexdigest()[:32]


def embedding_fingerprint(weight, surfaces: list[bytes | None]) -> dict:
    """Cheap and sensitive: a strided float64 sum catches most edits instantly, the byte hash
    catches the rest (chunked, so a GPU embedding never moves to the cpu whole)."""
    import torch
    with torch.no_grad():
        w = weight.detach()
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = float(flat[::step].double().sum())
        h = hashlib.blake2b(digest_size=16)
        rows = max(1, (1 << 24) // max(1, w.shape[-1] * w.element_size()))
        for start in range(0, w.shape[0], rows):
            chunk = w[start:start + rows].contiguous().cpu()
            h.update(chunk.view(torch.uint8).numpy().tobytes())
    return {"vocab": vocab_hash(surfaces), "shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", ""),
            "sample_sum": sample, "hash": h.hexdigest()}


# ----------------------------------------------------------------------------- tasks and backends

def task_fingerprint(task) -> str:
    """The loaded examples of every split, the instruction and the classes."""
    h = hashlib.sha256()
    head = [task.name, task.instruction, task.classes]
    h.update(json.dumps(head, ensure_ascii=False).encode("utf-8"))
    for split in ("train", "dev", "test"):
        for ex in getattr(task, split):
            aliases = list(getattr(ex.target, "aliases", ()))
            h.update(json.dumps([split, ex.input, str(ex.target), aliases], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:32]


def backend_fingerprint(cfg, name: str) -> dict:
    """The files and settings a configured backend's outputs depend on: an `hf` model's
    checkpoint files, a `mod` member's base and head, an ensemble's members and matrices
    (their meta.json holds a checksum of each matrix), a user class's settings."""
    from dln_ens.backend_types import BACKEND_TYPES
    from dln_ens.config import config_to_dict
    b = cfg.backends[name]
    depends = BACKEND_TYPES[b.type].depends_on(b, lambda other: backend_fingerprint(cfg, other))
    return {"settings": config_to_dict(b), **depends}
