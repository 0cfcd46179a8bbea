"""Anchors, matrices, storage and staleness against independent float64 / brute-force references."""
import json

import pytest
import torch

from relrep_helpers import tiny_member, train_byte_bpe, train_metaspace_bpe, word_level
from dln_ens.relrep import store
from dln_ens.relrep.anchors import AnchorError, Anchors, common_anchors, most_consistent
from dln_ens.relrep.build import build_matrices
from dln_ens.relrep.store import StaleMatricesError, is_up_to_date, load_matrices
from dln_ens.relrep.vocab import token_surfaces


@pytest.fixture(scope="module")
def toks():
    return {"bpe": train_byte_bpe(), "sp": train_metaspace_bpe()}


@pytest.fixture(scope="module", params=[32, 8], ids=["direct-norm", "factored-norm"])
def members(toks, request):
    # d=32: the row norm is taken over the [block, A] slab; d=8 (16 d <= A): from e L
    d = request.param
    return {"bpe": tiny_member(toks["bpe"], seed=1, d=d), "sp": tiny_member(toks["sp"], seed=2, tied=False, d=d)}


def _ref_surface(tok, i: int) -> bytes | None:
    """Independent: what the tokenizer's own decode adds after a prefix token, for tokens whose
    text is whole UTF-8 (partial-byte tokens are left out of this reference)."""
    if i in tok.all_special_ids:
        return None
    pre = tok.convert_tokens_to_ids("a") if "a" in tok.get_vocab() else None
    base = tok.decode([pre], clean_up_tokenization_spaces=False)
    text = tok.decode([pre, i], clean_up_tokenization_spaces=False)[len(base):]
    return None if "\ufffd" in text or not text else text.encode()


def test_anchors_equal_brute_force(toks):
    anchors = common_anchors({m: token_surfaces(t) for m, t in toks.items()})
    ref_a = [_ref_surface(toks["bpe"], i) for i in range(len(toks["bpe"]))]
    ref_b = [_ref_surface(toks["sp"], j) for j in range(len(toks["sp"]))]
    ref = {}
    for i, si in enumerate(ref_a):          # every pair, lowest ids first
        if si is None or si in ref:
            continue
        for j, sj in enumerate(ref_b):
            if sj == si:
                ref[si] = (i, j)
                break
    got = {s: (anchors.ids["bpe"][n], anchors.ids["sp"][n]) for n, s in enumerate(anchors.surfaces)}
    whole = {s: ij for s, ij in got.items() if "\ufffd" not in s.decode("utf-8", "replace")}
    assert whole == ref
    # the partial bytes 0x80..0xFF pair byte-level characters with <0xNN> byte-fallback tokens
    partial = {s: ij for s, ij in got.items() if s not in whole}
    assert len(partial) == 128 - 2 or len(partial) >= 64
    for s, (i, j) in partial.items():
        assert toks["sp"].convert_ids_to_tokens(j) == f"<0x{s[0]:02X}>"


def _ref_dense(weight: torch.Tensor, ids, T: float) -> torch.Tensor:
    E = weight.double()
    En = E / E.norm(dim=1, keepdim=True)
    cos = En @ En[ids].T
    x = cos / cos.norm(dim=1, keepdim=True)
    return torch.softmax(T * x, dim=1)


def test_dense_matches_float64_reference(members, tmp_path):
    build_matrices(members, tmp_path, temperature=100.0, topk=None, min_anchors=10, progress=False,
                   block_rows=37)
    mats, anchors = load_matrices(tmp_path, members)
    for m, member in members.items():
        w = member.model.get_input_embeddings().weight.detach()
        ref = _ref_dense(w, anchors.ids[m], 100.0)
        assert mats[m].dense.shape == ref.shape == (w.shape[0], len(anchors))
        assert torch.allclose(mats[m].dense.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_dtype,rtol,atol", [("float16", 1e-3, 1e-7), ("float32", 0.0, 1e-5)])
def test_sparse_rows_hold_dense_topk_and_sum_to_one(members, tmp_path, value_dtype, rtol, atol):
    k = 8
    build_matrices(members, tmp_path, topk=k, min_anchors=10, progress=False, value_dtype=value_dtype)
    mats, anchors = load_matrices(tmp_path, members)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["k"] == k and meta["num_anchors"] == len(anchors)
    for m, member in members.items():
        ref = _ref_dense(member.model.get_input_embeddings().weight.detach(), anchors.ids[m], 100.0)
        R = mats[m]
        assert R.topk_idx.dtype == torch.long and R.topk_val.dtype == torch.float32
        ref_val = ref.topk(k, dim=1).values
        # the chosen anchors are a top-k of the reference (robust to float32 near-ties) ...
        at_idx = torch.gather(ref, 1, R.topk_idx)
        assert torch.allclose(at_idx.sort(1, descending=True).values, ref_val, rtol=1e-4, atol=1e-7)
        # ... and hold the reference's values there
        assert torch.allclose(R.topk_val.double(), at_idx, rtol=rtol, atol=atol)
        assert torch.allclose(R.to_dense().sum(1), torch.ones(R.num_rows), atol=1e-5)
        assert (R.topk_val.sum(1) <= 1 + 1e-6).all()


def test_bf16_model_and_fixed_anchors_file(members, toks, tmp_path):
    bf = {"bpe": tiny_member(toks["bpe"], seed=1, dtype=torch.bfloat16), "sp": members["sp"]}
    build_matrices(bf, tmp_path / "a", topk=4, min_anchors=10, progress=False)
    mats, anchors = load_matrices(tmp_path / "a", bf)
    w = bf["bpe"].model.get_input_embeddings().weight.detach()
    ref = _ref_dense(w.float(), anchors.ids["bpe"], 100.0)
    assert torch.allclose(torch.gather(ref, 1, mats["bpe"].topk_idx), ref.topk(4, dim=1).values, atol=1e-5)
    # a hand-picked anchors file is used as given
    keep = Anchors.from_json(json.loads((tmp_path / "a" / "anchors.json").read_text())).subset([0, 3, 5, 7, 9, 11])
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(keep.to_json()))
    build_matrices(bf, tmp_path / "b", topk=4, anchors=path, min_anchors=6, progress=False)
    _, got = load_matrices(tmp_path / "b", bf)
    assert got.ids == keep.ids and got.surfaces == keep.surfaces


