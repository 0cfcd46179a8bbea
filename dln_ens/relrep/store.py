"""`matrices/<ensemble>/` on disk: ``<member>.safetensors``, ``anchors.json``, ``meta.json``.

meta.json is the build's manifest. A build first checks that the directory holds nothing but
the files an earlier build listed there (else it refuses: it never deletes or overwrites a file
it did not write), then rewrites meta.json as an unfinished build listing every file it may
write, writes each file atomically (temporary file + os.replace) and writes the complete
meta.json last; only then are files of the earlier build that this one no longer needs
deleted. A directory whose meta.json is unfinished never loads, so an interrupted build is
rebuilt, never used.

The complete meta.json records the build settings (``params``), a checksum of each matrix
file and a fingerprint of each member (vocabulary hash, embedding shape, dtype, a float64 sum
of a strided sample and a hash of the embedding's bytes, `dln_ens.fingerprint`). Loading
checks all three and refuses, naming the member and the fix; `dln-ens mat` rebuilds what is
truncated, modified or stale.

On disk, sparse indices are uint16 when A <= 65536 (else int32) and values float16 rounded
towards zero (rows never exceed mass 1; the residual is recomputed on load), so k=64 costs
256 bytes per row; in memory they are int64 / float32 as `RelRepMatrix` promises.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dln_ens.relrep.anchors import Anchors
from dln_ens.relrep.matrix import RelRepMatrix
from dln_ens.errors import UserError
from dln_ens.fingerprint import embedding_fingerprint as fingerprint, file_digest as _digest
from dln_ens.io import atomic_write, write_json

FORMAT_VERSION = 2
REBUILD = "rebuild with `sh sh/mat.sh` (or `dln-ens mat --conf <your config>`; add --force to rebuild all)"
META_KEYS = ("format", "complete", "params", "members", "files", "num_anchors", "fingerprints", "checksums")


class StaleMatricesError(UserError, RuntimeError):
    """Matrices missing, interrupted, stale or built for other models; the message says which
    member and how to rebuild."""


class ForeignFilesError(UserError, RuntimeError):
    """A matrices directory holds files no build wrote; a build there would overwrite or delete them."""


def file_digest(path: str | Path) -> str:
    try:
        return _digest(path)
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


def params_diff(built: dict, wanted: dict) -> str:
    """The build settings that differ, as 'key: built X, wanted Y' (only keys of ``wanted``)."""
    return "; ".join(f"{k}: built with {built.get(k)!r}, the config asks for {v!r}"
                     for k, v in wanted.items() if built.get(k) != v)


# ----------------------------------------------------------------------------- writing

def owned_files(out_dir: Path) -> set[str]:
    """The files the previous build of ``out_dir`` listed in its meta.json (besides meta.json)."""
    path = out_dir / "meta.json"
    if not path.is_file():
        return set()
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ForeignFilesError(f"{path}: unreadable ({e}), so which files a build wrote here is "
                                f"unknown; delete {out_dir} yourself or choose another \"matrices\" folder") from None
    if isinstance(meta, dict) and isinstance(meta.get("files"), list):
        files = {str(f) for f in meta["files"]}
    elif isinstance(meta, dict) and meta.get("format") == 1 and isinstance(meta.get("members"), list):
        files = {f"{m}.safetensors" for m in meta["members"]} | {"anchors.json"}   # format 1 listed members
    else:
        files = None
    if files is not None:
        # a build writes only these names in its own folder: a manifest listing anything else was not
        # written by a build, and nothing it lists may be deleted
        odd = sorted(f for f in files if not _buildable_name(f))
        if odd:
            raise ForeignFilesError(f"{path}: lists {', '.join(odd[:5])}, which no matrix build writes; delete "
                                    f"{out_dir} yourself or choose another \"matrices\" folder")
        return files
    raise ForeignFilesError(f"{path}: not a matrices manifest (no \"files\" list); delete {out_dir} "
                            f"yourself or choose another \"matrices\" folder")


def _buildable_name(name: str) -> bool:
    """A file name a build writes: ``anchors.json`` or ``<member>.safetensors``, in the folder itself."""
    plain = bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(".")
    return plain and (name == "anchors.json" or (name.endswith(".safetensors") and name != ".safetensors"))


def _is_temp_of(name: str, names: set[str]) -> bool:
    """An atomic writer's temporary file for one of ``names`` (``.<name>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)


