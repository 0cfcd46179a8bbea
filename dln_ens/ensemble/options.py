"""How an ensemble fuses and runs, defined once: the Python API (`EnsembleLanguageModel`) and
the config's ``ensemble`` backend (`backend_types.ensemble.EnsembleBackend`, these options plus
members, main member, matrices and their build settings) both take exactly these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

SCORE_MODES = ("fast", "exact")   # `EnsembleLanguageModel.score`


@dataclass(kw_only=True)
class EnsembleOptions:
    method: str = "deepen"                  # a name in `fusion.registry.FUSION_METHODS`
    fusion: dict = field(default_factory=dict)      # the method's own settings (e.g. lr, steps)
    weights: Union[dict[str, float], None] = None   # None = uniform
    score_mode: Literal["fast", "exact"] = "fast"
    compute_device: str = "cpu"             # where the fusion runs
    batch_size: Union[int, None] = None     # None = the main member's
    window: int = 4                         # re-tokenisation tail in tokens (`ensemble.align`)
    verify_alignment: bool = False          # also re-tokenise everything and compare (slow; tests)

    def check(self, members: list[str]) -> None:
        """Refuse what would fail later or silently change the result (`ValueError`s naming the
        setting); the fusion method checks its own settings."""
        from dln_ens.fusion.base import normalise_weights
        from dln_ens.fusion.registry import fusion_settings
        from dln_ens.fusion.base import SettingsError
        if self.score_mode not in SCORE_MODES:
            raise SettingsError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}", "score_mode")
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingsError(f"batch_size must be at least 1 (or null: the main member's), got {self.batch_size}",
                                "batch_size")
        if self.window < 1:
            raise SettingsError(f"window must be at least 1, got {self.window}", "window")
        normalise_weights(list(members), self.weights)
        fusion_settings(self.method, self.fusion, len(members))
