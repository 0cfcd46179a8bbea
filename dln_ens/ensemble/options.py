"""How an ensemble fuses and runs, defined once: the Python API (`EnsembleLanguageModel`) and
the config's ``ensemble`` backend (`backend_types.ensemble.EnsembleBackend`, these options plus
members, main member, matrices and their build settings) both take exactly these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

SCORE_MODES = ("auto", "fast", "exact")   # `EnsembleLanguageModel.score`


@dataclass(kw_only=True)
class EnsembleOptions:
    method: str = "deepen"                  # a name in `fusion.registry.FUSION_METHODS`
    fusion: dict = field(default_factory=dict)      # the method's own settings (e.g. lr, steps)
    weights: Union[dict[str, float], None] = None   # None = uniform
    # `fusion.weighting`: uniform | fixed | entropy (per step) | perplexity (per prompt); None =
    # 'fixed' when weights are given, else 'uniform'; the given weights are the prior of the dynamic ones
    weighting: Union[str, None] = None
    weighting_temperature: float = 0.1
    # score: "fast" = one pass per member over each pair (equals "exact" up to float rounding,
    # `ensemble.onepass`); "exact" = a forced decode; "auto" = fast where the method and the
    # weighting allow it (`surface` and `perplexity` need per-prefix state: exact)
    score_mode: Literal["auto", "fast", "exact"] = "auto"
    compute_device: str = "cpu"             # where the fusion runs
    batch_size: Union[int, None] = None     # None = the main member's
    window: int = 4                         # re-tokenisation tail in tokens (`ensemble.align`)
    verify_alignment: bool = False          # also re-tokenise everything and compare (slow; tests)

    def check(self, members: list[str]) -> None:
        """Refuse what would fail later or silently change the result (`ValueError`s naming the
        setting); the fusion method checks its own settings."""
        from dln_ens.fusion.base import SettingsError, normalise_weights
        from dln_ens.fusion.registry import fusion_settings, make_weighting
        if self.score_mode not in SCORE_MODES:
            raise SettingsError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}", "score_mode")
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingsError(f"batch_size must be at least 1 (or null: the main member's), got {self.batch_size}",
                                "batch_size")
        if self.window < 1:
            raise SettingsError(f"window must be at least 1, got {self.window}", "window")
        normalise_weights(list(members), self.weights)
        fusion_settings(self.method, self.fusion, len(members))
        weighting = make_weighting(self.weighting, self.weighting_temperature, self.weights)
        if self.score_mode == "fast" and not self.one_pass_possible():
            raise SettingsError(f"score_mode 'fast' runs each member once over the whole text, which leaves no "
                                f"per-prefix state for method {self.method!r} / weighting {weighting.scheme!r}; "
                                f"use score_mode 'exact' (or 'auto')", "score_mode")

    def one_pass_possible(self) -> bool:
        """Whether the method and weighting can score from one pass per member (`ensemble.onepass`)."""
        from dln_ens.fusion.registry import fusion_class, make_weighting
        weighting = make_weighting(self.weighting, self.weighting_temperature, self.weights)
        return not (fusion_class(self.method).reads_continuations or weighting.needs_prompt_nll)

    def resolved_score_mode(self) -> str:
        if self.score_mode == "auto":
            return "fast" if self.one_pass_possible() else "exact"
        return self.score_mode
