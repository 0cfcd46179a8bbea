"""DeePEn's published step, written out as its reference code does it, for ONE sequence: the
independent computation the fusion and the ensemble are tested against (dense R, torch AdamW
with default weight decay, KLDivLoss() with reduction 'mean', CosineAnnealingLR(T_max=10,
eta_min=lr/4))."""
import torch
from torch import nn
from torch.optim import lr_scheduler


def reference_inverse(z, q, R, lr, steps):
    """The inverse search from main logits ``z`` [V] towards the anchor distribution ``q`` [A]."""
    z = z.detach().clone().float()[None].requires_grad_(True)
    if lr == 0:
        return torch.log_softmax(z.detach()[0], -1)
    criterion = nn.KLDivLoss()
    opt = torch.optim.AdamW(params=[z], lr=lr, betas=(0.9, 0.999))
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=lr / 4)
    for _ in range(steps):
        r = torch.mm(nn.functional.softmax(z, dim=-1).float(), R)
        loss = criterion(torch.log(r), q[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.log_softmax(z.detach()[0], -1)


def reference_fuse(logits, dense, main, weights, lr=0.15, steps=5):
    """One fused step: q = sum_m w_m softmax(logits_m) @ R_m, then the inverse search."""
    q = sum(w * (torch.softmax(logits[n], -1) @ dense[n]) for n, w in weights.items())
    return reference_inverse(logits[main], q, dense[main], lr, steps)
