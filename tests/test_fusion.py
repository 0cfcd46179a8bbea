"""Fusion math against straightforward implementations written here (DeePEn's reference loop)."""
import pytest
import torch

from deepen_reference import reference_inverse
from dln_ens.fusion.inverse import deepen_inverse
from dln_ens.fusion.base import Vocab
from dln_ens.fusion.registry import make_fusion
from dln_ens.fusion.relative import to_relative, top_mass_support
from dln_ens.relrep.matrix import RelRepMatrix, dense_to_sparse


def random_matrix(V, A, temperature=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(temperature * torch.rand(V, A, generator=g), -1)


def peaked_logits(B, V, scale=8.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, V, generator=g)


def reference_step(logits, dense, main, weights, lr, steps):
    """Whole DeePEn step per sequence: p -> p @ R -> weighted q -> reference inverse."""
    out = []
    for b in range(next(iter(logits.values())).shape[0]):
        q = sum(w * (torch.softmax(logits[n][b], -1) @ dense[n]) for n, w in weights.items())
        out.append(reference_inverse(logits[main][b], q, dense[main], lr, steps))
    return torch.stack(out)


def setup(V=(300, 200, 250), A=60, B=4):
    names = ["a", "b", "c"]
    dense = {n: random_matrix(v, A, seed=i) for i, (n, v) in enumerate(zip(names, V))}
    logits = {n: peaked_logits(B, v, scale=3.0 + i, seed=10 + i) for i, (n, v) in enumerate(zip(names, V))}
    return names, dense, logits


def test_dense_step_equals_reference_loop_per_sequence():
    names, dense, logits = setup()
    mats = {n: RelRepMatrix(dense[n].shape[1], dense=dense[n]) for n in names}
    fuse = make_fusion("deepen", names, "a", matrices=mats, lr=0.15, steps=5, tail_mass=0.0)
    got = fuse(logits)
    want = reference_step(logits, dense, "a", {n: 1 / 3 for n in names}, 0.15, 5)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, torch.log_softmax(logits["a"], -1), atol=1e-3)   # the search moved


def test_batch_composition_does_not_change_a_row():
    names, dense, logits = setup(B=5)
    mats = {n: RelRepMatrix(dense[n].shape[1], dense=dense[n]) for n in names}
    fuse = make_fusion("deepen", names, "a", matrices=mats, tail_mass=0.0, weights={"a": 0.5, "b": 0.3, "c": 0.2})
    batch = fuse(logits)
    # float32 rounding differs between batched and single-row products; Adam's normalised steps
    # turn it into differences of a few 1e-6 (the reference loop itself shows the same)
    for b in range(5):
        alone = fuse({n: x[b:b + 1] for n, x in logits.items()})
        assert torch.allclose(batch[b], alone[0], atol=5e-5, rtol=0)
    want = reference_step(logits, dense, "a", {"a": 0.5, "b": 0.3, "c": 0.2}, 0.15, 5)
    assert torch.allclose(batch, want, atol=5e-5, rtol=0)


def test_sparse_matrices_match_their_dense_form():
    names, dense, logits = setup()
    sparse = {n: dense_to_sparse(dense[n], 8) for n in names}
    as_dense = {n: sparse[n].to_dense() for n in names}
    assert torch.allclose(as_dense["a"].sum(-1), torch.ones(300), atol=1e-5)
    p = torch.softmax(logits["b"], -1)
    assert torch.allclose(to_relative(p, sparse["b"]), p @ as_dense["b"], atol=1e-6)
    got = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=0.0)(logits)
    want = reference_step(logits, as_dense, "a", {n: 1 / 3 for n in names}, 0.15, 5)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_support_restriction_is_close_to_exact(monkeypatch):
    from dln_ens.fusion import deepen
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 0)   # restrict these small matrices too
    names, dense, logits = setup(V=(3000, 2000, 2500), A=200, B=6)
    logits = {n: x * 2.5 for n, x in logits.items()}   # peaked, as trained LMs are
    sparse = {n: dense_to_sparse(dense[n], 16) for n in names}
    exact = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=0.0)(logits)
    fast = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=1e-6)(logits)
    assert torch.equal(exact.argmax(-1), fast.argmax(-1))
    kl = (exact.exp() * (exact - fast)).sum(-1)
    assert kl.max() < 1e-4
    # the relative map with a support: L1 error at most the tail mass left out
    p = torch.softmax(logits["b"], -1)
    sup = top_mass_support(p, 1e-3, 1024)
    assert (sup.valid.sum(-1) < p.shape[-1]).all()
    err = (to_relative(p, sparse["b"], sup) - to_relative(p, sparse["b"])).abs().sum(-1)
    assert (err <= 2e-3 + 1e-6).all()


