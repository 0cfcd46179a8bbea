"""Member weights, orthogonal to the fusion method: every method fuses with ``row_weights`` [B, N].

- ``uniform``: 1/N.  ``fixed``: the configured ``weights`` (normalised).
- ``entropy`` (per step, confidence): w_m ∝ prior_m · softmax_m(-H_m / T), H_m the entropy of
  member m's next-token distribution divided by log |V_m| (so vocabularies of different sizes
  compare; 0 = certain, 1 = uniform).
- ``perplexity`` (per prompt, PackLLM-sim, Mavromatis et al. 2024): w_m ∝ prior_m ·
  softmax_m(-NLL_m / T), NLL_m the member's negative log-likelihood of the prompt *per byte*
  (members tokenise differently, so per-token perplexities do not compare); computed once per
  prompt from the prefill.
The prior is the configured ``weights`` (uniform when none); T = ``temperature``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dln_ens.fusion.base import SettingsError

SCHEMES = ("uniform", "fixed", "entropy", "perplexity")


def combine(prior: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, N] weights ∝ prior · softmax(scores) per row, normalised."""
    w = prior[None, :] * torch.softmax(scores, -1)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B] entropy of softmax(logits) over log V (in [0, 1])."""
    logp = torch.log_softmax(logits.float(), -1)
    h = -(logp.exp() * logp).nan_to_num().sum(-1)
    return h / math.log(max(logits.shape[-1], 2))


@dataclass(frozen=True)
class Weighting:
    scheme: str = "uniform"
    temperature: float = 0.1

    def check(self, has_weights: bool) -> None:
        if self.scheme not in SCHEMES:
            raise SettingsError(f"weighting must be one of {', '.join(SCHEMES)} (or null: 'fixed' when weights "
                                f"are given, else 'uniform'), got {self.scheme!r}", "weighting")
        if self.scheme == "fixed" and not has_weights:
            raise SettingsError("weighting 'fixed' needs \"weights\": {member: weight, ...}", "weighting")
        if self.scheme == "uniform" and has_weights:
            raise SettingsError("weighting 'uniform' ignores the given weights; drop \"weights\" or use "
                                "weighting 'fixed'", "weighting")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise SettingsError(f"weighting_temperature must be a finite number > 0, got {t!r}",
                                "weighting_temperature")

    @property
    def needs_prompt_nll(self) -> bool:
        return self.scheme == "perplexity"

    @property
    def dynamic(self) -> bool:
        return self.scheme in ("entropy", "perplexity")

    def row_weights(self, names: list[str], prior: list[float], logits: dict[str, torch.Tensor], step,
                    device) -> torch.Tensor:
        B = next(iter(logits.values())).shape[0]
        p = torch.tensor(prior, dtype=torch.float32, device=device)
        if self.scheme == "entropy":
            h = torch.stack([normalised_entropy(logits[n].to(device)) for n in names], -1)
            return combine(p, -h / self.temperature)
        if self.scheme == "perplexity":
            if step is None or step.prompt_nll is None:
                raise ValueError("weighting 'perplexity' needs the members' prompt NLL (a StepContext)")
            nll = torch.stack([step.prompt_nll[n].to(device, torch.float32) for n in names], -1)
            return combine(p, -nll / self.temperature)
        return p[None, :].expand(B, -1)

    def describe(self) -> dict:
        out = {"weighting": self.scheme}
        if self.dynamic:
            out["weighting_temperature"] = self.temperature
        return out
