"""Matrices folders: a build deletes only what an earlier build listed, refuses foreign files,
and loading checks build settings and per-matrix checksums (issue 11)."""
import json

import pytest

from relrep_helpers import save_members, tiny_member, train_byte_bpe, train_metaspace_bpe
from dln_ens.backends import BackendPool
from dln_ens.config import ConfigError, parse_config
from dln_ens.relrep.build import build_matrices
from dln_ens.relrep.cli import build_all
from dln_ens.relrep.store import ForeignFilesError, StaleMatricesError, load_matrices


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_members(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def members():
    return {"bpe": tiny_member(train_byte_bpe(), seed=1), "sp": tiny_member(train_metaspace_bpe(), seed=2)}


def _cfg(model_dirs, mat_dir, **ens):
    data = {"name": "t", "backends": {
        "a": {"type": "hf", "path": str(model_dirs["a"])},
        "b": {"type": "hf", "path": str(model_dirs["b"])},
        "ens": {"type": "ensemble", "members": ["a", "b"], "main": "a", "matrices": str(mat_dir),
                "topk": 8, "min_anchors": 10, **ens}}}
    return parse_config(data, source="test.json")


def test_matrices_pointed_at_a_model_folder_deletes_nothing(model_dirs, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    weights = (model_dirs["a"] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ForeignFilesError, match=r"holds config.json, model.safetensors, which no matrix build"):
        build_all(_cfg(model_dirs, folder), progress=False)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_rebuild_deletes_only_files_the_last_build_listed(members, tmp_path):
    build_matrices(members, tmp_path, topk=4, min_anchors=10, progress=False)
    assert json.loads((tmp_path / "meta.json").read_text())["files"] == ["anchors.json", "bpe.safetensors",
                                                                          "sp.safetensors"]
    build_matrices({"bpe": members["bpe"]}, tmp_path, topk=4, min_anchors=1, progress=False)
    assert not (tmp_path / "sp.safetensors").exists()          # listed by the last build: removed
    assert (tmp_path / "bpe.safetensors").exists()
    (tmp_path / "notes.safetensors").write_bytes(b"mine")       # a user's file
    with pytest.raises(ForeignFilesError, match="notes.safetensors"):
        build_matrices(members, tmp_path, topk=4, min_anchors=10, progress=False)
    assert (tmp_path / "notes.safetensors").read_bytes() == b"mine"
    load_matrices(tmp_path, {"bpe": members["bpe"]})            # the refused build changed nothing


def test_a_manifest_listing_paths_outside_its_folder_deletes_nothing(members, tmp_path):
    """A meta.json edited by hand (or by another tool) cannot make a build delete anything that is
    not a build's own file in the folder itself."""
    mat, outside = tmp_path / "mat", tmp_path / "model.safetensors"
    mat.mkdir()
    outside.write_bytes(b"weights")
    for listed in (["../model.safetensors"], ["notes.txt"], [".hidden.safetensors"]):
        (mat / "meta.json").write_text(json.dumps({"format": 2, "complete": True, "files": listed}))
        with pytest.raises(ForeignFilesError, match="which no matrix build writes"):
            build_matrices(members, mat, topk=4, min_anchors=10, progress=False)
        assert outside.read_bytes() == b"weights" and sorted(p.name for p in mat.iterdir()) == ["meta.json"]


def test_changed_build_settings_are_refused_on_load(model_dirs, tmp_path):
    mat = tmp_path / "mat"
    build_all(_cfg(model_dirs, mat), progress=False)
    pool = BackendPool(_cfg(model_dirs, mat, topk=4))
    with pytest.raises(StaleMatricesError, match=r"built with other settings \(topk: built with 8, the config asks for 4\); rebuild with"):
        pool.get("ens")
    assert BackendPool(_cfg(model_dirs, mat)).get("ens").fusion is not None


def test_truncated_or_zeroed_matrix_refused_and_rebuilt(model_dirs, tmp_path, capsys):
    mat = tmp_path / "mat"
    build_all(_cfg(model_dirs, mat), progress=False)
    path = mat / "b.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])                     # truncated
    with pytest.raises(StaleMatricesError, match="b.safetensors does not match the checksum"):
        BackendPool(_cfg(model_dirs, mat)).get("ens")
    capsys.readouterr()
    assert "ens" in build_all(_cfg(model_dirs, mat), progress=False)   # `mat` rebuilds it
    assert "does not match the checksum" in capsys.readouterr().out
    BackendPool(_cfg(model_dirs, mat)).get("ens")
    data = path.read_bytes()
    mid = len(data) - 64
    path.write_bytes(data[:mid] + bytes(32) + data[mid + 32:])   # zeroed bytes, same size
    with pytest.raises(StaleMatricesError, match=r"member 'b' is damaged"):
        BackendPool(_cfg(model_dirs, mat)).get("ens")


def test_meta_missing_keys_is_a_clear_error(members, tmp_path):
    build_matrices(members, tmp_path, topk=4, min_anchors=10, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["checksums"], meta["params"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleMatricesError, match=r"meta.json: missing keys params, checksums .*sh sh/mat.sh"):
        load_matrices(tmp_path, members)


def test_ensembles_sharing_a_folder_need_the_same_settings(model_dirs, tmp_path):
    data = {"name": "t", "backends": {
        "a": {"type": "hf", "path": str(model_dirs["a"])}, "b": {"type": "hf", "path": str(model_dirs["b"])},
        "e1": {"type": "ensemble", "members": ["a", "b"], "main": "a", "matrices": str(tmp_path), "topk": 8},
        "e2": {"type": "ensemble", "members": ["b", "a"], "main": "b", "matrices": str(tmp_path), "topk": 8}}}
    parse_config(data)                                          # same members and settings: fine
    data["backends"]["e2"]["topk"] = 16
    with pytest.raises(ConfigError, match=r"key 'backends.e2.matrices'.*ensemble 'e1', which differs in topk"):
        parse_config(data)


def test_a_format_1_build_is_replaced_without_foreign_file_errors(members, tmp_path):
    """Folders built before manifests listed their members; their files count as the build's."""
    build_matrices(members, tmp_path, topk=4, min_anchors=10, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("files", "complete", "checksums")} | {"format": 1}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    with pytest.raises(StaleMatricesError, match="matrix format 1"):
        load_matrices(tmp_path, members)
    build_matrices({"bpe": members["bpe"]}, tmp_path, topk=4, min_anchors=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchors.json", "bpe.safetensors", "meta.json"]


def test_run_with_changed_matrix_settings_writes_no_config(model_dirs, tmp_path, capsys):
    from dln_ens.cli import main
    mat = tmp_path / "mat"
    build_all(_cfg(model_dirs, mat), progress=False)

    def conf(eval_backend, **ens):
        data = {"name": "r", "runs_dir": str(tmp_path / "runs"), "backends": {
            "a": {"type": "hf", "path": str(model_dirs["a"])}, "b": {"type": "hf", "path": str(model_dirs["b"])},
            "ens": {"type": "ensemble", "members": ["a", "b"], "main": "a", "matrices": str(mat),
                    "topk": 8, "min_anchors": 10, **ens}},
            "eval": {"tasks": ["navigate"], "backends": [eval_backend], "num_examples": 2, "max_new_tokens": 2}}
        path = tmp_path / f"{eval_backend}.json"
        path.write_text(json.dumps(data))
        return str(path)

    assert main(["run", "--conf", conf("a")]) == 0
    written = (tmp_path / "runs" / "r" / "config.json").read_text()
    capsys.readouterr()
    assert main(["run", "--conf", conf("ens", topk=4)]) == 2
    assert "built with other settings (topk: built with 8, the config asks for 4)" in capsys.readouterr().err
    assert (tmp_path / "runs" / "r" / "config.json").read_text() == written