def restricted_reference(z, q, dense, idx, lr, steps):
    """The support-restricted search as its definition reads (`fusion.inverse`), one row in
    float64 with autograd and torch's AdamW + CosineAnnealingLR: only the support's logits
    ``idx`` are parameters; the tail's logits are z * (the weight decay so far), in the softmax
    normaliser; r = p_S @ R_S + (the tail's mass) / A. Returns the final log-probabilities."""
    z, q, dense = z.double(), q.double(), dense.double()
    tail = torch.ones_like(z, dtype=torch.bool)
    tail[idx] = False
    param = z[idx].clone().requires_grad_(True)
    opt = torch.optim.AdamW([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=lr / 4)
    scale = 1.0

    def full(param, scale):
        out = z * scale
        return out.index_put((idx,), param)

    for t in range(steps):
        p = torch.softmax(full(param, scale), -1)
        r = p[idx] @ dense[idx] + p[tail].sum() / dense.shape[1]
        loss = (q * (q.log() - r.log())).mean()   # KLDivLoss(reduction="mean")(r.log(), q)
        opt.zero_grad()
        loss.backward()
        scale *= 1 - opt.param_groups[0]["lr"] * 0.01   # AdamW's decoupled weight decay, on the tail too
        opt.step()
        sched.step()
    return torch.log_softmax(full(param.detach(), scale), -1)


@pytest.mark.parametrize("flat", [False, True])
def test_restricted_search_against_its_definition(flat):
    """With a support, `deepen_inverse` (tail normaliser from the softmax's probabilities, at
    every step's weight decay) equals the restricted search written out, the whole distribution
    and the targets' entries (on the support and in the tail); a tail with -inf logits too."""
    V, A, B = 3000, 80, 4
    dense = random_matrix(V, A, seed=7)
    mat = dense_to_sparse(dense, 12)
    dense = mat.to_dense()
    z = peaked_logits(B, V, 0.3 if flat else 2.5, seed=8)
    z[1, 2000:2100] = float("-inf")
    q = torch.softmax(torch.randn(B, A, generator=torch.Generator().manual_seed(9)), -1)
    p = torch.softmax(z, -1)
    sup = top_mass_support(p, 1e-3, 64)
    assert (sup.valid.sum(-1) < V).all()
    got = deepen_inverse(z, q, mat, 0.15, 5, support=sup, probs=p.clone())
    targets = torch.tensor([int(sup.idx[0, 0]), 2500, 2050, int(sup.idx[3, 5])])
    got_t = deepen_inverse(z, q, mat, 0.15, 5, support=sup, targets=targets)
    for b in range(B):
        want = restricted_reference(z[b], q[b], dense, sup.idx[b][sup.valid[b]], 0.15, 5)
        assert torch.allclose(got[b].double(), want, atol=2e-5, rtol=0), b
        assert abs(got_t[b].item() - want[targets[b]].item()) < 2e-5, b


def test_top_mass_support_is_smallest_covering_set():
    p = torch.softmax(torch.tensor([[5.0, 4.0, 1.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0, 9.0]]), -1)
    sup = top_mass_support(p, 0.05, 10)
    kept = [sup.idx[b][sup.valid[b]].tolist() for b in range(2)]
    for b in range(2):
        order = p[b].argsort(descending=True).tolist()
        n = next(i + 1 for i in range(5) if p[b, order[:i + 1]].sum() >= 0.95)
        assert kept[b] == order[:n]


def test_lr_zero_and_main_method_are_the_main_member():
    names, dense, logits = setup()
    mats = {n: RelRepMatrix(dense[n].shape[1], dense=dense[n]) for n in names}
    want = torch.log_softmax(logits["a"], -1)
    assert torch.equal(make_fusion("deepen", names, "a", matrices=mats, lr=0.0)(logits), want)
    assert torch.equal(make_fusion("main", names, "a")(logits), want)
    assert torch.equal(deepen_inverse(logits["a"], torch.rand(4, 60), mats["a"], lr=0.0), want)


def test_union_against_a_loop():
    V = 40
    surfaces = {"a": [bytes([65 + i]) for i in range(V)],
                "b": [bytes([65 + (i * 7) % 50]) for i in range(V)]}     # b has surfaces a lacks
    tokens = {n: [s.decode() for s in surf] for n, surf in surfaces.items()}
    logits = {"a": peaked_logits(3, V, 2.0, 3), "b": peaked_logits(3, V, 2.0, 4)}
    vocab = {n: Vocab(surfaces[n], tokens[n]) for n in surfaces}
    fuse = make_fusion("union", ["a", "b"], "a", vocab=vocab, topk=5, weights={"a": 0.6, "b": 0.4})
    got = fuse(logits)
    for r in range(3):
        pa, pb = torch.softmax(logits["a"][r], -1), torch.softmax(logits["b"][r], -1)
        union = {surfaces["a"][i] for i in pa.topk(5).indices.tolist()}
        union |= {surfaces["b"][i] for i in pb.topk(5).indices.tolist()} & set(surfaces["a"])
        want = torch.zeros(V)
        for i in range(V):
            s = surfaces["a"][i]
            if s in union:
                want[i] = 0.6 * pa[i] + 0.4 * sum(pb[j] for j in range(V) if surfaces["b"][j] == s)
            else:
                want[i] = 0.6 * pa[i]
        assert torch.allclose(got[r], torch.log(want / want.sum()), atol=1e-5)


def test_small_sparse_matrices_computed_densely_give_the_sparse_result(monkeypatch):
    """`deepen.computing_form` turns small sparse matrices dense: the same fused distribution as
    the sparse computation (exact and support-restricted)."""
    from dln_ens.fusion import deepen
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 0)   # restrict these small matrices too
    names, dense, logits = setup(V=(300, 200, 250), A=40, B=4)
    sparse = {n: dense_to_sparse(dense[n], 8) for n in names}
    for tail in (0.0, 1e-3):
        as_dense = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=tail, max_support=32)
        assert not as_dense.matrices["a"].is_sparse
        with monkeypatch.context() as m:
            m.setattr(deepen, "DENSE_ENTRIES", 0)
            as_sparse = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=tail, max_support=32)
        assert as_sparse.matrices["a"].is_sparse
        assert torch.allclose(as_dense(logits), as_sparse(logits), atol=1e-5, rtol=0)


