"""The relative-representation matrix of one member: row v is token v's distribution over the
A anchors, ``R = softmax(T * l2normalize_rows(cos(E, E_A)))`` (DeePEn).

Two forms: dense ([V, A] float32), or sparse: per row the top-k anchors with the dense values
there, plus the row's leftover mass spread uniformly over all A anchors, so every row still
sums to 1 and ``p @ R`` stays a distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RelRepMatrix:
    num_anchors: int
    dense: torch.Tensor | None = None      # [V, A] float32, each row sums to 1
    topk_idx: torch.Tensor | None = None   # [V, k] int64 anchor indices (sparse format)
    topk_val: torch.Tensor | None = None   # [V, k] float32, the dense row's values there, descending
    residual: torch.Tensor | None = None   # [V] float32 = 1 - topk_val.sum(-1), spread over all A

    def __post_init__(self):
        if (self.dense is None) == (self.topk_idx is None):
            raise ValueError("RelRepMatrix: give either `dense` or `topk_idx`/`topk_val`, not both or neither")
        if self.topk_idx is not None and self.residual is None:
            self.residual = residual_mass(self.topk_val)

    @property
    def is_sparse(self) -> bool:
        return self.dense is None

    @property
    def num_rows(self) -> int:
        return (self.dense if self.dense is not None else self.topk_idx).shape[0]

    @property
    def k(self) -> int | None:
        return None if self.dense is not None else self.topk_idx.shape[1]

    def to_dense(self) -> torch.Tensor:
        """[V, A] float32 (materialises V x A: for tests and small vocabularies)."""
        if self.dense is not None:
            return self.dense
        return sparse_to_dense(self.topk_idx, self.topk_val, self.residual, self.num_anchors)

    def truncate(self, k: int) -> "RelRepMatrix":
        """The same matrix with only its k largest entries per row (columns are stored in
        descending order, so this is a slice; the dropped mass joins the residual)."""
        if self.dense is not None:
            return dense_to_sparse(self.dense, k)
        return RelRepMatrix(self.num_anchors, topk_idx=self.topk_idx[:, :k], topk_val=self.topk_val[:, :k])

    def to(self, device) -> "RelRepMatrix":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RelRepMatrix(self.num_anchors, move(self.dense), move(self.topk_idx),
                            move(self.topk_val), move(self.residual))


def residual_mass(topk_val: torch.Tensor) -> torch.Tensor:
    """The mass a sparse row leaves outside its top-k (never negative)."""
    return (1.0 - topk_val.float().sum(-1)).clamp_min(0.0)


def sparse_to_dense(topk_idx: torch.Tensor, topk_val: torch.Tensor, residual: torch.Tensor,
                    num_anchors: int) -> torch.Tensor:
    out = (residual.float() / num_anchors).unsqueeze(-1).expand(*topk_idx.shape[:-1], num_anchors).clone()
    return out.scatter_add_(-1, topk_idx.long(), topk_val.float())


def dense_to_sparse(dense: torch.Tensor, k: int) -> RelRepMatrix:
    """Keep each row's k largest entries; the rest of its mass goes to the uniform residual."""
    val, idx = dense.topk(min(k, dense.shape[1]), dim=-1)
    return RelRepMatrix(dense.shape[1], topk_idx=idx, topk_val=val.float())
