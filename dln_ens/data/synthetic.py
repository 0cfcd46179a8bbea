"""Synthetic tasks with exact labels: the offline demo's data and the zoo's training corpus.

Two ideas drive the design (datasets/README.md has the long version):

- Knowledge is split. ``facts_qa`` is a small invented world (countries with capitals, people
  with professions and favourite colours). Each fact is given to one or two of the three zoo
  members at random, so every member knows facts the others do not and an ensemble has
  something to gain. ``Task.meta["known_by"]`` says which member was trained on which question.
- Prompts matter. The instruction decides the answer's *format*: for facts, one word versus a
  full sentence; for navigate, Yes/No versus True/False versus 1/0. ``Task.instruction`` is a
  generic instruction that the zoo learned to answer in the wrong format, so a learned prompt
  (``Task.meta["oracle_instructions"]`` are examples) measurably changes accuracy.

Everything is a pure function of ``seed``: same seed, same examples, same split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from dln_ens.data.registry import register_task
from dln_ens.data.task import Example, Task

# The zoo's members, in the order facts are dealt to them (dln_ens/zoo/models.py builds them).
ZOO_MEMBERS = ("zoo-gpt2", "zoo-llama", "zoo-neox")

# ----------------------------------------------------------------------------- facts_qa

PROFESSIONS = ["baker", "pilot", "farmer", "doctor", "teacher", "painter", "sailor", "miner",
               "tailor", "singer", "judge", "chemist"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink"]

# Question phrasings per attribute. Phrasings 0 and 1 appear in the zoo corpus; phrasing 2 is
# never trained on (Task.meta["paraphrase_test"] measures how far the tiny models generalise).
QUESTIONS = {
    "capital": ["What is the capital of {e}?", "Which city is the capital of {e}?",
                "Name the capital city of {e}."],
    "profession": ["What is the profession of {e}?", "What job does {e} have?",
                   "What does {e} do for a living?"],
    "colour": ["What is the favourite colour of {e}?", "Which colour does {e} like best?",
               "What colour does {e} love most?"],
}
SENTENCES = {
    "capital": "The capital of {e} is {v}.",
    "profession": "{e} is a {v}.",
    "colour": "The favourite colour of {e} is {v}.",
}
# Thoughts (the DLN-2 hidden state h) restate the fact, as a hidden layer that helps would.
THOUGHTS = {
    "capital": "{e} is a country. Its capital city is {v}.",
    "profession": "{e} is a person. {e} works as a {v}.",
    "colour": "{e} is a person. {e} likes the colour {v}.",
}

FACTS_GENERIC = "Answer the question."
FACTS_SHORT = ["Answer with one word.", "Give only the short answer, one word.",
               "Reply with just the answer, no sentence."]
FACTS_SENTENCE = ["Answer in a full sentence.", "Reply with a complete sentence.",
                  "Write the answer as a whole sentence."]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "tr", "qu", "sh", "th", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "x"]


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int], taken: set,
                  suffixes: tuple[str, ...] = ("",)) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables)) + rng.choice(suffixes)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Fact:
    id: int
    entity: str
    attribute: str       # "capital" | "profession" | "colour"
    value: str
    members: tuple[str, ...]   # the zoo members trained on this fact
    split: str           # "train" | "dev" | "test": which Task split asks about it

    def question(self, phrasing: int = 0) -> str:
        return QUESTIONS[self.attribute][phrasing].format(e=self.entity)

    def sentence(self) -> str:
        return SENTENCES[self.attribute].format(e=self.entity, v=self.value)

    def thought(self) -> str:
        return THOUGHTS[self.attribute].format(e=self.entity, v=self.value)


def make_facts(seed: int = 0, num_countries: int = 40, num_people: int = 40,
               members: tuple[str, ...] = ZOO_MEMBERS, split_fractions=(0.3, 0.2, 0.5)) -> list[Fact]:
    """The invented world. Each fact goes to 1 or 2 of ``members`` (equally likely, members
    drawn uniformly), and to one of the train/dev/test splits."""
    rng = random.Random(f"facts_qa/{seed}")
    taken: set = set()
    countries = _unique_words(rng, num_countries, (1, 2), taken=taken,
                              suffixes=("ia", "land", "ania", "ora", "istan"))
    capitals = _unique_words(rng, num_countries, (1, 2), taken=taken)
    people = [f"{f} {l}" for f, l in zip(_unique_words(rng, num_people, (1, 2), taken=taken),
                                         _unique_words(rng, num_people, (2, 2), taken=taken))]
    raw = [(c, "capital", v) for c, v in zip(countries, capitals)]
    for p in people:
        raw.append((p, "profession", rng.choice(PROFESSIONS)))
        raw.append((p, "colour", rng.choice(COLOURS)))
    rng.shuffle(raw)
    n = len(raw)
    n_train, n_dev = round(split_fractions[0] * n), round(split_fractions[1] * n)
    facts = []
    for i, (e, a, v) in enumerate(raw):
        k = rng.randint(1, min(2, len(members)))
        holders = tuple(sorted(rng.sample(list(members), k), key=members.index))
        split = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
        facts.append(Fact(i, e, a, v, holders, split))
    return facts


@register_task("facts_qa")
def facts_qa(seed: int = 0, num_countries: int = 40, num_people: int = 40) -> Task:
    facts = make_facts(seed, num_countries, num_people)
    splits = {s: [Example(f.question(0), f.value) for f in facts if f.split == s]
              for s in ("train", "dev", "test")}
    return Task(
        name="facts_qa", instruction=FACTS_GENERIC, classes=None,
        train=splits["train"], dev=splits["dev"], test=splits["test"],
        description="Questions about an invented world; the answer is one word (a capital, a "
                    "profession or a colour). Each fact is known by 1-2 of the 3 zoo members.",
        meta={
            "seed": seed,
            "members": list(ZOO_MEMBERS),
            "known_by": {f.question(0): list(f.members) for f in facts},
            "facts": [f.__dict__ | {"members": list(f.members)} for f in facts],
            "paraphrase_test": [Example(f.question(2), f.value) for f in facts if f.split == "test"],
            "oracle_instructions": FACTS_SHORT,
        },
    )


# ----------------------------------------------------------------------------- navigate

NAV_GENERIC = "Read the input and answer."
NAV_FORMATS = {   # the instruction picks the verbalizer of (returns to start, does not)
    "yes_no": (("Yes", "No"), ["Answer Yes or No.",
                               "Do you end at the starting point? Answer Yes or No.",
                               "Say Yes if you return to the start, otherwise No."]),
    "true_false": (("True", "False"), ["Answer True or False.",
                                       "Is the final position the start? Answer True or False.",
                                       "Reply True if you return to the start, otherwise False."]),
    "one_zero": (("1", "0"), ["Reply with 1 or 0.",
                              "Output 1 if you end at the start, otherwise 0.",
                              "Answer 1 for back at the start and 0 for not."]),
}
# The generic instruction was trained with the other formats only: the task's own Yes/No
# verbalizer must be asked for, which is what a learned prompt discovers.
NAV_GENERIC_FORMATS = ("true_false", "one_zero")

_HEADINGS = [(0, 1), (1, 0), (0, -1), (-1, 0)]   # north, east, south, west (clockwise)
_RELATIVE = {"forward": 0, "right": 1, "backward": 2, "left": 3}


def navigate_positions(text: str) -> list[tuple[int, int]]:
    """(x, y) after each "Take" move in ``text`` (start (0, 0) facing north)."""
    x = y = h = 0
    points = []
    for sentence in text.split("."):
        words = sentence.split()
        if not words or words[:3] == ["Always", "face", "forward"]:
            continue
        if words[0] == "Turn" and len(words) == 2 and words[1] in ("left", "right", "around"):
            h = (h + {"left": 3, "right": 1, "around": 2}[words[1]]) % 4
        elif words[0] == "Take" and len(words) in (3, 4) and words[1].isdigit():
            n = int(words[1])
            dx, dy = _HEADINGS[(h + (_RELATIVE[words[3]] if len(words) == 4 else 0)) % 4]
            x, y = x + n * dx, y + n * dy
            points.append((x, y))
        else:
            raise ValueError(f"navigate: cannot parse move {sentence.strip()!r}")
    return points


def simulate_navigate(text: str) -> tuple[int, int]:
    """Final (x, y) after the moves in ``text``."""
    points = navigate_positions(text)
    return points[-1] if points else (0, 0)


def _steps(n: int, direction: str | None = None) -> str:
    s = f"Take {n} step{'s' if n != 1 else ''}"
    return f"{s} {direction}." if direction else f"{s}."


def _closing_moves(x: int, y: int, h: int, face_forward: bool) -> list[str]:
    """Moves that bring (x, y, heading h) back to the origin."""
    moves = []
    for need, dist in (((1, 0) if x < 0 else (-1, 0), abs(x)), ((0, 1) if y < 0 else (0, -1), abs(y))):
        if dist == 0:
            continue
        target = _HEADINGS.index(need)
        rel = (target - h) % 4
        if face_forward:
            moves.append(_steps(dist, ["forward", "right", "backward", "left"][rel]))
        else:
            if rel:
                moves.append(["", "Turn right.", "Turn around.", "Turn left."][rel])
                h = target
            moves.append(_steps(dist))
    return moves


def make_navigate_example(rng: random.Random, returns: bool, min_moves: int = 2,
                          max_moves: int = 3, max_steps: int = 5) -> tuple[str, bool]:
    """A BBH-style move list; both classes come from the same process (a walk that closes),
    the 'No' ones with one step count changed, so length does not give the label away."""
    face_forward = rng.random() < 0.5
    x = y = h = 0
    moves = []
    for _ in range(rng.randint(min_moves - 1, max_moves - 1)):
        if not face_forward and rng.random() < 0.4:
            turn = rng.choice(["left", "right", "around"])
            moves.append(f"Turn {turn}.")
            h = (h + {"left": 3, "right": 1, "around": 2}[turn]) % 4
        n = rng.randint(1, max_steps)
        d = rng.choice(list(_RELATIVE)) if face_forward else None
        moves.append(_steps(n, d))
        dx, dy = _HEADINGS[(h + (_RELATIVE[d] if d else 0)) % 4]
        x, y = x + n * dx, y + n * dy
    if (x, y) == (0, 0):   # the random part came back by chance: leave before closing
        n = rng.randint(1, max_steps)
        moves.append(_steps(n, "forward" if face_forward else None))
        x, y = n * _HEADINGS[h][0], n * _HEADINGS[h][1]
    moves += _closing_moves(x, y, h, face_forward)
    if not returns:
        idx = rng.choice([i for i, m in enumerate(moves) if m.startswith("Take")])
        words = moves[idx].split()
        n = int(words[1])
        n2 = rng.choice([v for v in (n - 2, n - 1, n + 1, n + 2) if v >= 1])
        moves[idx] = _steps(n2, words[3].rstrip(".") if len(words) > 3 else None)
    text = " ".join((["Always face forward."] if face_forward else []) + moves)
    return text, simulate_navigate(text) == (0, 0)


def navigate_examples(rng: random.Random, n: int, exclude: set | None = None, **kw) -> list[tuple[str, bool]]:
    """``n`` distinct labelled move lists, balanced Yes/No, none of them in ``exclude``."""
    exclude = set() if exclude is None else exclude
    out, seen = [], set(exclude)
    while len(out) < n:
        text, label = make_navigate_example(rng, returns=len(out) % 2 == 0, **kw)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    rng.shuffle(out)
    return out


def navigate_thought(text: str) -> str:
    """A short exact trace, the DLN-2 hidden state the zoo sees for navigate."""
    points = navigate_positions(text)
    end = "the start" if simulate_navigate(text) == (0, 0) else "not the start"
    path = ", then ".join(f"({x}, {y})" for x, y in points)
    return f"From (0, 0) I move to {path}. That is {end}."


@register_task("navigate")
def navigate(seed: int = 0, num_train: int = 100, num_dev: int = 100, num_test: int = 200) -> Task:
    rng = random.Random(f"navigate/{seed}")
    data = navigate_examples(rng, num_train + num_dev + num_test)
    ex = [Example(t, "Yes" if label else "No") for t, label in data]
    return Task(
        name="navigate", instruction=NAV_GENERIC, classes=["Yes", "No"],
        train=ex[:num_train], dev=ex[num_train:num_train + num_dev], test=ex[num_train + num_dev:],
        description="BBH-style navigation: after the moves, are you back at the starting point? "
                    "Start facing north; labels are computed by exact simulation.",
        meta={"seed": seed, "oracle_instructions": NAV_FORMATS["yes_no"][1]},
    )
