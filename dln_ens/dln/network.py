"""DLN-1 (one output layer) and DLN-2 (hidden layer -> residual -> output layer)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from dln_ens.data.task import Example
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.scoring import CallCache


class DeepLanguageNetwork:
    """``hidden is None``: DLN-1, the output layer reads the input. Otherwise DLN-2: the hidden
    layer writes h and the output layer reads the input together with h (residual)."""

    def __init__(self, output: OutputLayer, hidden: HiddenLayer | None = None):
        self.output, self.hidden = output, hidden

    @property
    def depth(self) -> int:
        return 1 if self.hidden is None else 2

    @property
    def prompts(self) -> dict[str, str]:
        """Layer prompts, first layer first: {"p1": ..., "p2": ...} (DLN-1 has only p2, the
        output layer's, as in the DLN code)."""
        out = {"p2": self.output.prompt}
        if self.hidden is not None:
            out = {"p1": self.hidden.prompt, **out}
        return out

    def set_prompts(self, prompts: dict[str, str]) -> None:
        self.output.prompt = prompts["p2"]
        if self.hidden is not None:
            self.hidden.prompt = prompts["p1"]

    def forward(self, inputs: list[str], cache: CallCache | None = None) -> tuple[list[str] | None, list[str]]:
        """(hidden texts or None, predictions) under the current prompts, greedy."""
        cache = cache or CallCache()
        hs = None
        if self.hidden is not None:
            hs = self.hidden.forward([self.hidden.prompt] * len(inputs), inputs)
        preds = self.output.predict([self.output.prompt] * len(inputs), inputs, hs, cache)
        return hs, preds

    def evaluate(self, examples: list[Example], is_correct: Callable[[str, str], bool],
                 chunk: int = 32, desc: str | None = None) -> tuple[float, list[str], list[str] | None]:
        """Accuracy on examples, the predictions and the hidden texts (None for DLN-1), in
        chunks of one backend call each."""
        preds: list[str] = []
        hidden: list[str] = []
        for start in tqdm(range(0, len(examples), chunk), desc=desc or "eval", leave=False,
                          disable=desc is None):
            part = examples[start:start + chunk]
            hs, out = self.forward([e.input for e in part])
            preds.extend(out)
            hidden.extend(hs or [])
        correct = [is_correct(p, e.target) for p, e in zip(preds, examples)]
        return (float(np.mean(correct)) if correct else 0.0), preds, (hidden if self.hidden is not None else None)


def input_with_thoughts(x: str, h: str) -> str:
    """What the prompt proposer sees as the output layer's input in DLN-2."""
    return f"{x}\nYour thoughts were: {h}"
