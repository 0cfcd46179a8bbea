"""Answer normalisation and targets with aliases: how a prediction is compared with a target."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

from dln_ens.data.task import Task, normalize_answer

def normalize_choice(text: str) -> str:
    """A multiple-choice answer as "(X)": the first "(X)" in the text, or a leading bare letter."""
    m = re.search(r"\(([A-Z])\)", text)
    if m:
        return f"({m.group(1)})"
    m = re.match(r"\s*([A-Z])(?:[).:\s]|$)", text)
    return f"({m.group(1)})" if m else normalize_answer(text)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """The last number in the first line of the answer ("... the answer is 1,234." -> "1234");
    texts without a number keep the default normalisation (so they never equal a number)."""
    first = text.strip().split("\n")[0]
    found = _NUMBER.findall(first)
    if not found:
        return normalize_answer(text)
    num = found[-1].replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


_PUNCTUATION = frozenset(string.punctuation)


def normalize_qa(text: str) -> str:
    """SQuAD-style exact-match normalisation: lower case, no punctuation or articles."""
    text = text.strip().split("\n")[0].lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class Answer(str):
    """A target that also carries the other accepted answers (QA datasets list aliases)."""

    def __new__(cls, text: str, aliases=()):
        obj = super().__new__(cls, text)
        obj.aliases = tuple(aliases) or (str(text),)
        return obj


@dataclass
class AliasTask(Task):
    """Correct when the prediction matches any alias of the target."""

    def is_correct(self, prediction: str, target: str) -> bool:
        p = self.normalize(prediction)
        return any(p == self.normalize(a) for a in getattr(target, "aliases", (target,)))
