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
from dln_ens.backend_types.hf import HFBackend, require_model_dir
from dln_ens.backend_types.mod import ModBackend
from dln_ens.backend_types.user_class import ClassBackend
from dln_ens.checks import check_name
from dln_ens.confparse import (ConfigError, Ctx, above, at_least, check_fields, config_to_dict, parse_dataclass,
                               read_json_with_comments, strip_comments)

__all__ = ["Config", "ConfigError", "ZooConfig", "EvalConfig", "DLNConfig", "DLNSystem", "TuneModConfig",
           "AblateConfig", "AblateVariant",
           "HFBackend", "ModBackend", "EnsembleBackend", "ClassBackend", "load_config", "parse_config",
           "config_to_dict", "check_dln_config", "require_model_dir"]


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
    num_examples: Union[int, None] = field(default=None, metadata=at_least(1))     # None = the whole split
    max_new_tokens: int = field(default=16, metadata=at_least(1))
    batch_size: int = field(default=16, metadata=at_least(1))
    # task name -> the instruction to evaluate under (default: the task's own instruction)
    instructions: dict[str, str] = field(default_factory=dict)
    class_aggregation: Literal["sum", "max"] = "sum"   # class scoring as in the dln section
    space_variants: Literal["sum", "max"] = "sum"


@dataclass
class DLNSystem:
    """One DLN to train: its depth and which backend runs each part."""
    name: str = field(metadata={"name": True})
    layers: Literal[1, 2] = 1
    backend: str = ""                # runs the forward layers
    hidden_backend: Union[str, None] = None    # DLN-2 hidden layer; None = `backend`
    proposer: Union[str, None] = None          # backward prompt proposal; None = `backend`
    posterior: Union[str, None] = None         # posterior sampler of h; None = `backend`
    task: Union[str, None] = None              # None = `dln.task`


@dataclass
class DLNConfig:
    # Sizes default to the offline demo (the `demo` preset: 4+ systems on the zoo's 512-position
    # models, a few minutes on a laptop CPU). `"preset": "paper"` fills every key the config does
    # not set with the DLN reference's per-task settings (`dln_ens/dln/presets.py`). The algorithm's
    # semantics default to the reference's (microsoft/deep-language-networks); the variants below
    # marked "variant" keep other behaviours available by name, never by default.
    preset: Literal["demo", "paper"] = "demo"
    task: str = "navigate"
    systems: list[DLNSystem] = field(default_factory=list)
    iters: int = field(default=4, metadata=at_least(0))
    batch_size: int = field(default=4, metadata=at_least(1))
    balance_batch: bool = False     # round-robin over the target classes (the reference's --balance_batch)
    num_p_samples: int = field(default=3, metadata=at_least(1))         # candidates per layer: the current prompt + num_p_samples - 1 proposals
    proposals_include_current: bool = True   # variant False: num_p_samples *new* proposals + current
    rotate_proposal_prompts: bool = True     # proposal i starts from [current, *memory][i % len]; variant False: current
    num_h_samples: int = field(default=2, metadata=at_least(0))         # posterior samples of h per example
    posterior_include_forward_h: bool = False   # variant True: the greedy h joins the posterior samples
    val_freq: int = field(default=1, metadata=at_least(1))
    num_dev: Union[int, None] = field(default=20, metadata=at_least(1))
    num_test: Union[int, None] = field(default=50, metadata=at_least(1))
    scoring: Literal["logprob", "accuracy"] = "logprob"
    posterior_temp: float = field(default=1.0, metadata=above(0))
    trust_factor: float = field(default=0.0, metadata=at_least(0))
    logp_penalty: float = field(default=0.0, metadata=at_least(0))
    decay_logp_penalty: bool = True           # linear decay to 0 at the last iteration
    logp_penalty_scale: Literal["batch", "wrong"] = "batch"   # sum over wrong / batch; variant: mean over wrong
    memory_size: int = field(default=2, metadata=at_least(0))
    memory_policy: Literal["improvement", "top"] = "improvement"   # variant "top": best dev prompts of every validation
    tolerance: int = field(default=-1, metadata=at_least(-1))            # reload the best prompts after this many validations without gain; -1 = never
    held_out_prompt_ranking: bool = False
    held_out_mode: Literal["per_proposal", "split"] = "per_proposal"   # variant "split": one half proposes, the other ranks
    skip_error_free_batches: bool = False    # variant True: no update without errors (DLN-1 log-prob scoring too)
    rewrite_wrong_only: bool = False
    strip_options_for_hidden: bool = False   # the hidden layer reads the input without its "Options:" tail
    class_aggregation: Literal["sum", "max"] = "sum"   # over a class's verbalizer alternatives "a|A"
    space_variants: Literal["sum", "max"] = "sum"      # over a verbalizer's forms " a" / "a"; variant "max"
    hidden_max_new_tokens: int = field(default=48, metadata=at_least(1))
    hidden_stop_at_newline: bool = False     # variant True: h ends at its first newline
    output_max_new_tokens: int = field(default=16, metadata=at_least(1))
    proposal_max_new_tokens: int = field(default=32, metadata=at_least(1))
    proposal_temperature: float = field(default=0.7, metadata=at_least(0))
    h_temperature: float = field(default=0.7, metadata=at_least(0))
    templates: str = "v1"
    template_dir: Union[str, None] = None   # a user folder of extra templates
    seed: int = 0
    # template per role: "name" (version `templates`) or "name:version"
    output_template: str = "classify_forward"      # DLN-1 output layer
    residual_template: str = "classify_residual"   # DLN-2 output layer (input + h)
    hidden_template: str = "suffix_forward_tbs:v2"  # DLN-2 hidden layer (prompt after the input); v1: before
    # the paper's backward template is "q_action_prompt" (v1); the compact version fits 512 positions
    proposal_template: str = "q_action_prompt:v1-short"
    # q(h | x, y); "a|b" draws one of the templates per sample (seeded), as the reference does
    posterior_template: str = "suffix_forward_tbs_y:v2|suffix_forward_tbs:v2"
    proposal_max_examples: Union[int, None] = field(default=2, metadata=at_least(1))   # examples shown per proposal (errors first); None = batch
    hidden_prompt: Union[str, None] = ""     # initial DLN-2 first-layer prompt; None = task instruction
    output_prompt: Union[str, None] = None   # initial output-layer prompt; None = task instruction
    length_normalize: bool = True            # free-text log-likelihoods per token (DLN scorer)
    baseline_shots: list[int] = field(default_factory=lambda: [0])   # zero/k-shot rows in the summary
    task_kwargs: dict = field(default_factory=dict)   # passed to load_task (e.g. root, seed)
    # keys the config file set (the paper preset fills the others); filled by the parser
    set_keys: list[str] = field(default_factory=list, metadata={"internal": True})