def begin_build(out_dir: Path, members: list[str]) -> set[str]:
    """Check that ``out_dir`` holds only files of earlier builds, then mark it as being built.
    Returns the files of the earlier build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = owned_files(out_dir)
    planned = {f"{m}.safetensors" for m in members} | {"anchors.json"}
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name != "meta.json" and p.name not in owned and not _is_temp_of(p.name, owned | planned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignFilesError(f"{out_dir}: holds {shown}, which no matrix build listed in its meta.json; "
                                f"refusing to build there (a build replaces its own files only). Point "
                                f"\"matrices\" at an empty or new folder such as matrices/<ensemble>")
    write_json(out_dir / "meta.json", {"format": FORMAT_VERSION, "complete": False,
                                       "files": sorted(owned | planned)}, indent=1)
    return owned


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
                 seconds: dict, previous: set[str] = frozenset()) -> None:
    """Write the complete meta.json, then delete the files of the ``previous`` build that this
    one did not write again."""
    files = sorted({f"{m}.safetensors" for m in fingerprints} | {"anchors.json"})
    checksums = {m: file_digest(out_dir / f"{m}.safetensors") for m in fingerprints}
    meta = {"format": FORMAT_VERSION, "complete": True, "params": params, "members": list(fingerprints),
            "files": files, "num_anchors": num_anchors, "k": params["topk"], "temperature": params["temperature"],
            "build_seconds": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprints": fingerprints, "checksums": checksums}
    write_json(out_dir / "meta.json", meta, indent=1)
    for old in sorted(set(previous) - set(files)):
        (out_dir / old).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading

def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / "meta.json"
    if not path.is_file():
        raise StaleMatricesError(f"{directory}: no finished matrix build (no meta.json); {REBUILD}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StaleMatricesError(f"{path}: unreadable ({e}); {REBUILD}") from None
    if not isinstance(meta, dict):
        raise StaleMatricesError(f"{path}: not a JSON object; {REBUILD}")
    if meta.get("format") != FORMAT_VERSION:
        raise StaleMatricesError(f"{directory}: matrix format {meta.get('format')} but this version "
                                 f"reads format {FORMAT_VERSION}; {REBUILD}")
    if meta.get("complete") is False:
        raise StaleMatricesError(f"{directory}: an interrupted build (meta.json marks it unfinished); {REBUILD}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise StaleMatricesError(f"{path}: missing keys {', '.join(missing)} (edited by hand or written by "
                                 f"another tool); {REBUILD}")
    return meta


def _member_fingerprint(name: str, member) -> dict:
    from dln_ens.relrep.build import unpack_member
    from dln_ens.relrep.vocab import token_surfaces
    weight, tok = unpack_member(name, member)
    return fingerprint(weight, token_surfaces(tok))


def _checksum_problem(directory: Path, meta: dict, m: str) -> str:
    path = directory / f"{m}.safetensors"
    if not path.is_file():
        return f"{path.name} is missing"
    if file_digest(path) != meta["checksums"].get(m):
        return (f"{path.name} does not match the checksum in meta.json (truncated or modified "
                f"after the build)")
    return ""


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
        why = _checksum_problem(directory, meta, m)
        if why:
            return why
        why = _diff(meta["fingerprints"][m], _member_fingerprint(m, member))
        if why:
            return f"member {m!r}: {why}"
    return None


def is_up_to_date(directory: str | Path, members: dict, params: dict) -> bool:
    return staleness(directory, members, params) is None


def check_built(directory: str | Path, members: list[str], params: dict) -> None:
    """What can be checked without the models: a finished build for these members, with these
    settings, whose files match their checksums (`load_matrices` checks the rest)."""
    directory = Path(directory)
    meta = read_meta(directory)
    why = params_diff(meta["params"], params)
    if why:
        raise StaleMatricesError(f"{directory}: built with other settings ({why}); {REBUILD}")
    for m in members:
        if m not in meta["checksums"]:
            raise StaleMatricesError(f"{directory}: no matrix for member {m!r} (built for "
                                     f"{', '.join(meta['members'])}); {REBUILD}")
        why = _checksum_problem(directory, meta, m)
        if why:
            raise StaleMatricesError(f"{directory}: the matrix of member {m!r} is damaged: {why}; {REBUILD}")


def load_matrices(directory: str | Path, members: dict, params: dict | None = None
                  ) -> tuple[dict[str, RelRepMatrix], Anchors]:
    """The matrices of ``members`` (name -> HFLanguageModel-like; a subset of the built members
    is fine) and the anchors, after checking the build settings (the keys of ``params``: those
    the caller expects, e.g. {"topk": 64, "temperature": 100.0}), each matrix's checksum and
    each member's fingerprint."""
    directory = Path(directory)
    check_built(directory, list(members), params or {})
    meta = read_meta(directory)
    out = {}
    for m, member in members.items():
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
