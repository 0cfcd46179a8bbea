"""`unite`, `surface` and prompt-perplexity weighting inside EnsembleLanguageModel, against
from-scratch forwards of each member (no KV cache) written here."""
import pytest
import torch

from dln_ens.ensemble.continuation import Continuations
from dln_ens.ensemble.model import EnsembleLanguageModel
from dln_ens.ensemble.state import EnsembleState
from dln_ens.relrep.vocab import token_surfaces
from test_ensemble import PROMPTS, members  # noqa: F401  (module fixture)


def full_logprobs(member, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward without cache."""
    with torch.no_grad():
        lp = torch.log_softmax(member.model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_continuation_scores_equal_from_scratch_forwards(members):  # noqa: F811
    ens = EnsembleLanguageModel(members, main="sp", method="surface")
    texts = PROMPTS[:3]
    main_ids = [members["sp"].nonempty(ids) for ids in members["sp"].encode_many(texts)]
    state = EnsembleState(ens, texts, main_ids)
    for n in members:
        cur = main_ids if n == "sp" else [tr.ids for tr in state.tracks[n]]
        cont = Continuations(members[n].tokenizer, token_surfaces(members[n].tokenizer))
        rows, seqs = [], []
        for b in range(3):
            for word in (" the lazy dog", "\n", " quick", "s over"):
                seq = cont(word.encode())
                assert b"".join(token_surfaces(members[n].tokenizer)[i] for i in seq) == word.encode()
                rows.append(b)
                seqs.append(seq)
        with torch.no_grad():
            got = state.lanes[n].continuation_logprobs(rows, seqs, chunk=5)
        for r, seq, g in zip(rows, seqs, got):
            want = sum(full_logprobs(members[n], cur[r] + seq)[len(cur[r]) - 1:])
            assert float(g) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("method", ["unite", "surface"])
def test_one_member_is_its_greedy_output(members, method):  # noqa: F811
    for name in ("sp", "bpe"):
        m = members[name]
        surf = token_surfaces(m.tokenizer)
        ids, _ = m.generate_ids([m.nonempty(m.encode(p)) for p in PROMPTS], max_new_tokens=10)
        # the ensemble's text is its tokens' bytes (transformers' decode prints byte-fallback
        # runs differently): compare with the member's own greedy ids as bytes
        want = [b"".join(surf[i] or b"" for i in x if i not in m.stop_token_ids).decode("utf-8", "replace")
                for x in ids]
        got = EnsembleLanguageModel({name: m}, main=name, method=method).generate(PROMPTS, max_new_tokens=10)
        assert [g.text for g in got] == want
        assert [g.num_tokens for g in got] == [len(x) for x in ids]


def test_prompt_perplexity_weights_use_each_members_prompt_nll_per_byte(members):  # noqa: F811
    ens = EnsembleLanguageModel(members, main="bpe", method="unite", weighting="perplexity",
                                weighting_temperature=0.5)
    texts = PROMPTS[1:3]
    main_ids = [members["bpe"].nonempty(ids) for ids in members["bpe"].encode_many(texts)]
    with torch.no_grad():
        lanes = EnsembleState(ens, texts, main_ids).lanes
    for n, m in members.items():
        for b, t in enumerate(texts):
            ids = main_ids[b] if n == "bpe" else m.encode(t)
            want = -sum(full_logprobs(m, ids)) / len(t.encode())
            assert float(lanes[n].prompt_nll[b]) == pytest.approx(want, abs=1e-4)
    batch = ens.generate(PROMPTS, max_new_tokens=6)
    for p, g in zip(PROMPTS, batch):   # rows leave the batch: weights stay with their row
        assert ens.generate([p], max_new_tokens=6)[0].text == g.text


def test_fast_score_mode_is_refused_where_it_cannot_work(members):  # noqa: F811
    with pytest.raises(ValueError, match="score_mode 'fast'"):
        EnsembleLanguageModel(members, main="sp", method="surface", score_mode="fast")
    with pytest.raises(ValueError, match="score_mode 'fast'"):
        EnsembleLanguageModel(members, main="sp", method="unite", weighting="perplexity", score_mode="fast")
