"""`build_matrices`: anchors + one relative-representation matrix per member, built in row
blocks so that a sparse build never holds more than one [block, A] slab of the dense matrix.

Per block of token rows (float32, on the embedding's device):
    C = normalize(E[blk]) @ normalize(E_A).T                    cosine to every anchor
    R = softmax(T * C / ||C||_row)                               DeePEn's row-L2 normalisation
    sparse: torch.topk(R, k) per row
When d is small next to A, ||C||_row = ||e L|| / ||e|| with L L^T = E_A^T E_A (d x d), so
the row scale folds into the product's input and the [block, A] slab costs one product, one
softmax (row-wise, cache-resident) and one top-k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dln_ens.checks import check_number
from dln_ens.relrep import store
from dln_ens.relrep.anchors import AnchorError, Anchors, common_anchors, most_consistent
from dln_ens.relrep.matrix import RelRepMatrix
from dln_ens.relrep.vocab import token_surfaces

BLOCK_ELEMENTS = 1 << 25   # one [block, A] float32 slab: 128 MiB (two live): few ops per row, cheap next to V x A


@dataclass
class MemberStats:
    name: str
    vocab: int          # rows of the matrix (embedding rows)
    anchors: int
    k: int | None       # None = dense
    bytes: int          # size on disk
    seconds: float


def unpack_member(name: str, member) -> tuple[torch.Tensor, object]:
    """(input embedding weight [V, d], tokenizer) of an HFLanguageModel-like member."""
    model, tok = getattr(member, "model", None), getattr(member, "tokenizer", None)
    if model is None or tok is None or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"member {name!r} ({type(member).__name__}): matrices need a local model with "
                        f"`.model` (a transformers model) and `.tokenizer`, e.g. an HFLanguageModel")
    return model.get_input_embeddings().weight.detach(), tok


def _normalized(rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.float(), dim=-1)


def anchor_factor(ea: torch.Tensor) -> torch.Tensor | None:
    """L [d, d] with L L^T = E_A^T E_A (from a float64 eigendecomposition), when d is small
    next to A: then ||cos row|| = ||e L|| / ||e|| comes from the embedding row alone, without a
    pass over the [block, A] slab. As accurate as the direct norm: both sum float32 products of
    d terms, and ||e L||^2 is a sum of squares (no cancellation)."""
    d, A = ea.shape[1], ea.shape[0]
    if 16 * d > A:
        return None
    evals, evecs = torch.linalg.eigh(ea.double().T @ ea.double())
    return (evecs * evals.clamp_min(0).sqrt()).float()


def relrep_rows(e: torch.Tensor, eaT: torch.Tensor, temperature: float,
                factor: torch.Tensor | None = None, out: torch.Tensor | None = None,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(T * l2normalize_rows(cos(e, E_A))) for a block of float32 embedding rows ``e``
    [b, d] against unit anchor rows ``eaT`` [d, A].

    T * cos / ||cos|| = T * (e . a) / ||e L||: with ``factor`` L the row scale is known before
    the product and folded into ``e``, so the [b, A] slab is touched only by the product and
    the softmax. ``scratch``/``out``: reused [b, A] buffers (a fresh 64 MiB slab per block
    costs page faults comparable to the softmax itself). An all-zero row is uniform."""
    if factor is not None:
        norm = torch.linalg.vector_norm(e @ factor, dim=-1, keepdim=True)
        logits = torch.matmul(e * (temperature / norm.clamp_min(1e-30)), eaT, out=scratch)
    else:
        logits = torch.matmul(F.normalize(e, dim=-1), eaT, out=scratch)
        logits.mul_(temperature / torch.linalg.vector_norm(logits, dim=-1, keepdim=True).clamp_min(1e-12))
    if out is None:
        return torch.softmax(logits, dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)


