"""Typed, validated configuration (``conf/*.json``).

The whole file is checked before any model loads: an unknown key (with a did-you-mean), a wrong
type, a missing required key, a model path that does not exist or an ensemble naming an unknown
member fails with a ``ConfigError`` naming the file, the key path and the fix.

JSON with comments: lines whose first non-blank characters are ``//`` are ignored, and so are
keys named ``"//"`` or starting with ``"_comment"``. Relative paths resolve against the working
directory the command runs in (the repository root for ``sh/*.sh``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from dln_ens.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, with file, key path and how to fix it in the message."""


# ----------------------------------------------------------------------------- schema

@dataclass
class ZooConfig:
    dir: str = "models/zoo"          # where `dln-ens zoo` saves the tiny models
    size: Literal["default", "tiny"] = "default"
    seed: int = 0


@dataclass
class HFBackend:
    """One local transformers model (`HFLanguageModel.from_pretrained`)."""
    type: Literal["hf"]
    path: str
    device: str = "cpu"
    dtype: str = "auto"
    device_map: Union[str, dict, None] = None
    trust_remote_code: bool = False
    batch_size: int = 16


@dataclass
class ModBackend:
    """A Mixture-of-Depths member over an `hf` backend (`DepthEnsembleLanguageModel`)."""
    type: Literal["mod"]
    base: str                        # name of an `hf` backend in this config
    head: Union[str, None] = None    # directory written by `dln-ens tune-mod`; None = untrained
    k_last: int = 2
    router: Literal["learned", "uniform"] = "learned"
    top_k: Union[int, None] = None


@dataclass
class EnsembleBackend:
    """DeePEn-style fusion of members with different vocabularies (`EnsembleLanguageModel`)."""
    type: Literal["ensemble"]
    members: list[str]               # names of `hf` / `mod` / `class` backends
    main: str                        # the member whose vocabulary the fused distribution uses
    matrices: str                    # directory built by `sh sh/mat.sh`
    weights: Union[dict[str, float], None] = None   # None = uniform
    method: Literal["deepen", "main", "union"] = "deepen"
    lr: float = 0.15
    steps: int = 5
    union_topk: int = 10
    score_mode: Literal["exact", "fast"] = "exact"
    compute_device: str = "cpu"
    # matrix build (`dln-ens mat`)
    temperature: float = 100.0
    topk: Union[int, None] = 64      # None = dense matrices
    min_anchors: int = 100
    num_anchors: Union[int, None] = None   # keep the n most consistent anchors; None = all
    anchors: Union[str, None] = None       # a fixed anchors.json for controlled comparisons


@dataclass
class ClassBackend:
    """A user's own `LanguageModel`, named by import path ``package.module:Name``."""
    type: Literal["class"]
    class_: str = field(metadata={"key": "class"})
    kwargs: dict = field(default_factory=dict)


