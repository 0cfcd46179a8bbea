"""`dln-ens ablate` on two tiny models: grid expansion, per-cell figures recomputed here from the
saved per-example results, resumption, config errors."""
import csv
import json

import pytest

from dln_ens.ablate import label
from dln_ens.cli import main
from dln_ens.config import ConfigError, parse_config


def conf(tmp_path, gpt2, llama, **ablate):
    data = {"name": "ab", "runs_dir": str(tmp_path / "runs"), "backends": {
        "g": {"type": "hf", "path": str(gpt2)}, "l": {"type": "hf", "path": str(llama)},
        "ens": {"type": "ensemble", "members": ["g", "l"], "main": "g", "matrices": str(tmp_path / "mat"),
                "method": "unite"}},
        "ablate": {"backends": ["ens"], "tasks": ["facts_qa", "navigate"], "num_examples": 4,
                   "max_new_tokens": 3, "batch_size": 2,
                   "variants": [{"method": "main"}, {"method": "unite", "fusion": {"topk": [2, 5]},
                                                     "weighting": ["uniform", "entropy"]}], **ablate}}
    path = tmp_path / "conf.json"
    path.write_text(json.dumps(data))
    return path


def test_ablate_grid_tables_and_resume(tmp_path, tiny_gpt2_dir, tiny_llama_dir, capsys):
    path = conf(tmp_path, tiny_gpt2_dir, tiny_llama_dir)
    assert main(["ablate", "--conf", str(path)]) == 0
    out = tmp_path / "runs" / "ab" / "ablate"
    rows = list(csv.DictReader((out / "ablate.csv").open()))
    assert len(rows) == 2 * (1 + 2 * 2)                   # tasks x (main + topk x weighting)
    assert {r["variant"] for r in rows} == {"main", "unite (topk=2, uniform)", "unite (topk=5, uniform)",
                                             "unite (topk=2, entropy, T=0.1)", "unite (topk=5, entropy, T=0.1)"}
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 2 * 5 + 2 * 2                    # ensemble cells + member cells
    member = {(c["what"]["member"], c["task"]): c["correct"] for c in cells if "member" in c["what"]}
    for r in rows:
        (cell,) = [c for c in cells if c["task"] == r["task"] and "variant" in c["what"]
                   and label(c["what"]["variant"]) == r["variant"]]
        ens, g, l = cell["correct"], member[("g", r["task"])], member[("l", r["task"])]
        assert float(r["accuracy"]) == pytest.approx(sum(ens) / 4)
        assert float(r["oracle"]) == pytest.approx(sum(a or b for a, b in zip(g, l)) / 4)
        assert int(r["gained"]) == sum(e and not m for e, m in zip(ens, g))
        assert int(r["lost"]) == sum(m and not e for e, m in zip(ens, g))
        assert r["best_member"].split()[0] == ("g" if sum(g) >= sum(l) else "l")
        if r["variant"] == "main":                          # the main method is the main member
            assert ens == g and r["gained"] == r["lost"] == "0"
    assert (out / "ablate.md").read_text().count("\n") == len(rows) + 2
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (out / "gains.png").is_file()
    # a rerun reuses every cell (its files are not rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(["ablate", "--conf", str(path)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_ablate_without_matplotlib_still_writes_tables(tmp_path, tiny_gpt2_dir, tiny_llama_dir, capsys,
                                                      monkeypatch):
    import builtins
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = conf(tmp_path, tiny_gpt2_dir, tiny_llama_dir, tasks=["navigate"], variants=[{"method": "main"}])
    assert main(["ablate", "--conf", str(path)]) == 0
    out = tmp_path / "runs" / "ab" / "ablate"
    assert (out / "ablate.csv").is_file() and not (out / "accuracy.png").exists()
    assert "pip install 'dln-ens[plots]'" in capsys.readouterr().out


def test_ablate_config_errors_name_the_key(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    for bad, where in (({"variants": [{"method": "unite", "fusion": {"topk": [2, 0]}}]}, "ablate.variants[0].topk"),
                       ({"variants": [{"method": "unite", "weighting": "entropyy"}]}, "ablate.variants[0].weighting"),
                       ({"backends": ["g"]}, "ablate.backends[0]"),
                       ({"variants": [{"method": "main", "backends": ["ens", "other"]}]},
                        "ablate.variants[0].backends[1]")):
        data = json.loads(conf(tmp_path, tiny_gpt2_dir, tiny_llama_dir, **bad).read_text())
        with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
            parse_config(data, "conf.json")


def test_fusion_summary_names_the_best_fusion_and_deepens_figure(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    from dln_ens.evaluate import fusion_summary
    data = json.loads(conf(tmp_path, tiny_gpt2_dir, tiny_llama_dir).read_text())
    data["backends"]["dp"] = dict(data["backends"]["ens"], method="deepen")
    data["backends"]["ens"]["weighting"] = "entropy"
    cfg = parse_config(data, "conf.json", check_paths=False)
    rows = [{"backend": b, "task": "facts_qa", "accuracy": a} for b, a in
            (("g", 0.5), ("l", 0.6), ("ens", 0.75), ("dp", 0.55))]
    text = fusion_summary(cfg, rows)
    assert "best fusion **ens** (unite, entropy weighting) 0.750 vs the best member l 0.600: **+0.150**" in text
    assert "DeePEn (dp) 0.550 (-0.050)" in text
    assert fusion_summary(cfg, rows[:2]) == ""              # no ensemble evaluated