def test_target_logprobs_read_the_fused_distribution(monkeypatch):
    """A teacher-forced score reads one entry per row (`Fusion.target_logprobs`): deepen computes
    it without the [B, V] distribution; it must equal that distribution's entry, for targets on
    the support and in its tail, exact and support-restricted, sparse and dense."""
    from dln_ens.fusion import deepen
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 0)   # restrict these small matrices too
    names, dense, logits = setup(V=(300, 200, 250), A=40, B=6)
    sparse = {n: dense_to_sparse(dense[n], 8) for n in names}
    targets = torch.tensor([0, 299, 5, 17, 150, 64])
    targets[:3] = logits["a"][:3].argmax(-1)   # on every support
    for tail, dense_form in ((0.0, True), (1e-3, True), (1e-3, False), (0.3, False)):
        with monkeypatch.context() as m:
            if not dense_form:
                m.setattr(deepen, "DENSE_ENTRIES", 0)
            fuse = make_fusion("deepen", names, "a", matrices=sparse, tail_mass=tail, max_support=16)
        want = fuse(logits).gather(1, targets[:, None])[:, 0]
        assert torch.allclose(fuse.target_logprobs(logits, targets), want, atol=1e-5, rtol=0), (tail, dense_form)
    main = make_fusion("main", names, "a")
    assert torch.allclose(main.target_logprobs(logits, targets),
                          torch.log_softmax(logits["a"], -1).gather(1, targets[:, None])[:, 0], atol=1e-6)


