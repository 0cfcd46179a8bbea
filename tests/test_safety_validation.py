"""Every number is checked where it is read (config file and Python API), before any model
loads, with the key in the message; names cannot leave their folder (issue 11)."""
import json

import pytest

from dln_ens.checks import SettingError
from dln_ens.config import ConfigError, load_config, parse_config

from test_config import base_conf, fake_model_dir, write


@pytest.mark.parametrize("mutate, key, words", [
    (lambda c: c["backends"]["ens"].update(topk=0), "backends.ens.topk", "at least 1, got 0"),
    (lambda c: c["backends"]["ens"].update(temperature=0), "backends.ens.temperature", "greater than 0, got 0"),
    (lambda c: c["backends"]["ens"].update(temperature=-5.0), "backends.ens.temperature", "greater than 0"),
    (lambda c: c["backends"]["ens"].update(temperature=float("nan")), "backends.ens.temperature", "finite number, got nan"),
    (lambda c: c["backends"]["ens"].update(weights={"a": float("nan"), "b": 1}), "backends.ens.weights.a", "finite number"),
    (lambda c: c["backends"]["ens"].update(weights={"a": float("inf"), "b": 1}), "backends.ens.weights.a", "finite number, got inf"),
    (lambda c: c["backends"]["ens"].update(weights={"a": 0, "b": 0}), "backends.ens.weights", "sum to 0"),
    (lambda c: c["backends"]["ens"].update(weights={"a": 1}), "backends.ens.weights", "no weight for member(s) b"),
    (lambda c: c["backends"]["ens"].update(fusion={"lr": float("nan")}), "backends.ens.fusion.lr", "finite number"),
    (lambda c: c["backends"]["ens"].update(fusion={"steps": 0}), "backends.ens.fusion.steps", "use method \"main\""),
    (lambda c: c["backends"]["a"].update(batch_size=0), "backends.a.batch_size", "at least 1, got 0"),
    (lambda c: c["eval"].update(num_examples=0), "eval.num_examples", "at least 1, got 0"),
    (lambda c: c["eval"].update(max_new_tokens=0), "eval.max_new_tokens", "at least 1, got 0"),
    (lambda c: c["eval"].update(batch_size=0), "eval.batch_size", "at least 1, got 0"),
    (lambda c: c.update(dln={"systems": [{"name": "s", "backend": "a"}], "posterior_temp": float("nan")}),
     "dln.posterior_temp", "finite number"),
    (lambda c: c.update(name="../outside"), "name", "not a safe name"),
    (lambda c: c.update(name="a/b"), "name", "without '/' or '..'"),
    (lambda c: c["backends"].update({"x/../y": {"type": "hf", "path": "m"}}), "backends.x/../y", "not a safe name"),
    (lambda c: c.update(dln={"systems": [{"name": "../s", "backend": "a"}]}), "dln.systems[0].name", "not a safe name"),
])
def test_bad_numbers_and_names_fail_while_reading_the_file(tmp_path, mutate, key, words):
    conf = base_conf(fake_model_dir(tmp_path))
    mutate(conf)
    path = write(tmp_path, json.dumps(conf))     # NaN / Infinity literals, as json.loads accepts them
    with pytest.raises(ConfigError) as err:
        load_config(path)                        # parsing only: no model is ever loaded here
    assert f"key '{key}'" in str(err.value) and words in str(err.value) and str(path) in str(err.value)


def test_python_api_refuses_the_same_values():
    from types import SimpleNamespace
    from dln_ens.ensemble.model import EnsembleLanguageModel
    from dln_ens.lm.sampling import sampling_seeds
    from dln_ens.relrep.build import build_matrices

    members = {"a": SimpleNamespace(), "b": SimpleNamespace()}   # checks come before any member is used
    for kwargs, words in ((dict(lr=float("nan")), "lr must be a finite number, got nan"),
                          (dict(steps=0), "steps is 0, which makes method \"deepen\" the main member alone"),
                          (dict(weights={"a": float("inf"), "b": 1.0}), "weights.a must be a finite number"),
                          (dict(weights={"a": 0.0, "b": 0.0}), "weights sum to 0"),
                          (dict(method="union", topk=0), "topk must be at least 1, got 0")):
        with pytest.raises(SettingError, match=words):
            EnsembleLanguageModel(members, main="a", **kwargs)
    with pytest.raises(SettingError, match="temperature must be a finite number, got nan"):
        sampling_seeds(float("nan"), 0, ["x"])
    for kwargs, words in ((dict(temperature=0.0), "temperature must be greater than 0"),
                          (dict(topk=0), "topk must be at least 1, got 0")):
        with pytest.raises(SettingError, match=words):
            build_matrices(members, "unused", **kwargs)


def test_python_built_dln_settings_are_checked(tmp_path):
    from dln_ens.config import ClassBackend, Config, DLNConfig, DLNSystem
    from dln_ens.dln.run import run_dln
    from dln_fake import FakePool
    cfg = Config(name="r", backends={"fake": ClassBackend(type="class", class_="dln_fake:ScriptedLM")},
                 dln=DLNConfig(task="navigate", posterior_temp=float("nan"), systems=[DLNSystem(name="s", backend="fake")]),
                 runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"key 'dln.posterior_temp': must be a finite number, got nan"):
        run_dln(cfg, FakePool())
    assert not (tmp_path / "r" / "config.json").exists()


def test_generate_with_nan_temperature_is_a_clear_error(tiny_gpt2_dir):
    from dln_ens.lm.hf import HFLanguageModel
    lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(SettingError, match="temperature must be a finite number, got nan"):
        lm.generate(["Input: yes"], max_new_tokens=3, temperature=float("nan"))


def test_python_built_config_with_unsafe_name_writes_nothing(tmp_path):
    from dln_ens.config import ClassBackend, Config, DLNConfig, DLNSystem
    from dln_ens.dln.run import run_dln
    from dln_fake import FakePool
    runs = tmp_path / "runs"
    cfg = Config(name="../escaped", backends={"fake": ClassBackend(type="class", class_="dln_fake:ScriptedLM")},
                 dln=DLNConfig(task="navigate", systems=[DLNSystem(name="s", backend="fake")]), runs_dir=str(runs))
    with pytest.raises(ConfigError, match=r"key 'name': '\.\./escaped' is not a safe name"):
        run_dln(cfg, FakePool())
    assert not (tmp_path / "escaped").exists() and not runs.exists()


def test_valid_values_still_parse(tmp_path):
    conf = base_conf(fake_model_dir(tmp_path))
    conf["backends"]["ens"].update(weights={"a": 0.0, "b": 2}, topk=None, fusion={"steps": 1, "lr": 0.0})
    cfg = parse_config(conf)
    assert cfg.backends["ens"].weights == {"a": 0.0, "b": 2.0} and cfg.backends["ens"].topk is None
