"""Loaders of the public task formats under ``datasets/`` (fetched by ``sh sh/data.sh``).

Task names and sources (layout under ``root``, default ``datasets``):

- ``bbh/<task>``: BIG-Bench-Hard ``bbh/<task>.json`` = {"examples": [{"input", "target"}]}.
- ``ordered_prompt/{mpqa,subj,trec}``: ``ordered_prompt/<task>/{train,dev_subsample,test}.jsonl``
  with {"sentence", "label"}.
- ``leopard/{disaster,airline}``: ``leopard/<task>/<task>_eval.json`` = [{"sentence1", "label"}].
- ``deepen/{nq,triviaqa,arc_c,gsm8k,piqa}``, ``deepen/mmlu/<subject>``: DeePEn's JSONL files
  ({"question", "answer"} plus "A".."D" for multiple choice).

Splits are deterministic for a given ``seed`` (see datasets/README.md, "Real data"). A
malformed line or record raises a `DataError` naming the file and line (`data.records`);
answers are compared as `data.answers` normalises them.
"""
from __future__ import annotations

import random
import re
import warnings
from functools import partial
from pathlib import Path

from dln_ens.data.answers import AliasTask, Answer, normalize_choice, normalize_number, normalize_qa  # noqa: F401
from dln_ens.data.bigbench import bigbench_splits, task_json
from dln_ens.data.records import DataError, read_json_records, read_jsonl_records
from dln_ens.data.registry import register_task
from dln_ens.data.task import Example, Task, normalize_answer

DEFAULT_ROOT = "datasets"
# ----------------------------------------------------------------------------- splits

def _shuffled(items: list, name: str, seed: int) -> list:
    items = list(items)
    random.Random(f"{name}:{seed}").shuffle(items)
    return items


