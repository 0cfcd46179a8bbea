"""DeePEn's inverse map: from the aggregated anchor distribution q back to the main vocabulary.

The published procedure (OrangeInSouth/DeePEn, src/logits_processor/
based_on_probaility_transfer_logits_processor.py), reproduced step for step:

    z = main logits (float32 copy, requires_grad)
    optimizer = AdamW([z], lr, betas=(0.9, 0.999))          # torch default weight_decay 0.01
    scheduler = CosineAnnealingLR(optimizer, T_max=10, eta_min=lr / 4)
    repeat `steps` times:
        loss = KLDivLoss()(log(softmax(z) @ R_main), q)     # reduction 'mean' over all elements
        zero_grad; backward; optimizer.step(); scheduler.step()
    the fused distribution is softmax(z) after the last step (the processor returns z itself).

Batching. KLDivLoss's 'mean' divides by B x A, so a batch would shrink every row's gradient by
B, and Adam's eps (1e-8) is not negligible against those gradients (a token's gradient is about
p_token / A): the result would depend on the batch size. Here the loss is the per-row mean over
the A anchors, summed over rows: row b's gradient is exactly the one-sequence gradient, and
AdamW is elementwise, so each row follows exactly its one-sequence trajectory.

Support (speed, optional). Tokens far in the tail get gradients ~p/A, below Adam's eps, and
barely move; their only real change is AdamW's weight decay, a known scale factor. With a
`Support`, only its tokens are optimised; the tail's logits follow the weight decay exactly
(z <- z (1 - lr_t wd) per step), enter the softmax normaliser exactly, and their relative
representation is the uniform one (as in `to_relative`). ``support=None`` is the exact search.
"""
from __future__ import annotations

import math

import torch

from dln_ens.fusion.relative import (Support, SupportRows, relative_from_support, relative_grad, support_rows,
                                    to_relative)
from dln_ens.relrep.matrix import RelRepMatrix

BETAS = (0.9, 0.999)
EPS = 1e-8            # torch.optim.AdamW's default
WEIGHT_DECAY = 0.01   # torch.optim.AdamW's default; the reference does not set it
T_MAX = 10            # the reference's CosineAnnealingLR(T_max=10, eta_min=lr / 4)


def cosine_lr(lr: float, t: int) -> float:
    """CosineAnnealingLR(T_max=10, eta_min=lr / 4)'s learning rate at step t (closed form)."""
    eta_min = lr / 4
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t / T_MAX)) / 2


def decay_scales(lr: float, steps: int) -> list[float]:
    """The tail's accumulated weight decay before each step and after the last ([steps + 1])."""
    out = [1.0]
    for t in range(steps):
        out.append(out[-1] * (1.0 - cosine_lr(lr, t) * WEIGHT_DECAY))
    return out


SERIES_TOL = 1e-9   # relative error allowed in a tail's sums by `tail_logsumexp`'s power series
SERIES_TERMS = 8    # ... and the most terms it takes (more: one exp per scale instead)


def series_terms(delta: float, n: int) -> int | None:
    """The fewest terms K with which ``sum_k (delta x)^k / k!`` (k <= K) gives ``sum_i exp((1 -
    delta) x_i)`` over n entries x_i <= 0 to an error at most SERIES_TOL times max(1, the sum),
    or None (more than SERIES_TERMS). The error of entry i is at most
    exp(x_i) |delta x_i|^(K+1) exp(|delta x_i|) / (K+1)!, largest at |x_i| = (K+1) / (1 - delta):
    n times that bounds the error (a relative one where the sum is >= 1, e.g. its largest entry
    is 0)."""
    if not 0 <= delta < 1:
        return None
    for k in range(SERIES_TERMS + 1):
        u = delta * (k + 1) / ((1 - delta) * math.e)
        if n * u ** (k + 1) / math.factorial(k + 1) <= SERIES_TOL:
            return k
    return None


