"""The one interface every fusion method implements, and what a method is given.

A method maps the members' next-token logits ``{name: [B, V_m]}`` to fused log-probabilities
``[B, V_main]`` over the main member's vocabulary (compare transformers' ``LogitsProcessor``:
one small class per idea, looked up by name in `fusion.registry`). Each method declares its own
knobs as a frozen ``Settings`` dataclass whose ``check`` refuses values that would give NaN or
silently change the method, so the config and the Python API reject the same values.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from dln_ens.checks import SettingError, check_number, check_weights
from dln_ens.relrep.matrix import RelRepMatrix

if TYPE_CHECKING:
    from dln_ens.fusion.weighting import Weighting

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class Vocab:
    """What a method may read of a member's vocabulary: each id's surface bytes and token string."""
    surfaces: list[bytes | None]
    tokens: list[str | None]


@dataclass
class FusionSetup:
    """Everything a method may need besides its settings. ``matrices`` is filled only for
    methods whose ``needs_matrices`` is true; ``vocab(name)`` computes a member's `Vocab` on demand;
    ``continuation(name, surface)`` is the member's token ids of ``surface`` as a continuation of
    running text ([] when it cannot tokenise it: `ensemble.continuation`); ``weighting`` is the
    `fusion.weighting.Weighting` that turns ``weights`` into per-row weights at each step."""
    names: list[str]
    main: str
    weights: list[float]                       # normalised, in the order of ``names``
    device: torch.device
    matrices: dict[str, RelRepMatrix] | None = None
    vocab: Callable[[str], Vocab] | None = None
    continuation: Callable[[str, bytes], list[int]] | None = None
    weighting: "Weighting | None" = None


@dataclass
class StepContext:
    """What the ensemble offers a method at one step besides the logits (rows as in the logits).

    ``score(name, rows, seqs)``: member ``name``'s summed log-probability [P] of each token-id
    list ``seqs[i]`` as the continuation of row ``rows[i]``'s current sequence, all pairs in one
    batched forward on top of that member's KV cache (`lm.decoder.DecodeState.continuation_logprobs`).
    ``prompt_nll``: per member, the prompt's negative log-likelihood per byte [B] (only when the
    weighting asks for it)."""
    score: Callable[[str, list[int], list[list[int]]], torch.Tensor]
    prompt_nll: dict[str, torch.Tensor] | None = None


class SettingsError(SettingError):
    """An ensemble or fusion setting out of range; the message names the setting (``key``) and
    the allowed values."""

    def __init__(self, msg: str, key: str | None = None):
        super().__init__(msg)
        self.key = key


def check_finite(settings, key: str, low: float | None = None, *, strict: bool = False,
                 integer: bool = False) -> None:
    """``settings.key`` must be a finite number (an integer if asked) >= low (> low if strict)."""
    try:
        check_number(key, getattr(settings, key), ge=None if strict else low, gt=low if strict else None,
                     integer=integer)
    except SettingError as e:
        raise SettingsError(str(e), key) from None


class Fusion:
    """Base class of fusion methods. Subclasses set ``name`` and ``Settings`` and implement
    ``__call__``; ``needs_matrices`` / ``needs_vocab`` say what the ensemble must load, and
    ``active`` which members' logits the method reads (the others are not run at all)."""

    name: ClassVar[str]

    @dataclass(frozen=True)
    class Settings:
        def check(self, num_members: int) -> None:
            pass

    @classmethod
    def needs_matrices(cls, settings, num_members: int) -> bool:
        return False

    @classmethod
    def needs_vocab(cls, settings, num_members: int) -> bool:
        return False

    #: the method reads `StepContext.score` (member scores of text continuations)
    reads_continuations: ClassVar[bool] = False
    #: the method needs ``FusionSetup.continuation`` (members' tokenisation of surfaces)
    tokenises_text: ClassVar[bool] = False

    def __init__(self, setup: FusionSetup, settings):
        from dln_ens.fusion.weighting import Weighting
        self.setup, self.settings = setup, settings
        self.names, self.main, self.weights, self.device = setup.names, setup.main, setup.weights, setup.device
        self.weighting = setup.weighting or Weighting()

    def needs_step(self) -> bool:
        """Whether ``__call__`` needs a `StepContext` (the ensemble builds one only then)."""
        return self.reads_continuations or self.weighting.needs_prompt_nll

    def row_weights(self, logits: dict[str, torch.Tensor], step: StepContext | None = None) -> torch.Tensor:
        """[B, N] member weights per row (rows sum to 1), in the order of ``names``."""
        return self.weighting.row_weights(self.names, self.weights, logits, step, self.device)

    def active(self) -> list[str]:
        """Members whose logits this method reads (the main member first)."""
        return [self.main] + [n for n in self.names if n != self.main]

    def __call__(self, logits: dict[str, torch.Tensor], step: StepContext | None = None) -> torch.Tensor:
        raise NotImplementedError

    def target_logprobs(self, logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """[B] fused log-probability of token ``targets[b]`` in row b (what a teacher-forced
        score reads); a method may compute it without forming the [B, V] distribution."""
        fused = torch.log_softmax(self(logits), -1)
        return fused.gather(1, targets.to(fused.device)[:, None])[:, 0]

    def describe(self) -> dict:
        """Settings as a results table shows them."""
        return {"method": self.name, **dataclasses.asdict(self.settings), **self.weighting.describe()}


def normalise_weights(names: list[str], weights: dict[str, float] | None) -> list[float]:
    """Weights in the order of ``names``, summing to 1 (None = uniform); each member needs one."""
    if weights is None:
        return [1.0 / len(names)] * len(names)
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise SettingsError(f"weights name {', '.join(unknown)}, which are not members ({', '.join(names)})",
                            "weights")
    missing = [n for n in names if n not in weights]
    if missing:
        raise SettingsError(f"no weight for member(s) {', '.join(missing)}; give every member a weight, "
                            f"or null for uniform weights", "weights")
    try:
        check_weights("weights", weights)
    except SettingError as e:
        raise SettingsError(str(e), "weights") from None
    total = sum(weights.values())
    return [float(weights[n]) / total for n in names]


def canonical_ids(surfaces: list[bytes | None], tokens: list[str | None], width: int) -> dict[bytes, int]:
    """Surface -> the id a tokenizer would use for it: a vocabulary token before a byte-fallback
    token ``<0xNN>`` with the same bytes, then the lowest id. Ids >= width (no logit) skipped."""
    out: dict[bytes, int] = {}
    for i in range(min(len(surfaces), width)):
        s = surfaces[i]
        if not s:
            continue
        j = out.get(s)
        if j is None or (_BYTE_TOKEN.match(tokens[j] or "") and not _BYTE_TOKEN.match(tokens[i] or "")):
            out[s] = i
    return out
