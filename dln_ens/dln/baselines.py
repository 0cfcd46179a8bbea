"""Zero-shot and k-shot (in-context) baselines beside the DLN, as the reference runs them
(``vi_main.py --do_zero_shot`` / ``--n_shots k``): the task's instruction in the DLN-1 output
template on a system's layer backend, with k training examples shown before the input.

The k demonstrations are drawn class-balanced (one per class in turn, as the reference's
``_get_few_shots``) from the training split with a seeded generator, once per (task, k). Each
is the output template rendered with an empty prompt and followed by its target; they go
between the instruction and the test input, separated by blank lines.
"""
from __future__ import annotations

import numpy as np

from dln_ens.data.task import Example, Task
from dln_ens.dln.layers import OutputLayer
from dln_ens.dln.trainer import balanced_batch_indices, derive_seed


def demonstrations(task: Task, k: int, seed: int) -> list[Example]:
    if k == 0:
        return []
    if len(task.train) < k:
        raise ValueError(f"task {task.name!r}: {k}-shot baseline needs {k} training examples, "
                         f"the train split has {len(task.train)}")
    idx = balanced_batch_indices([e.target for e in task.train], k, derive_seed(seed, task.name, "shots"), 0)
    return [task.train[i] for i in idx]


def shot_prompt(layer: OutputLayer, instruction: str, demos: list[Example]) -> str:
    """The instruction followed by the rendered demonstrations."""
    shown = [layer.render("", d.input).strip() + " " + d.target for d in demos]
    return "\n\n".join([instruction] + shown) if shown else instruction


def evaluate_baseline(layer: OutputLayer, task: Task, examples: list[Example], k: int, seed: int,
                      chunk: int = 32) -> dict:
    """Accuracy of the k-shot prompt on examples (one backend call per chunk)."""
    prompt = shot_prompt(layer, task.instruction, demonstrations(task, k, seed))
    preds: list[str] = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        preds.extend(layer.predict([prompt] * len(part), [e.input for e in part]))
    correct = [task.is_correct(p, e.target) for p, e in zip(preds, examples)]
    return {"shots": k, "accuracy": float(np.mean(correct)) if correct else 0.0, "prompt": prompt}