def tail_logsumexp(tail: torch.Tensor, scales: list[float], elements: int = 1 << 17,
                   exp_tail: torch.Tensor | None = None) -> torch.Tensor:
    """[B, len(scales)]: ``log sum_i exp(s * tail[b, i])`` for each scale s in (0, 1], in one pass
    over the tail (entries <= 0, -inf for those left out; a row all -inf gives -inf), on column
    chunks of about ``elements`` entries that stay in cache. ``exp_tail``: ``tail.exp()``, if the
    caller has it (it is overwritten; e.g. a softmax's probabilities, the support's set to 0).

    The decay scales of a search are close to 1 (0.993 after DeePEn's 5 steps), so
    ``exp(s x) = exp(x) exp((s - 1) x)`` and the second factor's power series give every scale
    from one exp and K moments ``sum_i exp(x_i) x_i^k`` (all terms >= 0, no cancellation; K from
    `series_terms`, 5 for a 32k vocabulary): on one core, 4.6 against 9.0 ms for 64 rows of 32k
    and 0.51 against 1.34 ms for 8 rows, with one exp per scale. A sum's error is at most
    SERIES_TOL times max(1, the sum) (each exp(x_i) <= 1). Scales further from 1, or above it,
    take one exp per scale."""
    B, V = tail.shape
    low = min(scales)
    K = series_terms(1.0 - low, V) if 0 < low and max(scales) <= 1 else None
    if K is None:
        s = torch.tensor(scales, dtype=tail.dtype, device=tail.device)[:, None]
        width = max(256, elements // max(B * len(scales), 1))
        acc = tail.new_zeros((B, len(scales)))
        for lo in range(0, V, width):
            acc += (tail[:, None, lo:lo + width] * s).exp_().sum(-1)
        return acc.log_()
    width = max(256, elements // max(B, 1))
    moments = tail.new_zeros((B, K + 1))
    for lo in range(0, V, width):
        x = tail[:, lo:lo + width]
        t = x.exp() if exp_tail is None else exp_tail[:, lo:lo + width]
        moments[:, 0] += t.sum(-1)
        x = x.clamp_min(-1e4)   # exp(x) is 0 there: keeps -inf * 0 out
        for k in range(1, K + 1):
            moments[:, k] += t.mul_(x).sum(-1)
    coef = torch.tensor([[(s - 1.0) ** k / math.factorial(k) for s in scales] for k in range(K + 1)],
                        dtype=tail.dtype, device=tail.device)
    return (moments @ coef).log_()


def deepen_inverse(z: torch.Tensor, q: torch.Tensor, mat: RelRepMatrix, lr: float = 0.15, steps: int = 5,
                   support: Support | None = None, support_matrix_rows: SupportRows | None = None,
                   targets: torch.Tensor | None = None, r0: torch.Tensor | None = None,
                   probs: torch.Tensor | None = None) -> torch.Tensor:
    """Fused log-probabilities [B, V] over the main vocabulary from main logits z [B, V] and the
    target anchor distribution q [B, A]. ``lr == 0`` or ``steps == 0``: the main member alone.
    With ``targets`` [B] (token ids): only row b's log-probability of ``targets[b]``, [B]
    (what a teacher-forced score reads; with a support, no [B, V] result is formed). ``r0``:
    the relative representation of softmax(z) over the same support, if already computed (the
    first step's r, equal to float rounding). ``probs``: softmax(z), if the caller has it (with
    a support, it is overwritten: the tail's normaliser is computed from it).

    The gradient is written out (no autograd graph, no optimizer object: a decoding step is
    small, their overhead is not): with L = sum_b mean_a q log(q / r), r = p @ R,
      dL/dr = -q / (A r),  dL/dp = R @ dL/dr,  dL/dz = p * (dL/dp - <p, dL/dp>)
    (the tail's mass t enters <p, dL/dp> with dL/dt = sum_a dL/dr_a / A). tests/test_fusion.py
    checks it against torch's AdamW + KLDivLoss + CosineAnnealingLR on the reference loop."""
    z0 = z.detach().float()
    if lr == 0 or steps == 0:
        return _read(torch.log_softmax(z0, -1), targets)
    if z0.shape[-1] != mat.num_rows:
        raise ValueError(f"main logits width {z0.shape[-1]} != main matrix rows {mat.num_rows}")
    q = q.detach().float()
    r0 = None if r0 is None else r0.detach().float()
    A = mat.num_anchors
    scales = decay_scales(lr, steps)
    if support is None:
        param = z0.clone()
    else:
        param = z0.gather(1, support.idx)
        rows, cols = support.valid.nonzero(as_tuple=True)
        ids = support.idx[rows, cols]   # the support's token ids, row by row
        # the tail's logsumexp at every step's weight decay, in one pass over the log-probs
        # x = z0 - log_norm with the support left out: logsumexp(scale * tail) = scale * log_norm
        # + log(sum(exp(scale * x))); the softmax's probabilities are exp(x) (no exp of the row)
        p = torch.softmax(z0, -1) if probs is None else probs
        top = support.idx[:, :1]   # the most probable token: its log-prob is accurate
        log_norm = z0.gather(1, top) - p.gather(1, top).log()
        x = z0 - log_norm
        x[rows, ids] = float("-inf")
        p[rows, ids] = 0.0
        tail_lse = tail_logsumexp(x, scales if targets is not None else scales[:-1], exp_tail=p)
        del x, p
        mat_rows = support_matrix_rows or support_rows(support, mat)   # the same rows at every step
        buf = q.new_empty((q.shape[0], A))
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    for t in range(steps):
        if support is None:
            p = torch.softmax(param, -1)
            r = r0 if t == 0 and r0 is not None else to_relative(p, mat)
            g_p = relative_grad(-q / (A * r), mat)
            grad = p * (g_p - (p * g_p).sum(-1, keepdim=True))
        else:
            zs = param.masked_fill(~support.valid, float("-inf"))
            lse_tail = tail_lse[:, t:t + 1] + scales[t] * log_norm
            lse = torch.logaddexp(torch.logsumexp(zs, -1, keepdim=True), lse_tail)
            p, p_tail = torch.exp(zs - lse), torch.exp(lse_tail - lse)
            r = r0 if t == 0 and r0 is not None else relative_from_support(p, support, mat, tail=p_tail[:, 0],
                                                                          rows=mat_rows, out=buf)
            g_r = torch.div(q, r, out=buf).mul_(-1.0 / A)   # -q / (A r)
            g_tail = g_r.sum(-1, keepdim=True) / A
            g_p = relative_grad(g_r, mat, support, rows=mat_rows, uniform=g_tail)
            grad = p * (g_p - (p * g_p).sum(-1, keepdim=True) - p_tail * g_tail)
        # torch.optim.AdamW's update, step t + 1
        lr_t = cosine_lr(lr, t)
        param.mul_(1 - lr_t * WEIGHT_DECAY)
        m.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
        bc1, bc2 = 1 - BETAS[0] ** (t + 1), 1 - BETAS[1] ** (t + 1)
        param.addcdiv_(m, (v.sqrt() / math.sqrt(bc2)).add_(EPS), value=-lr_t / bc1)
    if support is None:
        return _read(torch.log_softmax(param, -1), targets)
    scale = scales[steps]
    if targets is not None:   # log softmax of [z0 * scale off the support, param on it] at the targets
        zs = param.masked_fill(~support.valid, float("-inf"))
        lse = torch.logaddexp(torch.logsumexp(zs, -1), tail_lse[:, steps] + scale * log_norm[:, 0])
        hit = (support.idx == targets[:, None]) & support.valid
        inside = param.gather(1, hit.to(torch.uint8).argmax(-1, keepdim=True))[:, 0]
        outside = z0.gather(1, targets[:, None])[:, 0] * scale
        return torch.where(hit.any(-1), inside, outside) - lse
    out = z0 * scale
    out[rows, ids] = param[rows, cols]
    return torch.log_softmax(out, -1)


def _read(logprobs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    return logprobs if targets is None else logprobs.gather(1, targets[:, None])[:, 0]
