"""Run directories: one run at a time, config.json only after every check, cached results keyed
on fingerprints of the data, the weights and the settings (issue 11)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dln_ens.config import ClassBackend, Config, ConfigError, DLNConfig, DLNSystem, EvalConfig, parse_config
from dln_ens.data.registry import UnknownTaskError, registered_tasks
from dln_ens.data.task import Example, Task
from dln_ens.dln.run import run_dln
from dln_ens.rundir import RunDirLockedError

from dln_fake import FakePool, ScriptedLM

DATA: dict[str, Path] = {}


def _file_task() -> Task:
    """A task read from a JSON file the test may change in place."""
    rows = json.loads(DATA["file"].read_text())
    ex = [Example(r["input"], r["target"]) for r in rows]
    return Task("test/file_task", "Say Yes or No.", ex[:6], ex[6:9], ex[9:], classes=["Yes", "No"])


@pytest.fixture(autouse=True, scope="module")
def _tasks():
    with registered_tasks({"test/file_task": _file_task}):
        yield


@pytest.fixture
def data_file(tmp_path):
    DATA["file"] = tmp_path / "data.json"
    DATA["file"].write_text(json.dumps([{"input": f"item {i}", "target": "Yes" if i % 3 else "No"}
                                        for i in range(14)]))
    return DATA["file"]


def make_cfg(tmp_path, iters=1, systems=None, eval_=None) -> Config:
    return Config(name="run", backends={"fake": ClassBackend(type="class", class_="dln_fake:ScriptedLM")},
                  dln=DLNConfig(task="test/file_task", iters=iters, batch_size=3, num_dev=None, num_test=None,
                                systems=systems or [DLNSystem(name="one", backend="fake")]),
                  eval=eval_, runs_dir=str(tmp_path / "runs"))


def test_second_run_is_refused_at_once_naming_the_holder(tmp_path, data_file):
    run_dir = tmp_path / "runs" / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dln_ens.rundir import lock_run_dir\n"
         "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=rf"{run_dir} is in use by another run \(pid {holder.pid} on "):
            run_dln(make_cfg(tmp_path), FakePool(fake=ScriptedLM("fake")))
        assert not (run_dir / "config.json").exists() and not list(run_dir.glob("dln_*"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    run_dln(make_cfg(tmp_path), FakePool(fake=ScriptedLM("fake")))   # free again
    assert not (run_dir / ".lock.holder.json").exists()


def test_config_json_is_written_only_after_every_check(tmp_path, data_file):
    run_dir = tmp_path / "runs" / "run"
    pool = FakePool(fake=ScriptedLM("fake"))
    run_dln(make_cfg(tmp_path, iters=1), pool)
    assert json.loads((run_dir / "config.json").read_text())["dln"]["iters"] == 1
    with pytest.raises(ConfigError, match="different backends or DLN settings"):
        run_dln(make_cfg(tmp_path, iters=2), pool)            # refused resume
    with pytest.raises(UnknownTaskError, match="unknown task 'test/no_such_task'"):
        run_dln(make_cfg(tmp_path, iters=3, systems=[DLNSystem(name="new", backend="fake"),
                                                     DLNSystem(name="bad", backend="fake", task="test/no_such_task")]),
                pool)
    assert json.loads((run_dir / "config.json").read_text())["dln"]["iters"] == 1
    assert not (run_dir / "dln_new.jsonl").exists()           # the first system did not train either


def test_changed_data_file_refuses_resume_and_recomputes_eval(tmp_path, data_file, monkeypatch):
    import dln_ens.evaluate as ev
    cfg = make_cfg(tmp_path, eval_=EvalConfig(tasks=["test/file_task"], backends=["fake"]))
    run_dir = tmp_path / "runs" / "run"
    pool = FakePool(fake=ScriptedLM("fake"))
    calls = []
    real = ev.predict
    monkeypatch.setattr(ev, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev.evaluate(cfg, pool, run_dir)
    n_first = len(calls)
    ev.evaluate(cfg, pool, run_dir)
    assert len(calls) == n_first                              # unchanged: the cell is reused
    run_dln(cfg, pool)
    rows = json.loads(data_file.read_text())
    rows[10]["target"] = "Yes" if rows[10]["target"] == "No" else "No"
    data_file.write_text(json.dumps(rows))                    # the data file changes in place
    ev.evaluate(cfg, pool, run_dir)
    assert len(calls) > n_first                               # the stale cell is recomputed
    with pytest.raises(ConfigError, match=r"made with other data for task 'test/file_task' \(a data file changed\)"):
        run_dln(cfg, pool)


def test_changed_weights_recompute_the_eval_cell(tmp_path, tiny_gpt2_dir, data_file, monkeypatch):
    import dln_ens.evaluate as ev
    from dln_ens.backends import BackendPool
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    data = {"name": "w", "runs_dir": str(tmp_path / "runs"), "backends": {"m": {"type": "hf", "path": str(model)}},
            "eval": {"tasks": ["test/file_task"], "backends": ["m"], "max_new_tokens": 2}}
    calls = []
    real = ev.predict
    monkeypatch.setattr(ev, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev.evaluate(parse_config(data), BackendPool(parse_config(data)), tmp_path / "runs" / "w")
    ev.evaluate(parse_config(data), BackendPool(parse_config(data)), tmp_path / "runs" / "w")
    n = len(calls)
    from transformers import AutoModelForCausalLM
    import torch
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight.mul_(1.01)       # not the embedding: only a file digest sees it
    m.save_pretrained(model)                                   # same path, new weights
    ev.evaluate(parse_config(data), BackendPool(parse_config(data)), tmp_path / "runs" / "w")
    assert len(calls) > n


def test_large_file_digests_persist_but_never_go_stale(tmp_path, monkeypatch):
    import hashlib
    from dln_ens import fingerprint as fp
    monkeypatch.setenv("DLN_ENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "PERSIST_BYTES", 1000)
    monkeypatch.setattr(fp, "_persisted", None)
    monkeypatch.setattr(fp, "_FILE_MEMO", {})
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 5000)
    want = hashlib.blake2b(b"a" * 5000, digest_size=16).hexdigest()     # independent digest
    assert fp.file_digest(f) == want and (tmp_path / "cache" / "file_digests.json").is_file()
    monkeypatch.setattr(fp, "_FILE_MEMO", {})
    monkeypatch.setattr(fp, "_persisted", None)
    assert fp.file_digest(f) == want                                      # read back from the cache
    with open(f, "r+b") as h:                                             # same size, changed in place
        h.write(b"b")
    assert fp.file_digest(f) == hashlib.blake2b(b"b" + b"a" * 4999, digest_size=16).hexdigest()
