"""Config validation: every mistake fails before any model loads, naming file, key and fix."""
import json
from pathlib import Path

import pytest

from dln_ens.backends import BackendPool, describe_backend
from dln_ens.config import ConfigError, config_to_dict, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def fake_model_dir(tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return d


def write(tmp_path: Path, data: dict | str, name: str = "c.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def base_conf(model: Path) -> dict:
    return {"name": "t", "backends": {
        "a": {"type": "hf", "path": str(model)},
        "b": {"type": "hf", "path": str(model)},
        "ens": {"type": "ensemble", "members": ["a", "b"], "main": "a", "matrices": "matrices/ab"}},
        "eval": {"tasks": ["navigate"], "backends": ["a", "ens"]}}


def test_valid_config_resolves_types_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, base_conf(fake_model_dir(tmp_path))))
    ens = cfg.backends["ens"]
    assert (ens.method, ens.fusion, ens.topk, ens.temperature) == ("deepen", {}, 64, 100.0)
    assert describe_backend(cfg, "ens") | {} == {
        "backend": "ens", "type": "ensemble", "members": "a+b", "main": "a", "method": "deepen",
        "score_mode": "auto", "weights": "uniform", "weighting": "uniform", "lr": 0.15, "steps": 5, "tail_mass": 1e-4,
        "max_support": 256, "matrix": "sparse k=64"}
    assert cfg.eval.backends == ["a", "ens"]
    # the resolved config is plain JSON and parses back to the same thing
    again = parse_config(json.loads(json.dumps(config_to_dict(cfg))), check_paths=False)
    assert config_to_dict(again) == config_to_dict(cfg) | {}


@pytest.mark.parametrize("mutate, key, words", [
    (lambda c: c["backends"]["a"].update(pth="x"), "backends.a.pth", "did you mean 'path'"),
    (lambda c: c["backends"]["ens"].update(fusion={"lr": "fast"}), "backends.ens.fusion.lr", "expected a number"),
    (lambda c: c["backends"]["ens"].update(fusion={"steps": 2.5}), "backends.ens.fusion.steps", "expected an integer"),
    (lambda c: c["backends"]["ens"].update(fusion={"lr": float("nan")}), "backends.ens.fusion.lr", "finite"),
    (lambda c: c["backends"]["ens"].update(fusion={"lr": -1}), "backends.ens.fusion.lr", "at least 0"),
    (lambda c: c["backends"]["ens"].update(fusion={"topk": 3}), "backends.ens.fusion.topk", "unknown key"),
    (lambda c: c["backends"]["ens"].update(method="union", fusion={"topk": 0}), "backends.ens.fusion.topk", "at least 1"),
    (lambda c: c["backends"]["ens"].update(weights={"a": 1.0, "b": float("inf")}), "backends.ens.weights.b", "finite"),
    (lambda c: c["backends"]["ens"].update(weights={"a": 0.0, "b": 0.0}), "backends.ens.weights", "sum to 0"),
    (lambda c: c["backends"]["ens"].update(members=["a", "ens"]), "backends.ens.members[1]", "cannot be an ensemble member"),
    (lambda c: c["backends"]["ens"].update(method="mean"), "backends.ens.method", "deepen"),
    (lambda c: c["backends"]["ens"].update(members=["a", "c"]), "backends.ens.members[1]", "unknown backend 'c'"),
    (lambda c: c["backends"]["ens"].update(main="z"), "backends.ens.main", "not one of the members"),
    (lambda c: c["backends"]["a"].update(type="hff"), "backends.a.type", "did you mean 'hf'"),
    (lambda c: c["backends"]["a"].pop("path"), "backends.a.path", "missing required key"),
    (lambda c: c["eval"].update(backends=["nope"]), "eval.backends[0]", "unknown backend"),
    (lambda c: c.update(evaluation={}), "evaluation", "unknown key"),
    (lambda c: c["backends"].update(m={"type": "mod", "base": "ens"}), "backends.m.base", "it must be one of: hf"),
    (lambda c: c["backends"].update(u={"type": "class", "class": "no_colon"}), "backends.u.class", "package.module:ClassName"),
    (lambda c: c.update(dln={"systems": [{"name": "s", "backend": "a"}], "iters": -1}), "dln.iters", "at least 0"),
    (lambda c: c.update(dln={"systems": [{"name": "s", "backend": "zz"}]}), "dln.systems[0].backend", "unknown backend"),
    (lambda c: c.update(dln={"systems": []}), "dln.systems", "empty"),
])
def test_mistakes_name_file_key_and_fix(tmp_path, mutate, key, words):
    conf = base_conf(fake_model_dir(tmp_path))
    mutate(conf)
    path = write(tmp_path, conf)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{key}'" in msg and words in msg, msg