def _cut(items: list, sizes: tuple[int, ...]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(items[start:start + n])
        start += n
    return out


def _with_options(text: str, options: list[str]) -> str:
    return text + "\nOptions:\n" + "\n".join(f"- {o}" for o in options)


def _mc_input(question: str, rec: dict, letters: str) -> str:
    return question + "\nOptions:\n" + "\n".join(f"({L}) {rec[L]}" for L in letters)


# ----------------------------------------------------------------------------- BIG-Bench-Hard

# task -> (answer kind, instruction). kind: "mc" = "(A)".."(X)", a list = fixed verbalizers,
# "number" = numeric answer, "free" = free text.
BBH = {
    "boolean_expressions": (["True", "False"], "Evaluate the result of a random Boolean expression."),
    "causal_judgement": (["Yes", "No"], "Answer questions about causal attribution."),
    "date_understanding": ("mc", "Infer the date from context."),
    "disambiguation_qa": ("mc", "Clarify the meaning of sentences with ambiguous pronouns."),
    "dyck_languages": ("free", "Correctly close a Dyck-n word."),
    "formal_fallacies": (["valid", "invalid"], "Distinguish deductively valid arguments from formal fallacies."),
    "geometric_shapes": ("mc", "Name geometric shapes from their SVG paths."),
    "hyperbaton": ("mc", "Which sentence has the correct adjective order:"),
    "logical_deduction_three_objects": ("mc", "A logical deduction task which requires deducing the order of a sequence of objects."),
    "logical_deduction_five_objects": ("mc", "A logical deduction task which requires deducing the order of a sequence of objects."),
    "logical_deduction_seven_objects": ("mc", "The following paragraphs each describe a set of seven objects arranged in a fixed order. The statements are logically consistent within each paragraph."),
    "movie_recommendation": ("mc", "Recommend movies similar to the given list of movies."),
    "multistep_arithmetic_two": ("number", "Solve multi-step arithmetic problems."),
    "navigate": (["Yes", "No"], "If you follow these instructions, do you return to the starting point?"),
    "object_counting": ("number", "Questions that involve enumerating objects and asking the model to count them."),
    "penguins_in_a_table": ("mc", "Answer questions about a table of penguins and their attributes."),
    "reasoning_about_colored_objects": ("mc", "Answer extremely simple questions about the colors of objects on a surface."),
    "ruin_names": ("mc", "Select the humorous edit that 'ruins' the input movie or musical artist name."),
    "salient_translation_error_detection": ("mc", "Detect the type of error in an English translation of a German source sentence."),
    "snarks": ("mc", "Determine which of two sentences is sarcastic."),
    "sports_understanding": (["yes", "no"], "Determine whether an artificially constructed sentence relating to sports is plausible or not."),
    "temporal_sequences": ("mc", "Answer questions about which times certain events could have occurred."),
    "tracking_shuffled_objects_three_objects": ("mc", "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps."),
    "tracking_shuffled_objects_five_objects": ("mc", "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps."),
    "tracking_shuffled_objects_seven_objects": ("mc", "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps."),
    "web_of_lies": (["Yes", "No"], "Evaluate a random boolean function expressed as a word problem."),
    "word_sorting": ("free", "Sort a list of words."),
}


def load_bbh(task: str, root: str = DEFAULT_ROOT, seed: int = 0, protocol: str | None = None,
             bigbench: str | None = None) -> Task:
    """``protocol`` "bbh" (the default without ``bigbench``): the BBH file shuffled with
    ``seed``: 40% train, 20% dev, 40% test (100/50/100 of 250). "bigbench" (the DLN paper's;
    the default when ``bigbench`` is given): train and dev from BIG-bench's task.json under
    ``bigbench`` (default ``<root>/bigbench``) without the BBH examples, test = the BBH file
    (`data.bigbench`). A missing BIG-bench file is an error, never a fall-back to "bbh"."""
    protocol = protocol or ("bigbench" if bigbench is not None else "bbh")
    if protocol not in ("bbh", "bigbench"):
        raise DataError(f"bbh/{task}: \"protocol\" must be \"bbh\" or \"bigbench\", got {protocol!r}")
    if bigbench is not None and protocol != "bigbench":
        raise DataError(f"bbh/{task}: \"bigbench\" is set but \"protocol\" is \"bbh\"; drop one of them")
    path = Path(root) / "bbh" / f"{task}.json"
    recs = read_json_records(path, {"input": str, "target": str}, key="examples")
    kind, instruction = BBH[task]
    examples = [Example(r["input"], r["target"]) for _, r in recs]
    classes, normalize = None, normalize_answer
    if kind == "mc":
        offered = [set(re.findall(r"^(\([A-Z]\))", e.input, re.M)) for e in examples]
        for (line, _), e, options in zip(recs, examples, offered):
            if e.target not in options:
                raise DataError(f"{path}:{line}: target {e.target!r} is not one of the options its input "
                                f"offers ({', '.join(sorted(options)) or 'none'}); fix or remove the record")
        letters = {o[1] for options in offered for o in options}
        classes = [f"({chr(c)})" for c in range(ord("A"), ord(max(letters)) + 1)]
        normalize = normalize_choice
    elif kind == "number":
        normalize = normalize_number
    elif isinstance(kind, list):
        classes = kind
    if classes:
        for (line, _), e in zip(recs, examples):
            if e.target not in classes:
                raise DataError(f"{path}:{line}: target {e.target!r} is not one of {classes}")
    meta = {"source": str(path), "seed": seed, "protocol": protocol}
    if protocol == "bigbench":
        folder = Path(bigbench) if bigbench is not None else Path(root) / "bigbench"
        train, dev, test = bigbench_splits(task, folder, examples, path, seed)
        if kind == "mc":   # BIG-bench may offer more options than BBH's examples show
            letters = {m[1] for e in train + dev for m in re.findall(r"^(\([A-Z]\))", e.input, re.M)}
            classes = [f"({chr(c)})" for c in range(ord("A"), ord(max(letters | {classes[-1][1]})) + 1)]
        meta["bigbench"] = str(task_json(task, folder))
    else:
        n = len(examples)
        train, dev, test = _cut(_shuffled(examples, f"bbh/{task}", seed), (n * 2 // 5, n // 5, n))
    return Task(f"bbh/{task}", instruction, train, dev, test, classes=classes, normalize=normalize,
                description=f"BIG-Bench-Hard {task}", meta=meta)


for _name in BBH:
    register_task(f"bbh/{_name}")(partial(load_bbh, _name))


# ----------------------------------------------------------------------------- Ordered-Prompt

ORDERED_PROMPT = {
    "mpqa": ({"0": "negative", "1": "positive"},
             "Read the following review, then choose whether it is negative or positive."),
    "subj": ({"0": "subjective", "1": "objective"},
             "Read the following sentence, then choose whether it is subjective or objective."),
    "trec": ({"0": "description", "1": "entity", "2": "expression", "3": "human", "4": "location", "5": "number"},
             "Read the following question, then choose whether it is about a description, entity, "
             "expression, human, location or number."),
}


def load_ordered_prompt(task: str, root: str = DEFAULT_ROOT, seed: int = 0, num_train: int = 1000,
                        num_test: int = 250) -> Task:
    """train: ``num_train`` drawn from train.jsonl; dev: dev_subsample.jsonl; test: ``num_test``
    drawn from test.jsonl (the DLN paper's protocol). Options are appended to each input."""
    mapping, instruction = ORDERED_PROMPT[task]
    classes = list(mapping.values())
    folder = Path(root) / "ordered_prompt" / task
    splits = {}
    for split, fname in (("train", "train.jsonl"), ("dev", "dev_subsample.jsonl"), ("test", "test.jsonl")):
        path = folder / fname
        examples = []
        for line, r in read_jsonl_records(path, {"sentence": str, "label": (str, int)}):
            label = str(r["label"])
            if label not in mapping:
                raise DataError(f"{path}:{line}: label {r['label']!r} is not one of {sorted(mapping)}")
            examples.append(Example(_with_options(r["sentence"], classes), mapping[label]))
        splits[split] = examples
    train = _shuffled(splits["train"], f"ordered_prompt/{task}/train", seed)[:num_train]
    test = _shuffled(splits["test"], f"ordered_prompt/{task}/test", seed)[:num_test]
    return Task(f"ordered_prompt/{task}", instruction, train, splits["dev"], test,
                classes=classes, description=f"Ordered-Prompt {task}",
                meta={"source": str(folder), "seed": seed})


for _name in ORDERED_PROMPT:
    register_task(f"ordered_prompt/{_name}")(partial(load_ordered_prompt, _name))


# ----------------------------------------------------------------------------- Leopard

LEOPARD = {
    "disaster": ({"Not Relevant": "no", "Relevant": "yes"},
                 "Read the following sentence, then choose whether it is relevant to a disaster."),
    "airline": ({"positive": "positive", "negative": "negative", "neutral": "neutral"},
                "Read the following sentence, then choose whether it is positive, negative, or neutral."),
}


def load_leopard(task: str, root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """The ``<task>_eval.json`` set shuffled with ``seed``: 1000 train, 250 dev, 250 test (fewer
    records: 60/20/20%)."""
    mapping, instruction = LEOPARD[task]
    classes = list(dict.fromkeys(mapping.values()))
    path = Path(root) / "leopard" / task / f"{task}_eval.json"
    examples = []
    for line, r in read_json_records(path, {"sentence1": str, "label": str}):
        if r["label"] not in mapping:
            raise DataError(f"{path}:{line}: label {r['label']!r} is not one of {sorted(mapping)}")
        examples.append(Example(_with_options(r["sentence1"], classes), mapping[r["label"]]))
    n = len(examples)
    sizes = (1000, 250, 250) if n >= 1500 else (n * 3 // 5, n // 5, n // 5)
    train, dev, test = _cut(_shuffled(examples, f"leopard/{task}", seed), sizes)
    return Task(f"leopard/{task}", instruction, train, dev, test, classes=classes,
                description=f"Leopard {task}", meta={"source": str(path), "seed": seed})


for _name in LEOPARD:
    register_task(f"leopard/{_name}")(partial(load_leopard, _name))


# ----------------------------------------------------------------------------- DeePEn

def _qa_examples(path: Path) -> list[Example]:
    out = []
    for line, r in read_jsonl_records(path, {"question": str, "answer": (str, list)}):
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}:{line}: 'answer' must be a string or a non-empty list of strings")
        out.append(Example(r["question"], Answer(answers[0], answers)))
    return out


def _qa_task(name, instruction, train, dev, test, sources, seed) -> AliasTask:
    return AliasTask(name, instruction, train, dev, test, classes=None, normalize=normalize_qa,
                     description=f"DeePEn {name}", meta={"source": sources, "seed": seed})


@register_task("deepen/nq")
def load_nq(root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """test: test/natural-questions.jsonl; the 1600-question dev sample shuffled with ``seed``
    into 400 dev and the rest train."""
    base = Path(root) / "deepen" / "NaturalQuestions"
    pool = _qa_examples(base / "dev" / "v1.0-simplified_simplified-nq-train.simpled_dev_100000_sample1600_seed42.jsonl")
    test = _qa_examples(base / "test" / "natural-questions.jsonl")
    dev, train = _cut(_shuffled(pool, "deepen/nq", seed), (400, len(pool)))
    return _qa_task("deepen/nq", "Answer the question with a short phrase.", train, dev, test, str(base), seed)


@register_task("deepen/triviaqa")
def load_triviaqa(root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """The 1900 dev questions also appear in the 6000 test questions: test = the 4100 others;
    dev/train = the 1900 shuffled with ``seed`` (400 dev, rest train)."""
    base = Path(root) / "deepen" / "TriviaQA"
    pool = _qa_examples(base / "wikipedia-dev-1900.jsonl")
    held = {e.input for e in pool}
    test = [e for e in _qa_examples(base / "wikipedia-test-6000.jsonl") if e.input not in held]
    dev, train = _cut(_shuffled(pool, "deepen/triviaqa", seed), (400, len(pool)))
    return _qa_task("deepen/triviaqa", "Answer the trivia question with a short phrase.", train, dev, test,
                    str(base), seed)


def _mc_examples(path: Path, letters: str) -> tuple[list[Example], int]:
    """Multiple-choice records; records whose options are all empty (a few upstream ARC
    questions with numbered choices lost them) cannot be asked and are skipped, counted."""
    out, skipped = [], 0
    required = {"question": str, "answer": str, **{L: str for L in letters}}
    for line, r in read_jsonl_records(path, required):
        if not any(r[L].strip() for L in letters):
            skipped += 1
            continue
        if r["answer"] not in letters:
            raise DataError(f"{path}:{line}: answer {r['answer']!r} is not one of {list(letters)}")
        out.append(Example(_mc_input(r["question"], r, letters), f"({r['answer']})"))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} records whose options are all empty")
    return out, skipped


def _mc_task(name, instruction, train, dev, test, letters, meta) -> Task:
    return Task(name, instruction, train, dev, test, classes=[f"({L})" for L in letters],
                normalize=normalize_choice, description=f"DeePEn {name}", meta=meta)


@register_task("deepen/arc_c")
def load_arc_c(root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """test: test.jsonl; train.jsonl shuffled with ``seed`` into 20% dev and 80% train."""
    base = Path(root) / "deepen" / "ARC-Challenge"
    pool, s1 = _mc_examples(base / "train.jsonl", "ABCD")
    test, s2 = _mc_examples(base / "test.jsonl", "ABCD")
    dev, train = _cut(_shuffled(pool, "deepen/arc_c", seed), (len(pool) // 5, len(pool)))
    return _mc_task("deepen/arc_c", "Answer the science question by choosing the correct option.",
                    train, dev, test, "ABCD", {"source": str(base), "seed": seed, "skipped": s1 + s2})


@register_task("deepen/piqa")
def load_piqa(root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """DeePEn ships PIQA's dev set only: shuffled with ``seed`` into 40% train, 10% dev, 50% test."""
    path = Path(root) / "deepen" / "PIQA" / "physicaliqa-train-dev" / "dev_our.jsonl"
    pool, skipped = _mc_examples(path, "AB")
    n = len(pool)
    train, dev, test = _cut(_shuffled(pool, "deepen/piqa", seed), (n * 2 // 5, n // 10, n))
    return _mc_task("deepen/piqa", "Choose the solution that best achieves the goal.", train, dev, test,
                    "AB", {"source": str(path), "seed": seed, "skipped": skipped})


_GSM_ANSWER = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)")


def _gsm_examples(path: Path) -> list[Example]:
    out = []
    for line, r in read_jsonl_records(path, {"question": str, "answer": str}):
        found = _GSM_ANSWER.findall(r["answer"])
        if not found:
            raise DataError(f"{path}:{line}: no final 'answer is <number>' in the solution")
        out.append(Example(r["question"], normalize_number(found[-1])))
    return out


@register_task("deepen/gsm8k")
def load_gsm8k(root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """Targets are the final numbers of the solutions. test: test.cleand.jsonl (1319);
    train_sample300 shuffled with ``seed`` into 100 dev and 200 train."""
    base = Path(root) / "deepen" / "GSM" / "data"
    pool = _gsm_examples(base / "train_sample300_seed42.cleand.jsonl")
    test = _gsm_examples(base / "test.cleand.jsonl")
    dev, train = _cut(_shuffled(pool, "deepen/gsm8k", seed), (len(pool) // 3, len(pool)))
    return Task("deepen/gsm8k", "Solve the math word problem. Give the final answer as a number.",
                train, dev, test, classes=None, normalize=normalize_number, description="DeePEn GSM8K",
                meta={"source": str(base), "seed": seed})


MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology "
    "college_chemistry college_computer_science college_mathematics college_medicine college_physics "
    "computer_security conceptual_physics econometrics electrical_engineering elementary_mathematics "
    "formal_logic global_facts high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_european_history high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_mathematics high_school_microeconomics high_school_physics "
    "high_school_psychology high_school_statistics high_school_us_history high_school_world_history "
    "human_aging human_sexuality international_law jurisprudence logical_fallacies machine_learning "
    "management marketing medical_genetics miscellaneous moral_disputes moral_scenarios nutrition "
    "philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology "
    "world_religions").split()


def load_mmlu(subject: str, root: str = DEFAULT_ROOT, seed: int = 0) -> Task:
    """MMLU's own splits: train = dev-jsonl (5 examples), dev = val-jsonl, test = test-jsonl.
    ``seed`` only shuffles the order of the training examples."""
    base = Path(root) / "deepen" / "MMLU"
    split = {s: _mc_examples(base / f"{s}-jsonl" / f"{subject}.jsonl", "ABCD")[0] for s in ("dev", "val", "test")}
    topic = subject.replace("_", " ")
    return _mc_task(f"deepen/mmlu/{subject}",
                    f"The following are multiple choice questions about {topic}. Choose the correct option.",
                    _shuffled(split["dev"], f"deepen/mmlu/{subject}", seed), split["val"], split["test"],
                    "ABCD", {"source": str(base), "seed": seed})


for _name in MMLU_SUBJECTS:
    register_task(f"deepen/mmlu/{_name}")(partial(load_mmlu, _name))