Backend = Union[HFBackend, ModBackend, EnsembleBackend, ClassBackend]
_BACKEND_TYPES = {"hf": HFBackend, "mod": ModBackend, "ensemble": EnsembleBackend, "class": ClassBackend}


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
    # Sizes default to the offline demo (the `demo` preset: 4+ systems on the zoo's 512-position
    # models, a few minutes on a laptop CPU). `"preset": "paper"` fills every key the config does
    # not set with the DLN reference's per-task settings (`dln_ens/dln/presets.py`). The algorithm's
    # semantics default to the reference's (microsoft/deep-language-networks); the variants below
    # marked "variant" keep other behaviours available by name, never by default.
    preset: Literal["demo", "paper"] = "demo"
    task: str = "navigate"
    systems: list[DLNSystem] = field(default_factory=list)
    iters: int = 4
    batch_size: int = 4
    balance_batch: bool = False     # round-robin over the target classes (the reference's --balance_batch)
    num_p_samples: int = 3          # candidates per layer: the current prompt + num_p_samples - 1 proposals
    proposals_include_current: bool = True   # variant False: num_p_samples *new* proposals + current
    rotate_proposal_prompts: bool = True     # proposal i starts from [current, *memory][i % len]; variant False: current
    num_h_samples: int = 2          # posterior samples of h per example
    posterior_include_forward_h: bool = False   # variant True: the greedy h joins the posterior samples
    val_freq: int = 1
    num_dev: Union[int, None] = 20
    num_test: Union[int, None] = 50
    scoring: Literal["logprob", "accuracy"] = "logprob"
    posterior_temp: float = 1.0
    trust_factor: float = 0.0
    logp_penalty: float = 0.0
    decay_logp_penalty: bool = True           # linear decay to 0 at the last iteration
    logp_penalty_scale: Literal["batch", "wrong"] = "batch"   # sum over wrong / batch; variant: mean over wrong
    memory_size: int = 2
    memory_policy: Literal["improvement", "top"] = "improvement"   # variant "top": best dev prompts of every validation
    tolerance: int = -1             # reload the best prompts after this many validations without gain; -1 = never
    held_out_prompt_ranking: bool = False
    held_out_mode: Literal["per_proposal", "split"] = "per_proposal"   # variant "split": one half proposes, the other ranks
    skip_error_free_batches: bool = False    # variant True: no update without errors (DLN-1 log-prob scoring too)
    rewrite_wrong_only: bool = False
    strip_options_for_hidden: bool = False   # the hidden layer reads the input without its "Options:" tail
    class_aggregation: Literal["sum", "max"] = "sum"   # over a class's verbalizer alternatives "a|A"
    hidden_max_new_tokens: int = 48
    hidden_stop_at_newline: bool = False     # variant True: h ends at its first newline
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
    hidden_template: str = "suffix_forward_tbs:v2"  # DLN-2 hidden layer (prompt after the input); v1: before
    # the paper's backward template is "q_action_prompt" (v1); the compact version fits 512 positions
    proposal_template: str = "q_action_prompt:v1-short"
    # q(h | x, y); "a|b" draws one of the templates per sample (seeded), as the reference does
    posterior_template: str = "suffix_forward_tbs_y:v2|suffix_forward_tbs:v2"
    proposal_max_examples: Union[int, None] = 2    # examples shown per proposal (errors first); None = batch
    hidden_prompt: Union[str, None] = ""     # initial DLN-2 first-layer prompt; None = task instruction
    output_prompt: Union[str, None] = None   # initial output-layer prompt; None = task instruction
    length_normalize: bool = True            # free-text log-likelihoods per token (DLN scorer)
    baseline_shots: list[int] = field(default_factory=lambda: [0])   # zero/k-shot rows in the summary
    task_kwargs: dict = field(default_factory=dict)   # passed to load_task (e.g. root, seed)
    # keys the config file set (the paper preset fills the others); filled by the parser
    set_keys: list[str] = field(default_factory=list, metadata={"internal": True})


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
class Config:
    name: str
    backends: dict[str, Backend]
    zoo: Union[ZooConfig, None] = None
    eval: Union[EvalConfig, None] = None
    dln: Union[DLNConfig, None] = None
    tune_mod: Union[TuneModConfig, None] = None
    runs_dir: str = "runs"
    source: str = field(default="<dict>", metadata={"internal": True})

    def ensembles(self) -> dict[str, EnsembleBackend]:
        return {k: b for k, b in self.backends.items() if isinstance(b, EnsembleBackend)}


# ----------------------------------------------------------------------------- parsing