def test_missing_model_path_and_incomplete_dirs(tmp_path):
    conf = base_conf(tmp_path / "absent")
    with pytest.raises(ConfigError, match="does not exist.*dln-ens zoo"):
        load_config(write(tmp_path, conf))
    d = fake_model_dir(tmp_path, "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no weights"):
        load_config(write(tmp_path, base_conf(d)))
    d = fake_model_dir(tmp_path, "notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no a tokenizer|has no .*tokenizer"):
        load_config(write(tmp_path, base_conf(d)))


def test_comments_and_invalid_json(tmp_path):
    model = fake_model_dir(tmp_path)
    text = "{\n  // a comment line\n  \"name\": \"t\",\n  \"_comment\": \"ignored\",\n" \
           f"  \"backends\": {{\"a\": {{\"type\": \"hf\", \"path\": \"{model}\", \"//\": \"note\"}}}}\n}}\n"
    assert load_config(write(tmp_path, text)).backends["a"].path == str(model)
    with pytest.raises(ConfigError, match=r"c.json:3:\d+: invalid JSON"):
        load_config(write(tmp_path, "{\n\"name\": \"t\",\n\"backends\": {,}\n}"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


class ScriptedLM:
    """A user's own backend, plugged in by import path."""
    def __init__(self, name="scripted", answer="Yes"):
        self.name, self.answer = name, answer

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, seed=None):
        from dln_ens import Generation
        return [Generation(self.answer, 0.0, 1) for _ in prompts]

    def score(self, contexts, targets):
        from dln_ens import Score
        return [Score(0.0, 1) for _ in contexts]

    def next_token_logprobs(self, contexts, candidates):
        import numpy as np
        return np.zeros((len(contexts), len(candidates)))


def test_user_class_backend_by_import_path():
    conf = {"name": "t", "backends": {"mine": {"type": "class", "class": "test_config:ScriptedLM",
                                               "kwargs": {"answer": "No"}}}}
    pool = BackendPool(parse_config(conf))
    lm = pool.get("mine")
    assert lm.name == "mine" and lm.generate(["x"], max_new_tokens=1)[0].text == "No"
    bad = {"name": "t", "backends": {"mine": {"type": "class", "class": "test_config:Nope"}}}
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        BackendPool(parse_config(bad))
    bad["backends"]["mine"]["class"] = "no_such_module_xyz:X"
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        BackendPool(parse_config(bad))
    bad["backends"]["mine"]["class"] = "json:JSONDecoder"
    with pytest.raises(ConfigError, match="does not implement the LanguageModel protocol"):
        BackendPool(parse_config(bad))


@pytest.mark.parametrize("conf", sorted((REPO / "conf").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(conf):
    load_config(conf, check_paths=False)


def test_a_protocol_only_class_cannot_be_an_ensemble_member(tmp_path):
    """The member contract (`LocalMember`) is checked before any model loads, naming the
    backend and what it lacks."""
    conf = base_conf(fake_model_dir(tmp_path))
    conf["backends"]["mine"] = {"type": "class", "class": "test_config:ScriptedLM"}
    conf["backends"]["ens"]["members"] = ["a", "mine"]
    cfg = parse_config(conf)      # the type may be a member; whether this class can needs its import
    with pytest.raises(ConfigError) as e:
        BackendPool(cfg)
    msg = str(e.value)
    assert "backends.ens.members[1]" in msg and "'mine'" in msg and "last_logits" in msg, msg
