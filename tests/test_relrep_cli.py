"""`dln-ens mat` backend: builds every ensemble's matrices, skips up-to-date ones, rebuilds
stale ones, --force rebuilds all; MoD members share their base's embeddings."""
import json

import pytest
import torch

from relrep_helpers import save_members
from dln_ens.config import parse_config
from dln_ens.relrep.cli import build_all


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_members(tmp_path_factory.mktemp("models"))


def _cfg(model_dirs, mat_dir, **ens):
    data = {"name": "t", "backends": {
        "a": {"type": "hf", "path": str(model_dirs["a"])},
        "b": {"type": "hf", "path": str(model_dirs["b"])},
        "a_mod": {"type": "mod", "base": "a"},
        "ens": {"type": "ensemble", "members": ["a", "b", "a_mod"], "main": "a", "matrices": str(mat_dir),
                "topk": 8, "min_anchors": 10, **ens}}}
    return parse_config(data, source="test.json")


def test_build_skip_rebuild_force(model_dirs, tmp_path, capsys):
    mat = tmp_path / "mat"
    built = build_all(_cfg(model_dirs, mat), progress=False)
    out = capsys.readouterr().out
    assert set(built["ens"]) == {"a", "b", "a_mod"}
    assert "ens/b: vocabulary" in out and "anchors" in out and "k=8" in out
    meta = json.loads((mat / "meta.json").read_text())
    assert meta["fingerprints"]["a"] == meta["fingerprints"]["a_mod"]   # MoD shares its base's matrix
    a_file = mat / "a.safetensors"
    stamp = a_file.stat().st_mtime_ns

    assert build_all(_cfg(model_dirs, mat), progress=False) == {}
    assert "up to date" in capsys.readouterr().out and a_file.stat().st_mtime_ns == stamp

    built = build_all(_cfg(model_dirs, mat, temperature=50.0), progress=False)   # changed parameter: stale
    assert "temperature" in capsys.readouterr().out and set(built["ens"]) == {"a", "b", "a_mod"}
    assert json.loads((mat / "meta.json").read_text())["temperature"] == 50.0

    assert set(build_all(_cfg(model_dirs, mat, temperature=50.0), force=True, progress=False)["ens"]) == {"a", "b", "a_mod"}


def test_changed_checkpoint_is_rebuilt(model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    mat = tmp_path / "mat"
    build_all(_cfg(model_dirs, mat), progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["b"])
    with torch.no_grad():
        model.get_input_embeddings().weight[7] *= 1.5
    changed = tmp_path / "b2"
    model.save_pretrained(changed)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model_dirs["b"]).save_pretrained(changed)
    capsys.readouterr()
    built = build_all(_cfg(dict(model_dirs, b=changed), mat), progress=False)
    assert "member 'b'" in capsys.readouterr().out and "ens" in built
