"""Task records shared by the synthetic generators and the real-data loaders.

Every task, synthetic or real, loads into the same shape: BBH-style (input, target) examples
split into train/dev/test, plus what a DLN layer needs to score it (instruction, output classes)
and how to compare a generated answer with the target (normalisation).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Example:
    input: str
    target: str


def normalize_answer(text: str) -> str:
    """Default answer normalisation: first line, lower-cased, surrounding punctuation and
    whitespace stripped, inner whitespace folded."""
    text = text.strip().split("\n")[0].strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,:;!?\"'")


@dataclass
class Task:
    name: str
    instruction: str                       # the initial prompt a DLN starts from
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    classes: list[str] | None = None       # output verbalizers; None = free generation
    normalize: Callable[[str], str] = normalize_answer
    description: str = ""
    meta: dict = field(default_factory=dict)

    def is_correct(self, prediction: str, target: str) -> bool:
        return self.normalize(prediction) == self.normalize(target)