def test_consistency_filter_keeps_most_consistent(members, toks):
    anchors = common_anchors({m: token_surfaces(t) for m, t in toks.items()})
    emb = {m: mm.model.get_input_embeddings().weight.detach() for m, mm in members.items()}
    n = 20
    kept = most_consistent(anchors, emb, n)
    sims = {}
    for m in emb:
        ea = emb[m][anchors.ids[m]].double()
        ea = ea / ea.norm(dim=1, keepdim=True)
        sims[m] = ea @ ea.T
    score = [float(torch.nn.functional.cosine_similarity(sims["bpe"][i], sims["sp"][i], dim=0))
             for i in range(len(anchors))]
    best = sorted(range(len(anchors)), key=lambda i: -score[i])[:n]
    assert set(kept.surfaces) == {anchors.surfaces[i] for i in best}


def test_stale_model_is_detected(toks, tmp_path):
    mem = {"bpe": tiny_member(toks["bpe"], seed=3), "sp": tiny_member(toks["sp"], seed=4)}
    build_matrices(mem, tmp_path, topk=4, min_anchors=10, progress=False)
    params = json.loads((tmp_path / "meta.json").read_text())["params"]
    assert is_up_to_date(tmp_path, mem, params)
    with torch.no_grad():
        mem["sp"].model.get_input_embeddings().weight[5, 3] += 1e-3
    assert not is_up_to_date(tmp_path, mem, params)
    with pytest.raises(StaleMatricesError, match=r"'sp'.*sh sh/mat.sh"):
        load_matrices(tmp_path, mem)
    assert not is_up_to_date(tmp_path, mem, dict(params, temperature=50.0))


def test_disjoint_vocabularies_fail_clearly(tmp_path):
    a = tiny_member(word_level(["alpha", "beta", "gamma"]))
    b = tiny_member(word_level(["delta", "epsilon"]))
    with pytest.raises(AnchorError, match=r"members left, right share only 0 .*no common tokens"):
        build_matrices({"left": a, "right": b}, tmp_path, min_anchors=1, progress=False)
    assert not (tmp_path / "meta.json").exists()


def test_interrupted_build_never_loads(members, tmp_path, monkeypatch):
    build_matrices(members, tmp_path, topk=4, min_anchors=10, progress=False)
    load_matrices(tmp_path, members)
    real, calls = store.save_member, []

    def failing(out_dir, name, R, value_dtype="float16"):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(out_dir, name, R, value_dtype)

    monkeypatch.setattr(store, "save_member", failing)
    with pytest.raises(KeyboardInterrupt):
        build_matrices(members, tmp_path, topk=8, min_anchors=10, progress=False)
    with pytest.raises(StaleMatricesError, match="interrupted build"):
        load_matrices(tmp_path, members)
    assert not list(tmp_path.glob(".*.tmp"))


def test_sparse_columns_descend_and_truncate(members, tmp_path):
    build_matrices(members, tmp_path, topk=12, min_anchors=10, progress=False, value_dtype="float32")
    mats, anchors = load_matrices(tmp_path, members)
    R = mats["sp"]
    assert (R.topk_val[:, :-1] >= R.topk_val[:, 1:]).all()
    ref = _ref_dense(members["sp"].model.get_input_embeddings().weight.detach(), anchors.ids["sp"], 100.0)
    small = R.truncate(3)
    at = torch.gather(ref, 1, small.topk_idx)
    assert torch.allclose(at, ref.topk(3, dim=1).values, atol=1e-5)
    assert torch.allclose(small.residual.double(), 1 - at.sum(1), atol=1e-5)
