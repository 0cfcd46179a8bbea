"""`unite`, `surface` and the weighting schemes against slow loops written here: dense scans of
the vocabularies for surfaces, one candidate and one member at a time."""
import math

import pytest
import torch

from dln_ens.fusion.base import StepContext, Vocab
from dln_ens.fusion.registry import make_fusion
from dln_ens.fusion.weighting import normalised_entropy

# two toy vocabularies over letters: "a" has single letters and " x" words, "b" has some pairs and
# no space-led tokens; surfaces missing in a vocabulary are carried by its greedy tokenisation
SURF = {
    "a": [None] + [bytes([c]) for c in b"abcdefgh "] + [b" ab", b" cd", b"ef", b" gh", b"e", b"a"],   # e, a twice
    "b": [None] + [bytes([c]) for c in b"abcdh "] + [b"ab", b"cd", b"efg", b"gh", b"e", b"f", b"g"],
}


def greedy_tokenise(surfaces, data: bytes) -> list[int]:
    """Longest-match tokenisation over the surfaces (the test's stand-in for a tokenizer)."""
    out, i = [], 0
    while i < len(data):
        best = max((j for j, s in enumerate(surfaces) if s and data.startswith(s, i)),
                   key=lambda j: len(surfaces[j]), default=None)
        if best is None:
            return []
        out.append(best)
        i += len(surfaces[best])
    return out


def vocab(n):
    return Vocab(SURF[n], [None if s is None else s.decode() for s in SURF[n]])


def continuation(n, data):
    return greedy_tokenise(SURF[n], data)


def logits(seed, B=3):
    g = torch.Generator().manual_seed(seed)
    return {n: 2.5 * torch.randn(B, len(s), generator=g) for n, s in SURF.items()}


def scan_id(n, s, zrow):
    """The id of surface s in member n by a dense scan (the most probable one if it has several),
    else the first token of its tokenisation."""
    hits = [i for i, x in enumerate(SURF[n]) if x == s]
    if hits:
        return max(hits, key=lambda i: float(zrow[i]))
    seq = continuation(n, s)
    return seq[0] if seq else None


def union_keys(z, main, k):
    keys = []
    for n, x in z.items():
        for i in x.topk(k).indices.tolist():
            s = SURF[n][i]
            key = s if s else (i if n == main else None)
            if key is not None and key not in keys:
                keys.append(key)
    # a bare space goes when a candidate is that space and a word
    return [k for k in keys if not (isinstance(k, bytes) and set(k) == {32} and
                                    any(isinstance(w, bytes) and len(w) > len(k) and w.startswith(k)
                                        and w[len(k)] != 32 for w in keys))]


def reference(method, z, main, w, k, score=None):
    """Dense per-row loop: fused candidate probabilities placed on the main vocabulary."""
    out = []
    for b in range(next(iter(z.values())).shape[0]):
        zb = {n: x[b] for n, x in z.items()}
        keys = union_keys(zb, main, k)
        fused = [0.0] * len(keys)
        for n, wn in w.items():
            wb = wn[b] if isinstance(wn, torch.Tensor) else wn
            if method == "unite":
                ids = [scan_id(n, key, zb[n]) if isinstance(key, bytes) else (key if n == main else None)
                       for key in keys]
                present = [j for j, i in enumerate(ids) if i is not None]
                denom = sum(math.exp(zb[n][ids[j]]) for j in present)
                for j in present:
                    fused[j] += wb * math.exp(zb[n][ids[j]]) / denom
            else:
                p = torch.softmax(zb[n], -1)
                for j, key in enumerate(keys):
                    if isinstance(key, int) or key in SURF[n]:   # one of its tokens
                        i = key if isinstance(key, int) else scan_id(n, key, zb[n])
                        fused[j] += wb * float(p[i]) if (n == main or isinstance(key, bytes)) else 0.0
                    elif seq := continuation(n, key):
                        fused[j] += wb * math.exp(score(n, b, seq))
        wm = w[main][b] if isinstance(w[main], torch.Tensor) else w[main]
        row = (wm * torch.softmax(zb[main], -1)).tolist()
        best = {}
        for key, f in zip(keys, fused):
            i = scan_id(main, key, zb[main]) if isinstance(key, bytes) else key
            if i is not None and f > 0:
                best[i] = max(best.get(i, 0.0), f)
        for i, f in best.items():
            row[i] = f
        row = torch.tensor(row)
        out.append(torch.log(row / row.sum()))
    return torch.stack(out)


def toy_score(n, row, seq):
    """A deterministic stand-in for a member's log p(seq | row's context)."""
    g = torch.Generator().manual_seed(1000 * row + sum((7 ** k) * (t + 1) for k, t in enumerate(seq)) % 99991
                                      + (0 if n == "a" else 500))
    return float(-torch.rand(1, generator=g)[0] * 3 * len(seq))


def toy_step(calls):
    def score(n, rows, seqs):
        calls.append((n, len(rows)))
        return torch.tensor([toy_score(n, r, s) for r, s in zip(rows, seqs)])
    return StepContext(score=score)


@pytest.mark.parametrize("main", ["a", "b"])
def test_unite_against_a_dense_loop(main):
    z = logits(1)
    fuse = make_fusion("unite", ["a", "b"], main, vocab=vocab, continuation=continuation, topk=4,
                       weights={"a": 0.7, "b": 0.3})
    want = reference("unite", z, main, {"a": 0.7, "b": 0.3}, 4)
    assert torch.allclose(fuse(z), want, atol=1e-5)


