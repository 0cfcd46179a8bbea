"""`matrices/<ensemble>/` on disk: ``<member>.safetensors``, ``anchors.json``, ``meta.json``.

A build first deletes meta.json, writes every file atomically (temporary file + os.replace)
and writes meta.json last: a directory without meta.json never loads, so an interrupted build
is rebuilt, never used. meta.json records a fingerprint of each member (vocabulary hash,
embedding shape, dtype, a float64 sum of a strided sample and a hash of the embedding's bytes);
loading recomputes it and refuses matrices built for another model.

On disk, sparse indices are uint16 when A <= 65536 (else int32) and values float16 rounded
towards zero (rows never exceed mass 1; the residual is recomputed on load), so k=64 costs
256 bytes per row; in memory they are int64 / float32 as `RelRepMatrix` promises.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dln_ens.relrep.anchors import Anchors
from dln_ens.relrep.matrix import RelRepMatrix
from dln_ens.errors import UserError
from dln_ens.io import atomic_write, write_json

FORMAT_VERSION = 1
REBUILD = "rebuild with `sh sh/mat.sh` (or `dln-ens mat --conf <your config>`; add --force to rebuild all)"


class StaleMatricesError(UserError, RuntimeError):
    """Matrices missing, interrupted, stale or built for other models; the message says which
    member and how to rebuild."""


# ----------------------------------------------------------------------------- fingerprints

def vocab_hash(surfaces: list[bytes | None]) -> str:
    h = hashlib.sha256()
    for s in surfaces:
        h.update(b"\xff" if s is None else len(s).to_bytes(4, "little") + s)
    return h.hexdigest()[:32]


@torch.no_grad()
def fingerprint(weight: torch.Tensor, surfaces: list[bytes | None]) -> dict:
    """Cheap and sensitive: a strided float64 sum catches most edits instantly, the byte hash
    catches the rest (chunked, so a GPU embedding never moves to the cpu whole)."""
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


def file_digest(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]
    except OSError as e:
        raise FileNotFoundError(f"anchors file {path}: {e.strerror}") from None


def _diff(old: dict, new: dict) -> str:
    if old.get("vocab") != new["vocab"]:
        return "its vocabulary (token surfaces) changed"
    if old.get("shape") != new["shape"]:
        return f"its embedding shape changed from {old.get('shape')} to {new['shape']}"
    if old.get("dtype") != new["dtype"]:
        return f"its embedding dtype changed from {old.get('dtype')} to {new['dtype']}"
    a, b = old.get("sample_sum"), new["sample_sum"]
    # the float64 sum may differ in its last bits across thread counts/devices; the hash is exact
    if a is None or abs(a - b) > 1e-9 * max(1.0, abs(a)) or old.get("hash") != new["hash"]:
        return "its input embedding values changed (another checkpoint?)"
    return ""


# ----------------------------------------------------------------------------- writing

def begin_build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)


def _round_down_half(val: torch.Tensor) -> torch.Tensor:
    half = val.half()
    up = half.float() > val
    return torch.where(up, torch.nextafter(half, torch.zeros_like(half)), half)


def save_member(out_dir: Path, name: str, R: RelRepMatrix, value_dtype: str = "float16") -> int:
    """Write ``<name>.safetensors``; returns its size in bytes."""
    if R.is_sparse:
        idx_dtype = torch.uint16 if R.num_anchors <= 65536 else torch.int32
        val = _round_down_half(R.topk_val) if value_dtype == "float16" else R.topk_val.float()
        tensors = {"topk_idx": R.topk_idx.to(idx_dtype).contiguous(), "topk_val": val.contiguous()}
    else:
        tensors = {"dense": R.dense.float().contiguous()}
    meta = {"num_anchors": str(R.num_anchors), "format": str(FORMAT_VERSION)}
    path = out_dir / f"{name}.safetensors"
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path.stat().st_size


def save_anchors(out_dir: Path, anchors: Anchors) -> None:
    write_json(out_dir / "anchors.json", anchors.to_json(), indent=1)


def finish_build(out_dir: Path, params: dict, fingerprints: dict, num_anchors: int,
                 seconds: dict) -> None:
    keep = {f"{m}.safetensors" for m in fingerprints}
    for old in out_dir.glob("*.safetensors"):   # members of an earlier build of this directory
        if old.name not in keep:
            old.unlink()
    meta = {"format": FORMAT_VERSION, "params": params, "members": list(fingerprints),
            "num_anchors": num_anchors, "k": params["topk"], "temperature": params["temperature"],
            "build_seconds": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprints": fingerprints}
    write_json(out_dir / "meta.json", meta, indent=1)


# ----------------------------------------------------------------------------- reading

def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / "meta.json"
    if not path.is_file():
        what = "an interrupted build" if any(directory.glob("*.safetensors")) else "no matrices"
        raise StaleMatricesError(f"{directory}: {what} (no meta.json); {REBUILD}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StaleMatricesError(f"{path}: unreadable ({e}); {REBUILD}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise StaleMatricesError(f"{directory}: matrix format {meta.get('format')} but this version "
                                 f"reads format {FORMAT_VERSION}; {REBUILD}")
    return meta


def _member_fingerprint(name: str, member) -> dict:
    from dln_ens.relrep.build import unpack_member
    from dln_ens.relrep.vocab import token_surfaces
    weight, tok = unpack_member(name, member)
    return fingerprint(weight, token_surfaces(tok))


def staleness(directory: str | Path, members: dict, params: dict) -> str | None:
    """Why the matrices in ``directory`` must be rebuilt for these members and build
    parameters, or None when they are up to date."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except StaleMatricesError as e:
        return str(e).split(";")[0]
    if sorted(meta["members"]) != sorted(members):
        return f"members changed from {meta['members']} to {list(members)}"
    if meta["params"] != params:
        changed = [k for k in params if meta["params"].get(k) != params[k]]
        return f"build parameters changed ({', '.join(changed)})"
    for m, member in members.items():
        if not (directory / f"{m}.safetensors").is_file():
            return f"{m}.safetensors is missing"
        why = _diff(meta["fingerprints"][m], _member_fingerprint(m, member))
        if why:
            return f"member {m!r}: {why}"
    return None


