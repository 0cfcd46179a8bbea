"""Next-token distributions into the shared anchor space and back (DeePEn steps 2 and 3's map).

``r = p @ R``: a member's distribution over its vocabulary becomes a distribution over the A
anchors. R is a `RelRepMatrix`, dense ([V, A]) or sparse (per row the top-k anchors plus a
leftover mass spread uniformly over all A anchors).

Speed: a full sparse product reads V x k entries (2M for a 32k vocabulary at k = 64), far more
than a decoding step of a small model costs. Next-token distributions put nearly all their mass
on few tokens, so the product can be restricted to a *support*: per row the smallest set of
most probable tokens holding at least ``1 - tail_mass`` of the mass, capped at ``max_support``
tokens (a flat row then leaves more mass out). The tail's relative representation is taken as
uniform over the anchors (its exact value needs the whole matrix), so r moves by at most the
left-out mass in L1. ``support=None`` is the exact product over the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dln_ens.relrep.matrix import RelRepMatrix

BLOCK = 8192   # vocabulary rows per step of a full sparse product (bounds its [B, block, k] temporaries)


@dataclass
class Support:
    """Per row, the token ids that carry the mass (padded to a common width)."""
    idx: torch.Tensor    # [B, S] int64 token ids, most probable first
    valid: torch.Tensor  # [B, S] bool, False on padding columns


def top_mass_support(probs: torch.Tensor, tail_mass: float, max_support: int) -> Support:
    """The smallest top set of each row with mass >= 1 - tail_mass (at most ``max_support`` ids;
    a row needing more keeps its ``max_support`` most probable ids), from one top-k pass (a
    first try with fewer ids saves little at one row and costs a second pass whenever any row
    of a batch needs more)."""
    k = min(probs.shape[-1], max_support)
    vals, idx = top_k(probs, k)
    need = ((vals.cumsum(-1) < 1.0 - tail_mass).sum(-1) + 1).clamp(max=k)   # ids needed per row
    width = int(need.max())
    valid = torch.arange(width, device=probs.device) < need[:, None]
    return Support(idx[:, :width], valid)


GROUP = 8   # `top_k`: columns per group whose maximum stands for them in its first selection


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)`` (values descending, their indices) of a 2-D float tensor. On the
    CPU, for rows at least 16 k wide: numpy's introselect (argpartition) over a reduced set.
    Column j of the first GROUP * W (W = V // GROUP) joins the group j mod W; the k groups with
    the largest maxima hold every one of the k largest values (a group holding one of them has
    its maximum >= the k-th largest, and at most k groups do; with ties the kept groups still
    hold enough of the tied value), so the k largest are selected from those k * GROUP columns
    and the last V - GROUP * W, then sorted. The same values as torch's top-k; on one core, for
    8 and 64 rows of 32k, 50k and 65k ids with k = 256, 2.0-3.6x faster than torch's and 1.3-1.9x
    faster than introselect over whole rows, and about torch's time at one row (for finite
    inputs: which index of two equal values is kept may differ, and a NaN is not placed first
    as torch places it)."""
    B, V = x.shape
    if x.device.type != "cpu" or V < 16 * k or x.requires_grad or x.dtype not in (torch.float32, torch.float64):
        return x.topk(k, dim=-1)
    a = x.numpy()
    W = V // GROUP
    groups = _largest(a[:, :GROUP * W].reshape(B, GROUP, W).max(1), k)             # [B, k]
    cols = (groups[:, :, None] + W * np.arange(GROUP)).reshape(B, -1)               # [B, k * GROUP]
    if V > GROUP * W:
        cols = np.concatenate([cols, np.broadcast_to(np.arange(GROUP * W, V), (B, V - GROUP * W))], 1)
    cand = np.take_along_axis(a, cols, -1)
    part = _largest(cand, k)
    vals = np.take_along_axis(cand, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(np.take_along_axis(cols, part, -1), order, -1)
    return torch.from_numpy(np.take_along_axis(vals, order, -1)), torch.from_numpy(idx)


def _largest(a: np.ndarray, k: int) -> np.ndarray:
    """The column indices of each row's k largest entries, in no order."""
    return np.argpartition(a, a.shape[-1] - k, axis=-1)[:, a.shape[-1] - k:]


@dataclass
class SupportRows:
    """The matrix rows of a support's tokens, gathered once for the steps that reuse them."""
    cols: torch.Tensor | None = None       # sparse: [B, S*k] anchor indices
    vals: torch.Tensor | None = None       # sparse: [B, S, k]
    residual: torch.Tensor | None = None   # sparse: [B, S]
    dense: torch.Tensor | None = None      # dense: [B, S, A]
    whole: bool = False                    # dense: products with the whole matrix instead (`support_rows`)


WHOLE_MATRIX = 8          # a dense matrix with at most this many rows per support token is used whole
GATHERED_ROWS = 1 << 22   # ... and so is one whose support rows would take more entries ([B, S, A]) than this


def support_rows(support: Support, mat: RelRepMatrix) -> SupportRows:
    idx = support.idx
    if not mat.is_sparse:
        # one matmul beats gathering [B, S, A] for a small matrix, or for many rows (a scored
        # block: `python -m dln_ens.bench fusion`, 64 rows of 4000 x 1000)
        if mat.num_rows <= WHOLE_MATRIX * idx.shape[1] or idx.numel() * mat.num_anchors > GATHERED_ROWS:
            return SupportRows(whole=True)
        return SupportRows(dense=mat.dense[idx])
    flat = idx.reshape(-1)   # index_select: several times faster than indexing by an [B, S] tensor
    return SupportRows(cols=mat.topk_idx.index_select(0, flat).view(idx.shape[0], -1),
                       vals=mat.topk_val.index_select(0, flat).view(*idx.shape, -1),
                       residual=mat.residual.index_select(0, flat).view(idx.shape))


def relative_from_support(p_s: torch.Tensor, support: Support, mat: RelRepMatrix,
                          tail: torch.Tensor | None = None, rows: SupportRows | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, A]: ``sum_s p_s[b, s] R[idx[b, s]]`` plus ``tail[b]`` spread uniformly over anchors
    (for a sparse matrix written into ``out`` [B, A] if given: a loop reuses one buffer)."""
    rows = rows or support_rows(support, mat)
    B = p_s.shape[0]
    A = mat.num_anchors
    p_s = p_s * support.valid
    if rows.whole:
        p = torch.zeros((B, mat.num_rows), dtype=p_s.dtype, device=p_s.device).scatter_(1, support.idx, p_s)
        r = p @ mat.dense
        return r if tail is None else r + (tail / A).unsqueeze(-1)
    if rows.dense is not None:
        r = torch.einsum("bs,bsa->ba", p_s, rows.dense)
        return r if tail is None else r + (tail / A).unsqueeze(-1)
    uniform = (p_s * rows.residual).sum(-1)                  # [B]
    if tail is not None:
        uniform = uniform + tail
    spread = (uniform / A).unsqueeze(-1).expand(B, A)
    if out is None:
        return spread.scatter_add(1, rows.cols, (p_s.unsqueeze(-1) * rows.vals).reshape(B, -1))
    return out.copy_(spread).scatter_add_(1, rows.cols, (p_s.unsqueeze(-1) * rows.vals).reshape(B, -1))


def to_relative(probs: torch.Tensor, mat: RelRepMatrix, support: Support | None = None,
                rows: SupportRows | None = None) -> torch.Tensor:
    """[B, V] probabilities -> [B, A] relative representation. With a support, the mass outside
    it is spread uniformly (see the module note); without, the exact product. ``rows``: the
    support's matrix rows, if already gathered."""
    if probs.shape[-1] != mat.num_rows:
        raise ValueError(f"distribution width {probs.shape[-1]} != matrix rows {mat.num_rows}: the "
                         f"matrix was built for another model; rebuild it (`sh sh/mat.sh`)")
    if support is None:
        if not mat.is_sparse:
            return probs @ mat.dense
        return _sparse_full(probs, mat)
    p_s = probs.gather(1, support.idx) * support.valid
    return relative_from_support(p_s, support, mat, tail=(1.0 - p_s.sum(-1)).clamp_min(0.0), rows=rows)


def _sparse_full(probs: torch.Tensor, mat: RelRepMatrix, block: int = BLOCK) -> torch.Tensor:
    """Exact ``probs @ R`` for a sparse R, in row blocks of the vocabulary to bound memory."""
    B, V = probs.shape
    out = ((probs @ mat.residual) / mat.num_anchors).unsqueeze(-1).expand(B, mat.num_anchors).clone()
    for lo in range(0, V, block):
        hi = min(lo + block, V)
        vals = (probs[:, lo:hi, None] * mat.topk_val[lo:hi]).reshape(B, -1)
        cols = mat.topk_idx[lo:hi].reshape(1, -1).expand(B, -1)
        out.scatter_add_(1, cols, vals)
    return out


def relative_grad(g_r: torch.Tensor, mat: RelRepMatrix, support: Support | None = None,
                  rows: SupportRows | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose map: ``d loss / d p = R @ g_r`` for a loss gradient g_r [B, A] in anchor
    space, over the support's tokens [B, S] (or the whole vocabulary [B, V]). ``uniform``:
    ``g_r.sum(-1, keepdim=True) / A``, if the caller has it."""
    B, A = g_r.shape
    if uniform is None:
        uniform = g_r.sum(-1, keepdim=True) / A
    if support is None:
        if not mat.is_sparse:
            return g_r @ mat.dense.T
        out = torch.empty(B, mat.num_rows, dtype=g_r.dtype, device=g_r.device)
        for lo in range(0, mat.num_rows, BLOCK):
            hi = min(lo + BLOCK, mat.num_rows)
            out[:, lo:hi] = (g_r[:, mat.topk_idx[lo:hi]] * mat.topk_val[lo:hi]).sum(-1)
        return out + mat.residual * uniform
    rows = rows or support_rows(support, mat)
    if rows.whole:
        return (g_r @ mat.dense.T).gather(1, support.idx)
    if rows.dense is not None:
        return torch.einsum("bsa,ba->bs", rows.dense, g_r)
    picked = g_r.gather(1, rows.cols).view(rows.vals.shape)
    return picked.mul_(rows.vals).sum(-1) + rows.residual * uniform


def aggregate(rels: list[torch.Tensor], weights: list) -> torch.Tensor:
    """``q = sum_m w_m r_m`` (weights already normalised to sum to 1; floats or [B, 1] per row),
    accumulated in place in one new tensor."""
    q = rels[0] * weights[0]
    for w, r in zip(weights[1:], rels[1:]):
        if isinstance(w, torch.Tensor):
            q.addcmul_(r, w)
        else:
            q.add_(r, alpha=w)
    return q