def _strip_comments(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_comments(v) for k, v in data.items()
                if not (k == "//" or k.startswith("_comment"))}
    if isinstance(data, list):
        return [_strip_comments(v) for v in data]
    return data


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin is not None:
        return {list: "a list", dict: "an object"}.get(origin, str(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            dict: "an object", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str, ctx: "_Ctx") -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, ctx)
            except ConfigError as e:
                errors.append(e)
        if len([a for a in args if a is not type(None)]) == 1 and errors:
            raise errors[0]
        raise ctx.error(where, f"expected {_type_name(tp)}, got {json.dumps(value)[:80]}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
                isinstance(a, bool) for a in typing.get_args(tp) if a == value):
            choices = ", ".join(json.dumps(a) for a in typing.get_args(tp))
            raise ctx.error(where, f"{json.dumps(value)} is not allowed; use one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where, ctx)
    if origin is list:
        if not isinstance(value, list):
            raise ctx.error(where, f"expected a list, got {json.dumps(value)[:80]}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(where, f"expected an object, got {json.dumps(value)[:80]}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, vt, f"{where}.{k}", ctx) for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, dict, list):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config schema: unsupported type {tp}")
    raise ctx.error(where, f"expected {_type_name(tp)}, got {json.dumps(value)[:80]}")


