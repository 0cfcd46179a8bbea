"""The config schema (``conf/*.json``) and its checks.

The whole file is checked before any model loads: an unknown key (with a did-you-mean), a wrong
type, a missing required key (`confparse`), a model path that does not exist or an ensemble
naming an unknown member fails with a ``ConfigError`` naming the file, the key path and the fix.
Each backend type's schema and checks live in its own module (`backend_types`). Relative paths
resolve against the working directory the command runs in (the repository root for ``sh/*.sh``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from dln_ens.backend_types import BACKEND_TYPES, CheckContext
from dln_ens.backend_types.ensemble import EnsembleBackend
from dln_ens.backend_types.hf import HFBackend, check_model_dir
from dln_ens.backend_types.mod import ModBackend
from dln_ens.backend_types.user_class import ClassBackend
from dln_ens.confparse import (ConfigError, Ctx, config_to_dict, parse_dataclass, read_json_with_comments,
                               strip_comments)

__all__ = ["Config", "ConfigError", "ZooConfig", "EvalConfig", "DLNConfig", "DLNSystem", "TuneModConfig",
           "AblateConfig", "AblateVariant",
           "HFBackend", "ModBackend", "EnsembleBackend", "ClassBackend", "load_config", "parse_config",
           "config_to_dict", "check_dln_config", "check_model_dir"]


# ----------------------------------------------------------------------------- schema

@dataclass
class ZooConfig:
    dir: str = "models/zoo"          # where `dln-ens zoo` saves the tiny models
    size: Literal["default", "tiny"] = "default"
    seed: int = 0


Backend = Any   # an instance of one of the schemas in `backend_types.BACKEND_TYPES`


@dataclass
class EvalConfig:
    """Plain evaluation of backends on tasks (the members-versus-ensemble table)."""
    tasks: list[str] = field(default_factory=lambda: ["facts_qa", "navigate"])
    backends: list[str] = field(default_factory=list)
    split: Literal["dev", "test"] = "test"
    num_examples: Union[int, None] = None     # None = the whole split
    max_new_tokens: int = 16
    batch_size: int = 16
    # task name -> the instruction to evaluate under (default: the task's own instruction)
    instructions: dict[str, str] = field(default_factory=dict)


@dataclass
class DLNSystem:
    """One DLN to train: its depth and which backend runs each part."""
    name: str
    layers: Literal[1, 2] = 1
    backend: str = ""                # runs the forward layers
    hidden_backend: Union[str, None] = None    # DLN-2 hidden layer; None = `backend`
    proposer: Union[str, None] = None          # backward prompt proposal; None = `backend`
    posterior: Union[str, None] = None         # posterior sampler of h; None = `backend`
    task: Union[str, None] = None              # None = `dln.task`


@dataclass
class DLNConfig:
    # Defaults are sized for the offline demo (4 systems on the zoo's 512-position models, a few
    # minutes on a laptop CPU); the DLN paper uses far more samples and iterations.
    task: str = "navigate"
    systems: list[DLNSystem] = field(default_factory=list)
    iters: int = 4
    batch_size: int = 4
    num_p_samples: int = 2          # proposals per layer and iteration (+ current + memory prompts)
    num_h_samples: int = 2          # posterior samples of h per example (+ the forward h)
    val_freq: int = 1
    num_dev: Union[int, None] = 20
    num_test: Union[int, None] = 50
    scoring: Literal["logprob", "accuracy"] = "logprob"
    posterior_temp: float = 1.0
    trust_factor: float = 0.0
    logp_penalty: float = 0.0
    memory_size: int = 2
    held_out_prompt_ranking: bool = False
    rewrite_wrong_only: bool = False
    hidden_max_new_tokens: int = 48
    output_max_new_tokens: int = 16
    proposal_max_new_tokens: int = 32
    proposal_temperature: float = 0.7
    h_temperature: float = 0.7
    templates: str = "v1"
    template_dir: Union[str, None] = None   # a user folder of extra templates
    seed: int = 0
    # template per role: "name" (version `templates`) or "name:version"
    output_template: str = "classify_forward"      # DLN-1 output layer
    residual_template: str = "classify_residual"   # DLN-2 output layer (input + h)
    hidden_template: str = "suffix_forward_tbs"    # DLN-2 hidden layer
    # the paper's backward template is "q_action_prompt" (v1); the compact version fits 512 positions
    proposal_template: str = "q_action_prompt:v1-short"
    posterior_template: str = "suffix_forward_tbs_y"   # q(h | x, y)
    proposal_max_examples: Union[int, None] = 2    # examples shown per proposal (errors first); None = batch
    hidden_prompt: Union[str, None] = None   # initial DLN-2 first-layer prompt; None = task instruction
    length_normalize: bool = True            # free-text log-likelihoods per token (DLN scorer)
    task_kwargs: dict = field(default_factory=dict)   # passed to load_task (e.g. root, seed)


@dataclass
class TuneModConfig:
    backend: str = ""                # a `mod` backend; its head is written beside its base
    task: str = "facts_qa"
    epochs: int = 3
    lr: float = 1e-3
    lambda_kd: float = 0.1
    batch_size: int = 16
    patience: int = 2
    lora: bool = False
    seed: int = 0
    loss_on: Literal["target", "all"] = "target"   # answer tokens only, or every token
    max_train_examples: Union[int, None] = None    # None = the whole train split
    max_dev_examples: Union[int, None] = 200       # held-out loss for early stopping


@dataclass
class AblateVariant:
    """One fusion method of the ablation grid; a list value in ``fusion``, ``weighting`` or
    ``weighting_temperature`` is an axis: every combination is a cell."""
    method: str
    fusion: dict = field(default_factory=dict)
    weighting: Any = None              # a scheme (`fusion.weighting.SCHEMES`), a list of them, or null
    weighting_temperature: Any = 0.1   # a number or a list of numbers
    backends: Union[list[str], None] = None   # a subset of ablate.backends; None = all of them


@dataclass
class AblateConfig:
    """`dln-ens ablate`: variants x ensemble backends x tasks (`dln_ens.ablate`)."""
    backends: list[str] = field(default_factory=list)       # ensemble backends (members, main, matrices)
    variants: list[AblateVariant] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["facts_qa", "navigate"])
    split: Literal["dev", "test"] = "test"
    num_examples: Union[int, None] = 60
    max_new_tokens: int = 12
    batch_size: int = 16
    instructions: dict[str, str] = field(default_factory=dict)   # default: eval.instructions


@dataclass
class Config:
    name: str
    backends: dict[str, Backend]
    zoo: Union[ZooConfig, None] = None
    eval: Union[EvalConfig, None] = None
    dln: Union[DLNConfig, None] = None
    tune_mod: Union[TuneModConfig, None] = None
    ablate: Union[AblateConfig, None] = None
    runs_dir: str = "runs"
    source: str = field(default="<dict>", metadata={"internal": True})

    def ensembles(self) -> dict[str, EnsembleBackend]:
        return {k: b for k, b in self.backends.items() if b.type == "ensemble"}


# ----------------------------------------------------------------------------- parsing

def _parse_backends(data: Any, ctx: Ctx) -> dict[str, Backend]:
    if not isinstance(data, dict) or not data:
        raise ctx.error("backends", "expected a non-empty object {name: backend}")
    out = {}
    for name, b in data.items():
        where = f"backends.{name}"
        if not isinstance(b, dict) or "type" not in b:
            raise ctx.error(where, "each backend needs \"type\": one of " + ", ".join(BACKEND_TYPES))
        kind = BACKEND_TYPES.get(b["type"])
        if kind is None:
            import difflib
            close = difflib.get_close_matches(str(b["type"]), list(BACKEND_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.error(f"{where}.type", f"unknown backend type {b['type']!r}{hint}; use one of "
                            + ", ".join(BACKEND_TYPES))
        out[name] = parse_dataclass(kind.schema, b, where, ctx)
    return out


def parse_config(data: dict, source: str = "<dict>", check_paths: bool = True) -> Config:
    """Validate a config dict. ``check_paths``: model directories must exist (set False for
    commands that create them, e.g. `dln-ens zoo`)."""
    ctx = Ctx(source)
    data = strip_comments(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    raw_backends = data.get("backends")
    rest = {k: v for k, v in data.items() if k != "backends"}
    rest["backends"] = {}
    cfg = parse_dataclass(Config, rest, "", ctx)
    if raw_backends is None:
        raise ctx.error("backends", "missing required key; add \"backends\": {name: {\"type\": \"hf\", \"path\": ...}}")
    cfg.backends = _parse_backends(raw_backends, ctx)
    cfg.source = source
    _check_references(cfg, check_context(cfg, check_paths))
    return cfg


def check_context(cfg: Config, check_paths: bool = True) -> CheckContext:
    return CheckContext(cfg.source, cfg.backends, BACKEND_TYPES, check_paths)


def _check_references(cfg: Config, ctx: CheckContext) -> None:
    for name, b in cfg.backends.items():
        BACKEND_TYPES[b.type].check(b, name, ctx)
    if cfg.eval is not None:
        for i, n in enumerate(cfg.eval.backends):
            ctx.need(f"eval.backends[{i}]", n)
        for t in cfg.eval.instructions:
            if t not in cfg.eval.tasks:
                raise ctx.error(f"eval.instructions.{t}", f"not one of eval.tasks {cfg.eval.tasks}")
    if cfg.dln is not None:
        try:
            check_dln_config(cfg.dln)
        except ConfigError as e:
            raise ConfigError(f"{ctx.source}: {e}") from None
        for i, s in enumerate(cfg.dln.systems):
            for part in ("backend", "hidden_backend", "proposer", "posterior"):
                ctx.need(f"dln.systems[{i}].{part}", getattr(s, part) or None)
            if not s.backend:
                raise ctx.error(f"dln.systems[{i}].backend", "missing; name the backend that runs the layers")
    if cfg.tune_mod is not None and cfg.tune_mod.backend:
        ctx.need("tune_mod.backend", cfg.tune_mod.backend, ("mod",))
    if cfg.ablate is not None:
        _check_ablate(cfg, ctx)


def _check_ablate(cfg: Config, ctx: CheckContext) -> None:
    """Every grid cell's options are checked as the ensemble would check them."""
    from dln_ens.ablate import ensemble_options, expand
    from dln_ens.fusion.base import SettingsError
    ab = cfg.ablate
    if not ab.backends or not ab.variants:
        raise ctx.error("ablate", "needs \"backends\": [ensemble backends] and \"variants\": "
                                  "[{\"method\": \"deepen\"}, ...]")
    for key in ("batch_size", "max_new_tokens"):
        if getattr(ab, key) < 1:
            raise ctx.error(f"ablate.{key}", f"must be at least 1, got {getattr(ab, key)}")
    if ab.num_examples is not None and ab.num_examples < 1:
        raise ctx.error("ablate.num_examples", "must be at least 1 (or null: the whole split)")
    for t in ab.instructions:
        if t not in ab.tasks:
            raise ctx.error(f"ablate.instructions.{t}", f"not one of ablate.tasks {ab.tasks}")
    for j, spec in enumerate(ab.variants):
        for k, name in enumerate(spec.backends or ()):
            if name not in ab.backends:
                raise ctx.error(f"ablate.variants[{j}].backends[{k}]", f"{name!r} is not one of ablate.backends "
                                                                         f"{ab.backends}")
    for i, name in enumerate(ab.backends):
        b = ctx.need(f"ablate.backends[{i}]", name, ("ensemble",))
        for j, spec in enumerate(ab.variants):
            if spec.backends and name not in spec.backends:
                continue
            for cell in expand(spec):
                try:
                    ensemble_options(b, cell).check(b.members)
                except (SettingsError, TypeError) as e:
                    key = getattr(e, "key", None)
                    where = f"ablate.variants[{j}]" + (f".{key}" if key else "")
                    raise ctx.error(where, f"{e} (in cell {cell})") from None