@pytest.mark.parametrize("main", ["a", "b"])
def test_surface_against_a_dense_loop_with_one_batched_call_per_member(main):
    z = logits(2)
    calls = []
    fuse = make_fusion("surface", ["a", "b"], main, vocab=vocab, continuation=continuation, topk=3)
    got = fuse(z, toy_step(calls))
    want = reference("surface", z, main, {"a": 0.5, "b": 0.5}, 3, score=toy_score)
    assert torch.allclose(got, want, atol=1e-5)
    assert sorted(n for n, _ in calls) == ["a", "b"]          # one batched call per member


def test_surface_agrees_across_where_the_space_goes():
    """Member "s" has " w" tokens; member "t" has a space token and bare words. Both follow the
    same word distribution q, so "t"'s probability of the text " w" is p(" ") q(w) = q(w): the
    fused distribution must equal that of two copies of "s"."""
    words = [b"ox", b"cat", b"dog", b"emu", b"yak"]
    q = torch.softmax(torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0], [0.0, 3.0, 0.2, 0.1, -2.0]]), -1)
    surf = {"s": [None] + [b" " + w for w in words] + [b" "], "t": [None, b" "] + words}
    surf["s2"] = surf["s"]
    vocabs = {n: Vocab(v, [None if x is None else x.decode() for x in v]) for n, v in surf.items()}
    word_logp = torch.log(q)
    z = {"s": torch.cat([torch.full((2, 1), -30.0), word_logp, torch.full((2, 1), -30.0)], 1),
         "t": torch.cat([torch.full((2, 1), -30.0), torch.zeros(2, 1), torch.full((2, 5), -30.0)], 1)}
    z["s2"] = z["s"]

    def score(n, rows, seqs):
        out = []
        for r, seq in zip(rows, seqs):
            text = b"".join(surf[n][i] for i in seq)
            w = text[1:] if text.startswith(b" ") else None
            out.append(float(word_logp[r, words.index(w)]) if w in words and (n != "t" or len(seq) == 2)
                       else -60.0)
        return torch.tensor(out)

    def cont(n, data):
        return greedy_tokenise(surf[n], data)

    step = StepContext(score=score)
    mixed = make_fusion("surface", ["s", "t"], "s", vocab=vocabs, continuation=cont, topk=3)(z, step)
    twins = make_fusion("surface", ["s", "s2"], "s", vocab=vocabs, continuation=cont, topk=3)(z, step)
    assert torch.allclose(mixed.exp(), twins.exp(), atol=1e-6)
    assert torch.equal(mixed.argmax(-1), q.argmax(-1) + 1)
    # union/unite compare tokens: "t"'s space token carries no word, so its vote differs
    unite = make_fusion("unite", ["s", "t"], "s", vocab=vocabs, continuation=cont, topk=3)(z)
    assert not torch.allclose(unite.exp(), twins.exp(), atol=1e-3)


def test_entropy_and_perplexity_weights_against_loops():
    z = logits(3)
    for scheme in ("entropy", "perplexity"):
        nll = {"a": torch.tensor([0.5, 1.5, 1.0]), "b": torch.tensor([1.0, 0.2, 1.0])}
        fuse = make_fusion("unite", ["a", "b"], "a", vocab=vocab, continuation=continuation, topk=4,
                           weighting=scheme, weighting_temperature=0.3, weights={"a": 0.6, "b": 0.4})
        step = StepContext(score=None, prompt_nll=nll)
        w = {"a": [], "b": []}
        for b in range(3):
            raw = {}
            for n, prior in (("a", 0.6), ("b", 0.4)):
                if scheme == "entropy":
                    p = torch.softmax(z[n][b], -1)
                    h = -sum(float(x) * math.log(float(x)) for x in p) / math.log(len(p))
                else:
                    h = float(nll[n][b])
                raw[n] = prior * math.exp(-h / 0.3)
            for n in raw:
                w[n].append(raw[n] / sum(raw.values()))
        got_w = fuse.row_weights(z, step)
        assert torch.allclose(got_w, torch.tensor([w["a"], w["b"]]).T, atol=1e-5)
        want = reference("unite", z, "a", {n: torch.tensor(v) for n, v in w.items()}, 4)
        assert torch.allclose(fuse(z, step), want, atol=1e-5)
    # a peaked member is more confident: it gets the larger entropy weight
    peaked = {"a": 10 * z["a"], "b": z["b"]}
    assert (normalised_entropy(peaked["a"]) < normalised_entropy(z["b"])).all()


def test_weighting_settings_are_checked():
    kw = dict(vocab=vocab, continuation=continuation)
    with pytest.raises(ValueError, match="'fixed' needs"):
        make_fusion("unite", ["a", "b"], "a", weighting="fixed", **kw)
    with pytest.raises(ValueError, match="ignores the given weights"):
        make_fusion("unite", ["a", "b"], "a", weighting="uniform", weights={"a": 1, "b": 2}, **kw)
    with pytest.raises(ValueError, match="weighting must be one of"):
        make_fusion("unite", ["a", "b"], "a", weighting="entropyy", **kw)
    with pytest.raises(ValueError, match="weighting_temperature"):
        make_fusion("unite", ["a", "b"], "a", weighting="entropy", weighting_temperature=0, **kw)