def _parse_dataclass(cls: type, data: Any, where: str, ctx: "_Ctx") -> Any:
    if not isinstance(data, dict):
        raise ctx.error(where, f"expected an object with keys {', '.join(_key(f) for f in _fields(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in _fields(cls)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            raise ctx.error(f"{where}.{k}" if where else k, f"unknown key; {hint}")
    kwargs = {}
    for k, f in fields.items():
        sub = f"{where}.{k}" if where else k
        if k in data:
            kwargs[f.name] = _coerce(data[k], hints[f.name], sub, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.error(sub, f"missing required key; add \"{k}\": {_type_name(hints[f.name])}")
    return cls(**kwargs)


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@dataclass
class _Ctx:
    source: str

    def error(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: key '{where}': {msg}")


def _parse_backends(data: Any, ctx: _Ctx) -> dict[str, Backend]:
    if not isinstance(data, dict) or not data:
        raise ctx.error("backends", "expected a non-empty object {name: backend}")
    out = {}
    for name, b in data.items():
        where = f"backends.{name}"
        if not isinstance(b, dict) or "type" not in b:
            raise ctx.error(where, "each backend needs \"type\": one of " + ", ".join(_BACKEND_TYPES))
        cls = _BACKEND_TYPES.get(b["type"])
        if cls is None:
            close = difflib.get_close_matches(str(b["type"]), list(_BACKEND_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ctx.error(f"{where}.type", f"unknown backend type {b['type']!r}{hint}; use one of "
                            + ", ".join(_BACKEND_TYPES))
        out[name] = _parse_dataclass(cls, b, where, ctx)
    return out


def parse_config(data: dict, source: str = "<dict>", check_paths: bool = True) -> Config:
    """Validate a config dict. ``check_paths``: model directories must exist (set False for
    commands that create them, e.g. `dln-ens zoo`)."""
    ctx = _Ctx(source)
    data = _strip_comments(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    raw_backends = data.get("backends")
    rest = {k: v for k, v in data.items() if k != "backends"}
    rest["backends"] = {}
    cfg = _parse_dataclass(Config, rest, "", ctx)
    if raw_backends is None:
        raise ctx.error("backends", "missing required key; add \"backends\": {name: {\"type\": \"hf\", \"path\": ...}}")
    cfg.backends = _parse_backends(raw_backends, ctx)
    cfg.source = source
    if cfg.dln is not None:
        cfg.dln.set_keys = sorted(rest["dln"])
    _check_references(cfg, ctx, check_paths)
    return cfg


def _check_references(cfg: Config, ctx: _Ctx, check_paths: bool) -> None:
    names = list(cfg.backends)

    def need(where: str, name: str | None, kinds: tuple = ()) -> None:
        if name is None:
            return
        if name not in cfg.backends:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ctx.error(where, f"names unknown backend {name!r}; {hint}defined: {', '.join(names)}")
        if kinds and not isinstance(cfg.backends[name], kinds):
            raise ctx.error(where, f"backend {name!r} is a {cfg.backends[name].type!r} backend; "
                            f"it must be one of: {', '.join(t for t, c in _BACKEND_TYPES.items() if c in kinds)}")

    for name, b in cfg.backends.items():
        where = f"backends.{name}"
        if isinstance(b, HFBackend):
            if check_paths:
                check_model_dir(b.path, f"{ctx.source}: key '{where}.path'")
        elif isinstance(b, ModBackend):
            need(f"{where}.base", b.base, (HFBackend,))
            if b.k_last < 1:
                raise ctx.error(f"{where}.k_last", "must be at least 1")
            if b.top_k is not None and not 1 <= b.top_k <= b.k_last:
                raise ctx.error(f"{where}.top_k", f"must be between 1 and k_last={b.k_last}, or null")
            if check_paths and b.head is not None and not Path(b.head).exists():
                raise ctx.error(f"{where}.head", f"{b.head} does not exist; train it with "
                                f"`dln-ens tune-mod --conf {ctx.source}` or set \"head\": null")
        elif isinstance(b, EnsembleBackend):
            if not b.members:
                raise ctx.error(f"{where}.members", "an ensemble needs at least one member")
            for i, m in enumerate(b.members):
                need(f"{where}.members[{i}]", m, (HFBackend, ModBackend, ClassBackend))
            if b.main not in b.members:
                raise ctx.error(f"{where}.main", f"{b.main!r} is not one of the members {b.members}")
            if b.weights is not None:
                for m in b.weights:
                    if m not in b.members:
                        raise ctx.error(f"{where}.weights.{m}", f"not a member; members: {b.members}")
            if b.steps < 0 or b.lr < 0:
                raise ctx.error(where, "lr and steps must be non-negative")
        elif isinstance(b, ClassBackend):
            if ":" not in b.class_:
                raise ctx.error(f"{where}.class", f"{b.class_!r} must look like 'package.module:ClassName'")
    if cfg.eval is not None:
        for i, n in enumerate(cfg.eval.backends):
            need(f"eval.backends[{i}]", n)
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
                need(f"dln.systems[{i}].{part}", getattr(s, part) or None)
            if not s.backend:
                raise ctx.error(f"dln.systems[{i}].backend", "missing; name the backend that runs the layers")
    if cfg.tune_mod is not None and cfg.tune_mod.backend:
        need("tune_mod.backend", cfg.tune_mod.backend, (ModBackend,))


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
    if d.tolerance < -1:
        raise ConfigError(f"key '{where}.tolerance': must be -1 (never reload) or at least 0")
    if any(k < 0 for k in d.baseline_shots):
        raise ConfigError(f"key '{where}.baseline_shots': shots must be >= 0, got {d.baseline_shots}")
    for key in ("trust_factor", "logp_penalty", "proposal_temperature", "h_temperature"):
        if getattr(d, key) < 0:
            raise ConfigError(f"key '{where}.{key}': must be >= 0")
    if not d.systems:
        raise ConfigError(f"key '{where}.systems': empty; add e.g. {{\"name\": \"dln1\", \"layers\": 1, "
                          f"\"backend\": \"<backend name>\"}}")
    names = [s.name for s in d.systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"key '{where}.systems': system names must be unique, got {names}")


def check_model_dir(path: str, where: str) -> None:
    """A local model directory must exist and hold a config, weights and a tokenizer."""
    from dln_ens.lm.checkpoint import MissingModelError, check_model_dir as check
    try:
        check(path)
    except MissingModelError as e:
        hint = (" Build the zoo with `dln-ens zoo --conf ...` (or `sh sh/mat.sh`), or point the path"
                " at a local Hugging Face checkpoint.") if not Path(path).exists() else ""
        raise ConfigError(f"{where}: {e}.{hint}") from None


def load_config(path: str | os.PathLike, check_paths: bool = True) -> Config:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (try conf/default.json)") from None
    lines = ["" if ln.lstrip().startswith("//") else ln for ln in text.splitlines()]
    try:
        data = json.loads("\n".join(lines))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return parse_config(data, source=path, check_paths=check_paths)


def config_to_dict(cfg: Any) -> Any:
    """The resolved config as plain JSON data (written into each run directory)."""
    if dataclasses.is_dataclass(cfg):
        return {_key(f): config_to_dict(getattr(cfg, f.name)) for f in _fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    return cfg
