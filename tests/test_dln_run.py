"""run_dln: run directory contents, and an interrupted run resumes to the same result."""
from __future__ import annotations

import json

import pytest

from dln_ens.config import ClassBackend, Config, ConfigError, DLNConfig, DLNSystem
from dln_ens.data.registry import register_task
from dln_ens.data.task import Example, Task
from dln_ens.dln.run import run_dln

from dln_fake import FakePool, ScriptedLM, TokenizingLM


@register_task("test/dln_toy")
def _toy_task(n: int = 24) -> Task:
    ex = [Example(f"item {i} is {'even' if i % 2 == 0 else 'odd'}", "Yes" if i % 3 else "No") for i in range(n)]
    return Task("test/dln_toy", "Say Yes or No.", ex[:12], ex[12:18], ex[18:], classes=["Yes", "No"])


@register_task("test/dln_toy_small")
def _small_toy_task() -> Task:
    full = _toy_task()
    return Task("test/dln_toy_small", "Answer.", full.train[:8], full.train[8:11], full.dev[:4],
                classes=["Yes", "No"])


def test_a_system_can_name_its_own_task(tmp_path):
    cfg = make_cfg(tmp_path, iters=1, systems=[DLNSystem(name="one", layers=1, backend="fake"),
                                               DLNSystem(name="small", layers=1, backend="fake",
                                                         task="test/dln_toy_small")])
    res = run_dln(cfg, FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other")))
    one, small = res["systems"]["one"], res["systems"]["small"]
    assert (one["task"], one["num_dev"], one["num_test"]) == ("test/dln_toy", 6, 6)
    assert (small["task"], small["num_dev"], small["num_test"]) == ("test/dln_toy_small", 3, 4)
    assert "| small | test/dln_toy_small | 1 | fake |" in res["summary"]


def make_cfg(tmp_path, name="toy", **dln):
    d = dict(task="test/dln_toy", iters=3, batch_size=4, num_p_samples=2, num_h_samples=2, val_freq=1,
             num_dev=None, num_test=None, memory_size=2,
             systems=[DLNSystem(name="one", layers=1, backend="fake"),
                      DLNSystem(name="two", layers=2, backend="fake", proposer="other")])
    d.update(dln)
    return Config(name=name, backends={"fake": ClassBackend(type="class", class_="dln_fake:ScriptedLM"),
                                       "other": ClassBackend(type="class", class_="dln_fake:ScriptedLM")},
                  dln=DLNConfig(**d), runs_dir=str(tmp_path))


def comparable(run_dir):
    """Every logged line and the results, without wall-clock fields."""
    out = {}
    for path in sorted(run_dir.glob("dln_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.pop("seconds", None)
            for calls in r.pop("lm_calls", {}).values():
                assert set(calls) == {"generate", "score", "next_token_logprobs"}
        out[path.name] = rows
    for path in sorted(run_dir.glob("traces_*.jsonl")):
        out[path.name] = path.read_text()
    for path in sorted(run_dir.glob("*/output.log")):   # without the time stamps
        out[str(path.relative_to(run_dir))] = [line.split(" - ", 1)[1] for line in path.read_text().splitlines()]
    out["results"] = json.loads((run_dir / "results.json").read_text())
    return out


def test_run_directory_contents(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    res = run_dln(cfg, FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other")))
    run_dir = tmp_path / "toy"
    assert res["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "config.json").read_text())["dln"]["iters"] == 3
    rows = [json.loads(x) for x in (run_dir / "dln_two.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all("dev_acc" in r for r in rows)
    updated = [r for r in rows[1:] if r["updated"]]
    assert updated and all({"p1_candidates", "p2_candidates", "elbo1", "elbo2"} <= set(r) for r in updated)
    for r in updated:       # the chosen prompts are the argmax-objective candidates
        for key in ("p1", "p2"):
            cands = r[f"{key}_candidates"]
            assert r["prompts"][key] == max(cands, key=lambda c: c["objective"])["prompt"]
    best = json.loads((run_dir / "best_prompts.json").read_text())
    assert set(best) == {"one", "two"} and set(best["two"]) == {"p1", "p2"}
    for name, r in res["systems"].items():
        assert r["dev"]["learned"] == max(x["dev_acc"] for x in map(json.loads, (run_dir / f"dln_{name}.jsonl")
                                                                    .read_text().splitlines()))
        assert 0.0 <= r["test"]["learned"] <= 1.0
    summary = (run_dir / "summary.md").read_text()
    assert "| one | test/dln_toy | 1 | fake |" in summary and "| two | test/dln_toy | 2 | fake |" in summary
    assert summary in capsys.readouterr().out
    # the proposer of system "two" is its own backend
    assert any(r["lm_calls"]["other"]["generate"]["calls"] > 0 for r in updated)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    ref_dir = tmp_path / "ref"
    run_dln(make_cfg(tmp_path), FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other")), ref_dir)
    reference = comparable(ref_dir)
    counter = ScriptedLM("fake")
    run_dln(make_cfg(tmp_path), FakePool(fake=counter, other=ScriptedLM("other")), tmp_path / "count")
    total = len(counter.calls)
    for stop_at in (3, total // 2, total - 2):
        run_dir = tmp_path / f"cut{stop_at}"
        with pytest.raises(KeyboardInterrupt):
            run_dln(make_cfg(tmp_path), FakePool(fake=ScriptedLM("fake", fail_after=stop_at),
                                                 other=ScriptedLM("other")), run_dir)
        with open(run_dir / "dln_one.jsonl", "a") as f:   # a crash while appending a line
            f.write('{"system": "one", "iterat')
        run_dln(make_cfg(tmp_path), FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other")), run_dir)
        assert comparable(run_dir) == reference


def test_resume_refuses_a_different_config(tmp_path):
    pool = FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other"))
    run_dln(make_cfg(tmp_path, iters=1), pool)
    with pytest.raises(ConfigError, match="different backends or DLN settings"):
        run_dln(make_cfg(tmp_path, iters=2), pool)
    res = run_dln(make_cfg(tmp_path, iters=2), pool, resume=False)
    assert res["systems"]["one"]["iterations"] == 2


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dln.val_freq"):
        run_dln(make_cfg(tmp_path, val_freq=0), FakePool())


def test_bench_measures_batching_savings():
    from dln_ens.bench.dln import measure
    from dln_ens.data.registry import load_task
    task = load_task("test/dln_toy")
    cfg = DLNConfig(task="test/dln_toy", batch_size=6, num_p_samples=2, num_h_samples=2, memory_size=0)
    for layers in (1, 2):
        batched = measure(ScriptedLM("fake"), layers, cfg, task, iters=2, one_at_a_time=False)
        single = measure(ScriptedLM("fake"), layers, cfg, task, iters=2, one_at_a_time=True)
        assert batched["prompts"] == single["prompts"]          # same work, same choices
        assert batched["updates"] == single["updates"] and 0 <= batched["updates"] <= 2
        assert single["calls"] == single["requests"] == batched["requests"]
        assert batched["calls"] < single["calls"] / 3


def reference_parse(text: str) -> dict:
    """What the DLN reference's read_results.py takes from an output.log (re-implemented)."""
    out = {"init_dev": [], "dev": [], "test": [], "cost": []}
    for i, line in enumerate(text.splitlines()):
        if i == 0:
            out["args"] = json.loads(line[line.find("{"):])
        elif "INIT DEV ACC:" in line:
            out["init_dev"].append(float(line.partition("INIT DEV ACC:")[-1]))
        elif "BEST DEV ACC:" in line:
            out["dev"].append(float(line.partition("BEST DEV ACC:")[-1]))
        elif "TEST ACC:" in line:
            out["test"].append(float(line.partition("TEST ACC:")[-1]))
        elif "COST:" in line:
            out["cost"].append(float(line.partition("COST:")[-1]))
    return out


def test_output_log_traces_tokens_and_baselines(tmp_path):
    fake, other = TokenizingLM("fake"), TokenizingLM("other")
    cfg = make_cfg(tmp_path, baseline_shots=[0, 2])
    res = run_dln(cfg, FakePool(fake=fake, other=other))
    run_dir = tmp_path / "toy"
    for name in ("one", "two"):
        r = res["systems"][name]
        parsed = reference_parse((run_dir / name / "output.log").read_text())
        assert parsed["args"]["system"] == name and parsed["args"]["iters"] == 3
        assert parsed["init_dev"] == [r["dev"]["init"]]
        assert max(parsed["dev"]) == r["dev"]["learned"]
        assert parsed["test"][0] == r["test"]["learned"]
        rows = [json.loads(x) for x in (run_dir / f"dln_{name}.jsonl").read_text().splitlines()]
        train = sum(t["total"] for row in rows for t in row["tokens"].values())
        assert parsed["cost"][0] == train == sum(t["total"] for t in r["tokens"]["train"].values())
        # traces: one line per dev example of each dev evaluation, then the test split twice
        traces = [json.loads(x) for x in (run_dir / f"traces_{name}.jsonl").read_text().splitlines()]
        dev_evals = len({json.dumps(row["prompts"], sort_keys=True)
                         for row in rows if "dev_acc" in row})
        assert len(traces) == dev_evals * r["num_dev"] + 2 * r["num_test"]
        test = [t for t in traces if t["split"] == "test"]
        assert sum(t["correct"] for t in test) / len(test) == pytest.approx(r["test"]["learned"])
        assert all(("hidden" in t) == (name == "two") for t in traces)
    # tokens: every text the backends received (characters) plus generated / scored tokens
    total = sum(t["total"] for r in res["systems"].values() for part in r["tokens"].values() for t in part.values())
    total += sum(b["tokens"] for b in res["baselines"])
    assert total == sum(len(t) for t in fake.received + other.received) + sum(
        3 * n for m, n in fake.calls + other.calls if m == "generate") + sum(
        _scored_tokens(lm) for lm in (fake, other))
    # baselines: one row per (task, backend, k); zero-shot = DLN-1's initial test accuracy
    rows = {(b["backend"], b["shots"]): b for b in res["baselines"]}
    assert set(rows) == {("fake", 0), ("fake", 2)}
    assert rows[("fake", 0)]["test"] == res["systems"]["one"]["test"]["init"]
    assert rows[("fake", 2)]["prompt"].count("Answer:") == 2
    assert "| 2-shot | test/dln_toy |" in res["summary"]


def _scored_tokens(lm) -> int:
    return lm.scored_tokens


def test_paper_preset_fills_unset_keys_per_depth_and_task(tmp_path):
    from dln_ens.config import parse_config
    from dln_ens.dln.presets import settings_for
    data = {"name": "p", "backends": {"fake": {"type": "class", "class": "dln_fake:ScriptedLM"}},
            "dln": {"preset": "paper", "task": "bbh/navigate", "num_test": 7,
                    "systems": [{"name": "a", "layers": 1, "backend": "fake"}]}}
    cfg = parse_config(data, check_paths=False).dln
    one = settings_for(cfg, 1, "bbh/navigate")
    two = settings_for(cfg, 2, "bbh/navigate")
    date2 = settings_for(cfg, 2, "bbh/date_understanding")
    assert (one.iters, one.batch_size, one.num_p_samples, one.memory_size, one.tolerance) == (20, 20, 20, 2, -1)
    assert one.held_out_prompt_ranking and one.balance_batch and one.num_dev is None
    assert one.num_test == 7 and two.num_test == 7          # set in the file: kept
    assert (two.batch_size, two.num_h_samples, two.trust_factor, two.logp_penalty, two.memory_size) == (10, 10, 5.0, 2.0, 5)
    assert two.strip_options_for_hidden and two.hidden_max_new_tokens == 256 and two.decay_logp_penalty
    assert (date2.trust_factor, date2.logp_penalty, date2.output_prompt) == (1.0, 1.0, "")
    demo = parse_config({**data, "dln": {**data["dln"], "preset": "demo"}}, check_paths=False).dln
    assert settings_for(demo, 2, "bbh/navigate") == demo


def test_build_system_hidden_layer_defaults_and_old_behaviour_options():
    from dln_ens.data.registry import load_task
    from dln_ens.dln.run import build_system
    from dln_ens.dln.templates import TemplateLibrary
    task = load_task("test/dln_toy")
    lm = ScriptedLM("fake")
    system = DLNSystem(name="two", layers=2, backend="fake")
    net, tr = build_system(system, DLNConfig(), task, lambda name: lm, TemplateLibrary())
    assert net.prompts == {"p1": "", "p2": task.instruction}          # empty initial p1
    assert net.hidden.stop == () and tr.posterior.stop == ()           # h runs to the token limit
    assert [t.key for t in tr.posterior.templates] == ["suffix_forward_tbs_y:v2", "suffix_forward_tbs:v2"]
    assert net.hidden.render("", "x").startswith("x\n\n")              # suffix form
    old = DLNConfig(hidden_prompt=None, hidden_stop_at_newline=True, hidden_template="suffix_forward_tbs:v1",
                    posterior_template="suffix_forward_tbs_y:v1", output_prompt="Start.")
    net, tr = build_system(system, old, task, lambda name: lm, TemplateLibrary())
    assert net.prompts == {"p1": task.instruction, "p2": "Start."}
    assert net.hidden.stop == ("\n",) and tr.posterior.stop == ("\n",)
    assert net.hidden.render("P", "x").startswith("P\n\nInput: x")     # prompt-first form


def test_a_paper_preset_run_with_shortened_splits(tmp_path):
    """The reference's navigate settings (balanced batches, held-out ranking, memory, tolerance,
    trust factor, decaying logp penalty, option stripping) run end to end; keys set win."""
    short = dict(iters=2, batch_size=4, num_p_samples=3, num_h_samples=2, num_dev=4, num_test=4,
                 hidden_max_new_tokens=16, proposal_max_new_tokens=16, baseline_shots=[])
    cfg = make_cfg(tmp_path, preset="paper", set_keys=sorted(short), **short)
    res = run_dln(cfg, FakePool(fake=ScriptedLM("fake"), other=ScriptedLM("other")))
    two = res["systems"]["two"]["settings"]
    assert two["balance_batch"] and two["held_out_prompt_ranking"] and two["strip_options_for_hidden"]
    assert (two["iters"], two["batch_size"], two["trust_factor"], two["tolerance"]) == (2, 4, 1.0, 2)
    rows = [json.loads(x) for x in (tmp_path / "toy" / "dln_two.jsonl").read_text().splitlines()]
    updated = [r for r in rows[1:] if r["updated"]]
    assert updated and all(r["logp_penalty"] == 1.0 * (1 - (r["iteration"] - 1) / 2) for r in updated)
    assert res["systems"]["one"]["settings"]["val_freq"] == 2