def test_tail_logsumexp_at_several_scales():
    from dln_ens.fusion.inverse import tail_logsumexp
    g = torch.Generator().manual_seed(3)
    x = -5 * torch.rand(3, 5000, generator=g)
    x[0, ::3] = float("-inf")
    x[2] = float("-inf")                       # an empty tail
    scales = [1.0, 0.99, 0.5]
    got = tail_logsumexp(x, scales, elements=3 * 3 * 300)   # columns in chunks of 300
    want = torch.stack([torch.logsumexp(s * x, -1) for s in scales], -1)
    assert torch.allclose(got, want, atol=1e-5) and torch.isneginf(got[2]).all()


@pytest.mark.parametrize("lr,steps", [(0.15, 5), (0.5, 10)])
def test_tail_logsumexp_power_series_against_one_exp_per_scale(lr, steps, monkeypatch):
    """Scales near 1 (a search's weight decay) take the power-series form: it matches one exp
    per scale in float64 to its error bound, on rows built to be its worst case (every entry at
    the distance where the bound peaks), spread rows, -inf entries and an empty row."""
    from dln_ens.fusion import inverse
    from dln_ens.fusion.inverse import SERIES_TOL, decay_scales, series_terms, tail_logsumexp
    scales = decay_scales(lr, steps)
    V = 6000
    K = series_terms(1 - min(scales), V)
    assert K is not None and K >= 2
    g = torch.Generator().manual_seed(5)
    x = -40 * torch.rand(5, V, generator=g, dtype=torch.float64)
    x[1] = -(K + 1) / min(scales)              # the bound's worst distance
    x[2] = -torch.rand(V, generator=g, dtype=torch.float64) * 3
    x[3, ::2] = float("-inf")
    x[4] = float("-inf")                       # an empty tail
    x[:4, 0] = 0.0                             # each row's largest entry is 0
    got = tail_logsumexp(x, scales, elements=4 * 700)
    want = torch.stack([torch.logsumexp(s * x, -1) for s in scales], -1)
    assert torch.isneginf(got[4]).all()
    # the bound is on the sums' error over their largest term (1): the worst-case row's sum is
    # larger, so compare sums, not their logs; two terms fewer break it there
    assert (got[:4].exp() - want[:4].exp()).abs().max() <= SERIES_TOL
    monkeypatch.setattr(inverse, "series_terms", lambda delta, n: K - 2)
    short = tail_logsumexp(x, scales, elements=4 * 700)
    assert (short[1].exp() - want[1].exp()).abs().max() > SERIES_TOL
    monkeypatch.undo()
    got32 = tail_logsumexp(x.float(), scales)
    assert torch.allclose(got32[:4], want[:4].float(), atol=2e-6) and torch.isneginf(got32[4]).all()
    above = tail_logsumexp(x[:4], scales + [1.01])   # a scale above 1: one exp per scale
    assert torch.allclose(above[:, -1], torch.logsumexp(1.01 * x[:4], -1), atol=1e-9)


def test_logits_that_carry_gradients_fuse_as_plain_ones():
    """Logits straight from a model outside inference mode (they require grad) give the same
    fused distribution; the search works on detached copies."""
    names, dense, logits = setup()
    mats = {n: dense_to_sparse(dense[n], 20) for n in names}
    fuse = make_fusion("deepen", names, "a", matrices=mats)
    want = fuse(logits)
    got = fuse({n: x.clone().requires_grad_(True) for n, x in logits.items()})
    assert torch.equal(got.detach(), want)