@dataclass
class LoraSettings:
    """LoRA adapters (peft) trained with a MoD head by `tune-mod` (``tune_mod.lora``)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Union[list[str], None] = None   # None = per architecture (dln_ens/mod/arch.py)
    layers: Literal["all", "late"] = "all"           # "late" = only the MoD member's last k_last layers
    lr: Union[float, None] = None                    # None = tune_mod.lr


@dataclass
class TuneModConfig:
    backend: str = ""                # a `mod` backend; its head is written beside its base
    task: str = "facts_qa"
    epochs: int = field(default=3, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))
    lambda_kd: float = field(default=0.1, metadata=at_least(0))
    batch_size: int = field(default=16, metadata=at_least(1))
    patience: int = field(default=2, metadata=at_least(1))
    lora: Union[LoraSettings, Literal[False], None] = None   # null or false = MoD head only (base frozen)
    train_head: bool = True                        # false (with lora, k_last 1): plain LoRA, head frozen
    seed: int = 0
    loss_on: Literal["target", "all"] = "target"   # answer tokens only, or every token
    max_train_examples: Union[int, None] = field(default=None, metadata=at_least(1))   # None = the whole train split
    max_dev_examples: Union[int, None] = field(default=200, metadata=at_least(1))      # held-out loss for early stopping


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
    name: str = field(metadata={"name": True})   # the run directory's name (runs/<name>/)
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
        ctx.check(where, check_name, name, note=" (backend names name files and folders)")
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
    if cfg.dln is not None:
        cfg.dln.set_keys = sorted(rest["dln"])
    _check_references(cfg, check_context(cfg, check_paths))
    return cfg


def check_context(cfg: Config, check_paths: bool = True) -> CheckContext:
    return CheckContext(cfg.source, cfg.backends, BACKEND_TYPES, check_paths)


def check_names(cfg: Config) -> None:
    """The run name, backend names and DLN system names of a config (built in Python or read)."""
    ctx = Ctx(cfg.source)
    for where, name in ([("name", cfg.name)] + [(f"backends.{n}", n) for n in cfg.backends]
                        + [(f"dln.systems[{i}].name", s.name) for i, s in enumerate(cfg.dln.systems if cfg.dln else [])]):
        ctx.check(where, check_name, name, note=" (it names files and folders)")


def _check_references(cfg: Config, ctx: CheckContext) -> None:
    for name, b in cfg.backends.items():
        BACKEND_TYPES[b.type].check(b, name, ctx)
    _check_shared_matrices(cfg, ctx)
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
    if cfg.tune_mod is not None:
        if cfg.tune_mod.backend:
            ctx.need("tune_mod.backend", cfg.tune_mod.backend, ("mod",))
        try:
            check_tune_mod_config(cfg.tune_mod)
        except ConfigError as e:
            raise ConfigError(f"{ctx.source}: {e}") from None
    if cfg.ablate is not None:
        _check_ablate(cfg, ctx)


_MATRIX_SETTINGS = ("members", "temperature", "topk", "num_anchors", "anchors")


def _check_shared_matrices(cfg: Config, ctx: CheckContext) -> None:
    """Ensembles whose methods read matrices may share a matrices folder only with the same
    members and build settings (else each `mat` rebuilds the other's matrices, and loading
    refuses them)."""
    from pathlib import Path
    first: dict[Path, str] = {}
    for name, b in cfg.ensembles().items():
        if not b.uses_matrices():
            continue
        folder = Path(b.matrices).resolve()
        if folder not in first:
            first[folder] = name
            continue
        other = cfg.backends[first[folder]]
        value = lambda x, k: sorted(x.members) if k == "members" else getattr(x, k)  # noqa: E731
        differ = [k for k in _MATRIX_SETTINGS if value(b, k) != value(other, k)]
        if differ:
            raise ctx.error(f"backends.{name}.matrices", f"{b.matrices} is also the matrices folder of "
                            f"ensemble {first[folder]!r}, which differs in {', '.join(differ)}; each build would "
                            f"replace the other's matrices. Give each ensemble its own folder")


def check_tune_mod_config(t: TuneModConfig, where: str = "tune_mod") -> None:
    """Value checks of a tune_mod section (also run by `tune_mod` for settings built in Python)."""
    check_fields(t, where)   # the range metadata of every field
    if not t.train_head and not t.lora:
        raise ConfigError(f"key '{where}.train_head': false leaves nothing to train without LoRA; "
                          f"add \"lora\": {{\"r\": 8}} or set \"train_head\": true")
    if t.lora:
        check_lora_settings(t.lora, f"{where}.lora")


def check_lora_settings(s: LoraSettings, where: str = "tune_mod.lora") -> None:
    if s.r < 1:
        raise ConfigError(f"key '{where}.r': the LoRA rank must be at least 1, got {s.r}")
    if s.alpha <= 0:
        raise ConfigError(f"key '{where}.alpha': must be > 0 (the adapter is scaled by alpha / r), got {s.alpha}")
    if not 0 <= s.dropout < 1:
        raise ConfigError(f"key '{where}.dropout': must be in [0, 1), got {s.dropout}")
    if s.target_modules is not None and (not s.target_modules or not all(s.target_modules)):
        raise ConfigError(f"key '{where}.target_modules': list module names such as [\"q_proj\", \"v_proj\"], "
                          f"or null for the architecture's default")
    if s.lr is not None and s.lr <= 0:
        raise ConfigError(f"key '{where}.lr': must be > 0, or null for tune_mod.lr")


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
    check_fields(d, where)   # the range metadata of every field
    if any(k < 0 for k in d.baseline_shots):
        raise ConfigError(f"key '{where}.baseline_shots': shots must be >= 0, got {d.baseline_shots}")
    if not d.systems:
        raise ConfigError(f"key '{where}.systems': empty; add e.g. {{\"name\": \"dln1\", \"layers\": 1, "
                          f"\"backend\": \"<backend name>\"}}")
    names = [s.name for s in d.systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"key '{where}.systems': system names must be unique, got {names}")


def load_config(path: str | os.PathLike, check_paths: bool = True) -> Config:
    path = str(path)
    return parse_config(read_json_with_comments(path), source=path, check_paths=check_paths)
