"""Mixture-of-Depths math on plain tensors (Luo & Specia 2024, arXiv 2410.13077).

Layer j of the last k gives logits z_j = lm_head(norm_j(h_j)); a router gives weights w_j per
position; the output is sum_j w_j z_j. The paper (and DESIGN) mixes *logits*, not
probabilities: the ensemble contributes "to the final logits through learned routing weights".
Everything here is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Mistral/Qwen RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def route(router_logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Softmax over the k layers (last dim); with ``top_k`` keep the K largest weights and
    renormalise them to sum to 1 (the others are exactly zero)."""
    logits = router_logits.float()
    if top_k is None or top_k >= logits.shape[-1]:
        return logits.softmax(-1)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    # softmax over the K largest logits == the K largest softmax weights renormalised; written
    # this way, top-1 has an exactly zero router gradient (renormalising p/p leaves rounding
    # noise that Adam would blow up into random re-routing)
    idx = logits.topk(top_k, dim=-1).indices
    kept = torch.full_like(logits, float("-inf")).scatter(-1, idx, logits.gather(-1, idx))
    return kept.softmax(-1)


def uniform_weights(shape: tuple[int, ...], k: int, device=None) -> torch.Tensor:
    return torch.full((*shape, k), 1.0 / k, dtype=torch.float32, device=device)


def combine(layer_logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[..., j] * layer_logits[j]; layer_logits[j] is [..., V], weights [..., k]."""
    if len(layer_logits) != weights.shape[-1]:
        raise ValueError(f"{len(layer_logits)} layer logits but {weights.shape[-1]} routing weights")
    out = weights[..., 0, None] * layer_logits[0]
    for j in range(1, len(layer_logits)):
        out = out + weights[..., j, None] * layer_logits[j]
    return out


def distill_loss(layer_logits: list[torch.Tensor]) -> torch.Tensor:
    """sum over the earlier layers j of KL(p_final || p_j), the final layer (last entry)
    detached as teacher; averaged over positions. layer_logits[j]: [N, V]."""
    teacher = layer_logits[-1].detach().float().log_softmax(-1)
    total = teacher.new_zeros(())
    for z in layer_logits[:-1]:
        student = z.float().log_softmax(-1)
        total = total + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return total