def test_default_settings_compute_small_dense_matrices_exactly(monkeypatch):
    """With the default ``tail_mass`` (1e-4), a member whose dense matrix has at most
    `deepen.EXACT_ENTRIES` entries is not restricted to a support: the result is the published
    loop's (where a support would leave mass out); a larger one is restricted."""
    from dln_ens.fusion import deepen
    names, dense, logits = setup(V=(300, 200, 250), A=60, B=4)
    logits = {n: x / 3 for n, x in logits.items()}   # flat rows: a support would cap at max_support
    mats = {n: RelRepMatrix(60, dense=dense[n]) for n in names}
    fuse = make_fusion("deepen", names, "a", matrices=mats, max_support=32)
    assert not any(fuse.restricted.values())
    got = fuse(logits)
    assert torch.equal(got, make_fusion("deepen", names, "a", matrices=mats, tail_mass=0.0)(logits))
    want = reference_step(logits, dense, "a", {n: 1 / 3 for n in names}, 0.15, 5)
    assert torch.allclose(got, want, atol=2e-4, rtol=0)   # flat rows: Adam's steps amplify float rounding
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 250 * 60)   # now only a (300 x 60) is larger
    fuse = make_fusion("deepen", names, "a", matrices=mats, max_support=32)
    assert fuse.restricted == {"a": True, "b": False, "c": False}
    assert not torch.allclose(fuse(logits), want, atol=1e-3)   # 32 of 300 tokens leave real mass out


def test_top_k_matches_torch_topk():
    """`relative.top_k` (a selection over the groups with the largest maxima, on the CPU for
    wide rows) returns torch's top-k values in order, at indices that hold them, each index
    once, ties included."""
    from dln_ens.fusion.relative import top_k
    g = torch.Generator().manual_seed(5)
    for B, V, k in ((8, 5000, 256), (12, 33003, 256), (8, 4096, 256), (10, 20000, 64), (1, 32003, 256),
                    (3, 4096, 256)):   # the grouped path (widths with and without columns after the last group)
        x = torch.softmax(4 * torch.randn(B, V, generator=g), -1)
        x[0, :600] = x[0, 0]          # a tie across the boundary of the kept set
        if B > 1:
            x[1, ::7] = x[1].max()    # many tied maxima, spread over every group
            x[2, -3:] = 1.0           # the largest in the columns after the last whole group
        vals, idx = top_k(x, k)
        want = x.topk(k, dim=-1).values
        assert torch.equal(vals, want)
        assert torch.equal(x.gather(1, idx), vals)
        assert all(len(set(r.tolist())) == k for r in idx)


def test_dense_support_rows_gathered_or_whole_give_one_result(monkeypatch):
    """A restricted search over a dense matrix reads its support's rows gathered ([B, S, A]) or
    through products with the whole matrix (many rows: `relative.GATHERED_ROWS`); both are the
    same computation."""
    from dln_ens.fusion import deepen, relative
    monkeypatch.setattr(deepen, "EXACT_ENTRIES", 0)
    names, dense, logits = setup(V=(300, 200, 250), A=40, B=6)
    mats = {n: RelRepMatrix(40, dense=dense[n]) for n in names}
    targets = torch.tensor([0, 299, 5, 17, 150, 64])
    fuse = make_fusion("deepen", names, "a", matrices=mats, max_support=16)
    gathered = fuse(logits), fuse.target_logprobs(logits, targets)
    monkeypatch.setattr(relative, "GATHERED_ROWS", 0)
    whole = fuse(logits), fuse.target_logprobs(logits, targets)
    for a, b in zip(gathered, whole):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(gathered[0], make_fusion("deepen", names, "a", matrices=mats, tail_mass=0.0)(logits),
                              atol=1e-3)   # the restriction is in force
