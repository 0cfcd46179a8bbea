"""DLN presets: `demo` (the `DLNConfig` defaults, sized for the zoo on a CPU) and `paper` (the
settings of the DLN reference's run scripts, microsoft/deep-language-networks
`projects/vi_dln/scripts/`, per depth and per task).

`settings_for(cfg, layers, task)` gives the settings one system trains with: under `paper`, every
key the config file did not set takes the reference's value for that depth and task. Keys the
file sets always win, so a paper run can still be shortened (e.g. `"num_test": 100`).

The paper's BBH data protocol (train and dev from BIG-bench outside BBH, test = BBH;
`data.bigbench`) is a property of the task's data, not of a preset: a config opts in with
`"task_kwargs": {"bigbench": "<BIG-bench benchmark_tasks folder>"}` (or `"protocol": "bigbench"`
for the default `<root>/bigbench`), under either preset; a missing BIG-bench file stops the run.
"""
from __future__ import annotations

import dataclasses

from dln_ens.config import DLNConfig

# Common to every paper run (vi_main.py defaults and the scripts' shared flags).
_COMMON = {
    "balance_batch": True, "val_freq": 2, "num_dev": None, "num_test": None, "scoring": "logprob",
    "proposal_template": "q_action_prompt", "proposal_max_examples": None,   # all batch examples
    "proposal_temperature": 0.7, "proposal_max_new_tokens": 512, "output_max_new_tokens": 20,
    "decay_logp_penalty": True, "hidden_prompt": "", "output_prompt": None,
}

# DLN-1 (scripts/one_layer/one_layer.py with one-layer-dln-hp-search-result.json).
_ONE_LAYER = {"iters": 20, "batch_size": 20, "num_p_samples": 20, "trust_factor": 0.0,
              "logp_penalty": 0.0, "held_out_prompt_ranking": True, "memory_size": 2, "tolerance": -1}
_ONE_LAYER_TASKS = {
    "hyperbaton": {"tolerance": -1, "memory_size": 0, "held_out_prompt_ranking": True},
    "navigate": {"tolerance": -1, "memory_size": 2, "held_out_prompt_ranking": True},
    "date_understanding": {"tolerance": 0, "memory_size": 2, "held_out_prompt_ranking": True},
    "logical_deduction_seven_objects": {"tolerance": 0, "memory_size": 2, "held_out_prompt_ranking": True},
    "mpqa": {"tolerance": 0, "memory_size": 0, "held_out_prompt_ranking": True},
    "trec": {"tolerance": 2, "memory_size": 2, "held_out_prompt_ranking": False},
    "subj": {"tolerance": 2, "memory_size": 0, "held_out_prompt_ranking": True},
    "disaster": {"tolerance": 0, "memory_size": 0, "held_out_prompt_ranking": False},
    "airline": {"tolerance": -1, "memory_size": 0, "held_out_prompt_ranking": True},
}

# DLN-2 (scripts/two_layers_e2e/*.sh); tasks without a script use date_understanding's values.
_TWO_LAYERS = {"iters": 20, "batch_size": 10, "num_p_samples": 10, "num_h_samples": 5,
               "held_out_prompt_ranking": True, "memory_size": 2, "tolerance": 2, "trust_factor": 1.0,
               "logp_penalty": 1.0, "posterior_temp": 1.0, "h_temperature": 0.7,
               "hidden_max_new_tokens": 256, "strip_options_for_hidden": True,
               "hidden_template": "suffix_forward_tbs:v2",
               "posterior_template": "suffix_forward_tbs_y:v2|suffix_forward_tbs:v2"}
_TWO_LAYER_TASKS = {
    "navigate": {"num_h_samples": 10, "memory_size": 5, "trust_factor": 5.0, "logp_penalty": 2.0},
    "date_understanding": {"output_prompt": ""},
    "logical_deduction_seven_objects": {"trust_factor": 0.0, "posterior_temp": 0.75,
                                        "hidden_max_new_tokens": 512, "output_prompt": ""},
    "gsm8k": {"iters": 10, "hidden_max_new_tokens": 512, "num_dev": 300, "num_test": 300,
              "output_prompt": "Solve the math word problem.", "strip_options_for_hidden": False},
}


def paper_settings(layers: int, task: str) -> dict:
    """The reference's settings for a DLN of this depth on this task (BBH / NLU names with or
    without a loader prefix: "bbh/navigate" and "navigate" alike)."""
    base = task.rsplit("/", 1)[-1]
    if layers == 1:
        return {**_COMMON, **_ONE_LAYER, **_ONE_LAYER_TASKS.get(base, {})}
    return {**_COMMON, **_TWO_LAYERS, **_TWO_LAYER_TASKS.get(base, {})}


def settings_for(cfg: DLNConfig, layers: int, task: str) -> DLNConfig:
    """The settings one system trains with (see the module docstring)."""
    if cfg.preset == "demo":
        return cfg
    values = {k: v for k, v in paper_settings(layers, task).items() if k not in cfg.set_keys}
    return dataclasses.replace(cfg, **values)