@torch.no_grad()
def member_matrix(weight: torch.Tensor, anchor_ids: torch.Tensor, temperature: float = 100.0,
                  topk: int | None = 64, block_rows: int | None = None, progress: bool = False,
                  desc: str = "") -> RelRepMatrix:
    """The matrix of one member from its input embedding ``weight`` [V, d] (any dtype/device;
    computed in float32 on that device, results on the cpu). Sparse rows keep the top-k
    anchors in descending order of value."""
    V = weight.shape[0]
    ea = _normalized(weight[anchor_ids.to(weight.device)])
    A = ea.shape[0]
    block = block_rows or max(16, min(V, BLOCK_ELEMENTS // max(A, 1)))
    k = None if topk is None else min(topk, A)
    if k is None:
        dense = torch.empty(V, A, dtype=torch.float32)
    else:
        idx_out = torch.empty(V, k, dtype=torch.long)
        val_out = torch.empty(V, k, dtype=torch.float32)
    eaT, factor = ea.T.contiguous(), anchor_factor(ea)
    scratch = torch.empty(min(block, V), A, dtype=torch.float32, device=ea.device)
    buf = torch.empty_like(scratch)
    for start in tqdm(range(0, V, block), desc=desc, disable=not progress, unit="blk", leave=False):
        stop = min(start + block, V)
        n = stop - start
        probs = relrep_rows(weight[start:stop].float(), eaT, temperature, factor, buf[:n], scratch[:n])
        if k is None:
            dense[start:stop] = probs.cpu()
        elif probs.device.type == "cpu":
            torch.topk(probs, k, dim=-1, out=(val_out[start:stop], idx_out[start:stop]))
        else:
            val, idx = probs.topk(k, dim=-1)
            idx_out[start:stop], val_out[start:stop] = idx.cpu(), val.cpu()
    if k is None:
        return RelRepMatrix(A, dense=dense)
    return RelRepMatrix(A, topk_idx=idx_out, topk_val=val_out)


def _fixed_anchors(path, members: list[str], surfaces: dict, rows: dict[str, int]) -> Anchors:
    anchors = Anchors.load(path)
    missing = [m for m in members if m not in anchors.ids]
    if missing:
        raise AnchorError(f"{path}: has no ids for member(s) {', '.join(missing)} (it holds "
                          f"{', '.join(anchors.members)}); build it for these members or drop `anchors`")
    for m in members:
        for i, (tid, surf) in enumerate(zip(anchors.ids[m], anchors.surfaces)):
            have = surfaces[m][tid] if 0 <= tid < min(rows[m], len(surfaces[m])) else None
            if have != surf:
                raise AnchorError(f"{path}: anchor {i} ({surf!r}) is id {tid} in member {m!r}, whose token "
                                  f"there has surface {have!r}; the file was made for another tokenizer; "
                                  f"rebuild it or drop `anchors`")
    return Anchors(list(members), {m: anchors.ids[m] for m in members}, anchors.surfaces)


def build_params(temperature: float, topk: int | None, num_anchors: int | None, anchors,
                 value_dtype: str) -> dict:
    """Everything besides the members that decides the matrices' content (for staleness)."""
    return {"format": store.FORMAT_VERSION, "temperature": float(temperature), "topk": topk,
            "num_anchors": num_anchors, "value_dtype": value_dtype if topk is not None else "float32",
            "anchors_file": None if anchors is None else store.file_digest(anchors)}


def build_matrices(members: dict, out_dir: str | Path, temperature: float = 100.0,
                   topk: int | None = 64, anchors: str | Path | None = None, min_anchors: int = 100,
                   num_anchors: int | None = None, block_rows: int | None = None,
                   progress: bool = True, value_dtype: str = "float16", procs=None,
                   device: str | None = None) -> dict[str, MemberStats]:
    """Compute anchors and every member's matrix; write ``out_dir/<member>.safetensors``,
    ``anchors.json`` and, last, ``meta.json``.

    members: name -> HFLanguageModel (anything with ``.model`` and ``.tokenizer``).
    topk: anchors kept per row (sparse, the default); None = dense float32 [V, A].
    anchors: a fixed anchors.json instead of computing the common tokens.
    num_anchors: keep the n anchors most consistent across members (None = all).
    value_dtype: on-disk dtype of sparse values, "float16" (rounded down, so rows never exceed
    mass 1) or "float32".
    procs: the processes of a data-parallel command (`distributed.Processes`): each computes and
    writes the matrices of its share of the members; rank 0 writes anchors.json and meta.json.
    device: where the matrices are computed (default: each embedding's own device).
    """
    from dln_ens.distributed import Processes
    from dln_ens.distributed.shard import shard_owners
    procs = procs or Processes()
    if not members:
        raise ValueError("build_matrices: no members")
    check_number("temperature", temperature, gt=0)
    check_number("topk", topk, ge=1, integer=True, optional=True)
    check_number("min_anchors", min_anchors, ge=1, integer=True)
    check_number("num_anchors", num_anchors, ge=1, integer=True, optional=True)
    check_number("block_rows", block_rows, ge=1, integer=True, optional=True)
    if value_dtype not in ("float16", "float32"):
        raise ValueError(f"build_matrices: value_dtype must be 'float16' or 'float32', not {value_dtype!r}")
    out_dir = Path(out_dir)
    names = list(members)
    parts = {m: unpack_member(m, members[m]) for m in names}
    weights = {m: w for m, (w, _) in parts.items()}
    surfaces = {m: token_surfaces(tok) for m, (_, tok) in parts.items()}
    rows = {m: w.shape[0] for m, w in weights.items()}
    if anchors is not None:
        anc = _fixed_anchors(anchors, names, surfaces, rows)
        if len(anc) < max(1, min_anchors):
            raise AnchorError(f"{anchors}: {len(anc)} anchors, fewer than min_anchors={min_anchors}")
    else:
        anc = common_anchors(surfaces, min_anchors=max(1, min_anchors), num_rows=rows)
    if num_anchors is not None:
        anc = most_consistent(anc, weights, num_anchors)
    params = build_params(temperature, topk, num_anchors, anchors, value_dtype)

    # from here on the directory does not load until meta.json
    previous = procs.gather_or_raise(lambda: store.begin_build(out_dir, names) if procs.is_main else None,
                                     f"clear {out_dir}")[0]
    keys = {m: (weights[m].data_ptr(), tuple(weights[m].shape), tuple(anc.ids[m])) for m in names}
    firsts = {k: i for i, k in reversed(list(enumerate(keys.values())))}
    owners = shard_owners([firsts[keys[m]] for m in names], procs.world_size)   # a shared embedding once

    def build_share() -> dict[str, MemberStats]:
        stats = {}
        shared: dict[tuple, RelRepMatrix] = {}   # a MoD member shares its base's embedding
        for m, owner in zip(names, owners):
            if owner != procs.rank:
                continue
            t0 = time.perf_counter()
            if keys[m] not in shared:
                if topk is None:
                    shared.clear()   # dense matrices are large: keep one at a time
                w = weights[m] if device is None else weights[m].to(device)
                shared[keys[m]] = member_matrix(w, anc.id_tensor(m), temperature, topk, block_rows,
                                                progress, desc=f"matrix {m}")
            R = shared[keys[m]]
            seconds = time.perf_counter() - t0
            nbytes = store.save_member(out_dir, m, R, value_dtype)
            stats[m] = MemberStats(m, R.num_rows, len(anc), R.k, nbytes, seconds)
        return stats

    stats = {}
    for share in procs.gather_or_raise(build_share, f"build its matrices in {out_dir}"):
        stats.update(share)
    stats = {m: stats[m] for m in names}

    def finish() -> None:
        if procs.is_main:
            fingerprints = {m: store.fingerprint(weights[m], surfaces[m]) for m in names}
            store.save_anchors(out_dir, anc)
            store.finish_build(out_dir, params, fingerprints, len(anc),
                               {m: round(s.seconds, 3) for m, s in stats.items()}, previous)
    procs.gather_or_raise(finish, f"finish {out_dir}")   # every process returns once it loads
    return stats