def check_dln_config(d: DLNConfig, where: str = "dln") -> None:
    """Value checks of a DLN section (also run by `run_dln` for configs built in Python)."""
    if d.proposal_max_examples is not None and d.proposal_max_examples < 1:
        raise ConfigError(f"key '{where}.proposal_max_examples': must be at least 1 or null")
    for key, low in (("iters", 0), ("batch_size", 1), ("num_p_samples", 1), ("num_h_samples", 0),
                     ("val_freq", 1), ("memory_size", 0), ("hidden_max_new_tokens", 1),
                     ("output_max_new_tokens", 1), ("proposal_max_new_tokens", 1)):
        if getattr(d, key) < low:
            raise ConfigError(f"key '{where}.{key}': must be at least {low}, got {getattr(d, key)}")
    if d.posterior_temp <= 0:
        raise ConfigError(f"key '{where}.posterior_temp': must be > 0")
    for key in ("trust_factor", "logp_penalty", "proposal_temperature", "h_temperature"):
        if getattr(d, key) < 0:
            raise ConfigError(f"key '{where}.{key}': must be >= 0")
    if not d.systems:
        raise ConfigError(f"key '{where}.systems': empty; add e.g. {{\"name\": \"dln1\", \"layers\": 1, "
                          f"\"backend\": \"<backend name>\"}}")
    names = [s.name for s in d.systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"key '{where}.systems': system names must be unique, got {names}")


def load_config(path: str | os.PathLike, check_paths: bool = True) -> Config:
    path = str(path)
    return parse_config(read_json_with_comments(path), source=path, check_paths=check_paths)
