"""``main``: the main member alone (the ablation baseline); no other member is run."""
from __future__ import annotations

import torch

from dln_ens.fusion.base import Fusion


class MainFusion(Fusion):
    name = "main"

    def active(self) -> list[str]:
        return [self.main]

    def __call__(self, logits, step=None):
        return torch.log_softmax(logits[self.main].to(self.device, torch.float32), -1)