def is_up_to_date(directory: str | Path, members: dict, params: dict) -> bool:
    return staleness(directory, members, params) is None


def load_matrices(directory: str | Path, members: dict) -> tuple[dict[str, RelRepMatrix], Anchors]:
    """The matrices of ``members`` (name -> HFLanguageModel-like; a subset of the built members
    is fine) and the anchors, after checking each member's fingerprint."""
    directory = Path(directory)
    meta = read_meta(directory)
    out = {}
    for m, member in members.items():
        if m not in meta["fingerprints"]:
            raise StaleMatricesError(f"{directory}: no matrix for member {m!r} (built for "
                                     f"{', '.join(meta['members'])}); {REBUILD}")
        why = _diff(meta["fingerprints"][m], _member_fingerprint(m, member))
        if why:
            raise StaleMatricesError(f"{directory}: the matrix of member {m!r} is stale: {why}; {REBUILD}")
        path = directory / f"{m}.safetensors"
        try:
            t = load_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: rebuild
            raise StaleMatricesError(f"{path}: unreadable ({e}); {REBUILD}") from None
        A = meta["num_anchors"]
        rows = meta["fingerprints"][m]["shape"][0]
        if "dense" in t:
            R = RelRepMatrix(A, dense=t["dense"].float())
        else:
            R = RelRepMatrix(A, topk_idx=t["topk_idx"].long(), topk_val=t["topk_val"].float())
        if R.num_rows != rows:
            raise StaleMatricesError(f"{path}: {R.num_rows} rows but member {m!r} has {rows}; {REBUILD}")
        out[m] = R
    anchors = Anchors.load(directory / "anchors.json")
    return out, anchors
