"""Several local members with different vocabularies behind the one LanguageModel protocol.

Each decoding step (DESIGN "Fusion per decoding step"): every member runs one incremental
forward on its own KV cache, `Fusion` maps their next-token logits to one distribution over
the main member's vocabulary, a token is chosen, its surface bytes extend the shared text; the
main member appends the id and every other member re-tokenises incrementally (`align`).

Batching. Rows of a batch drift apart in every non-main member (each re-tokenisation keeps a
different number of tokens), so each member keeps ONE batched KV cache whose attention mask
may have holes (`lm.decoder.DecodeState`, the decoder `HFLanguageModel` uses too): rolling a row back masks its dropped positions out, and the row's
new tokens are appended, left-padded, in a block shared by the batch, with position ids that
count the row's real tokens. One forward per member per step serves the whole batch; holes
cost a few wasted cache columns, never a result that depends on the batch (masked positions
are invisible, and the fusion is row-independent). Finished rows leave the caches.

All member calls go through ``member.forward`` (MoD members override it); members may sit on
different devices; the fusion runs on ``compute_device``.

Methods that read more than the logits (`surface`; perplexity weighting) get a `StepContext`
from `EnsembleState.fused`: a batched scorer of token continuations on each member's cache
(``DecodeState.continuation_logprobs``) and each member's NLL of the prompt per byte.

Speed defaults (``python -m dln_ens.bench decode``): ``tail_mass=1e-4, max_support=256``
restrict the relative-space work to each distribution's top tokens (`fusion.relative`), for
members whose matrices are large enough for that to save work (`fusion.deepen.restricts`; small
dense ones such as the zoo's are computed exactly, `python -m dln_ens.bench fusion`). Against
the exact search on the same dense matrices it changed no argmax and cost KL ~1e-5; what
limits fidelity is the *matrix* (sparse k=64 rows vs dense rows), not this restriction.
``tail_mass=0`` is the exact computation (the tests compare it with the published loop).

Text. The generated text is the main member's token surface bytes decoded with
``errors="replace"`` (transformers' ``decode`` may print a run of byte-fallback tokens
differently); stop strings are searched in that text.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dln_ens.ensemble.align import final_text
from dln_ens.ensemble.continuation import Continuations
from dln_ens.ensemble.onepass import member_reads, prefix_texts
from dln_ens.ensemble.options import EnsembleOptions
from dln_ens.ensemble.state import EnsembleState
from dln_ens.fusion.base import Vocab
from dln_ens.fusion.registry import fusion_class, fusion_settings, make_fusion
from dln_ens.lm.base import Generation, Score, missing_member_parts
from dln_ens.lm.batching import chunks
from dln_ens.lm.context import ContextLengthError, cut_text_left
from dln_ens.lm.forced import LogitRows, logit_rows, per_target_sums
from dln_ens.lm.candidates import candidate_logprobs, check_candidates
from dln_ens.lm.sampling import pick_tokens, sampling_seeds
from dln_ens.lm.stopping import cut_at_stop, first_stop
from dln_ens.relrep.vocab import token_surfaces

FUSION_ROWS = 32   # positions per fusion call in the one-pass score: its [rows, V] and [rows, anchors]
                   # temporaries stay in cache (8 pairs of real vocabularies: 0.89x the time of 64 rows)


class EnsembleLanguageModel:
    """DeePEn-style fusion of local members (name -> `LocalMember`) over ``main``'s vocabulary.

    matrices: directory built by ``sh sh/mat.sh`` (fingerprints, build settings and checksums
    checked) or a preloaded {name: RelRepMatrix}; read only by methods that need them.
    matrix_params: build settings the directory must have been built with (e.g. {"topk": 64,
    "temperature": 100.0}; a config passes all of them). Keyword arguments are the
    `EnsembleOptions`, and any other keyword is a setting of the fusion method (``lr``,
    ``steps``, ``tail_mass``... see `fusion.registry`). Members the method does not read (all
    but the main one for ``main`` or ``lr=0``) are never run.
    """

    def __init__(self, members: dict, main: str, matrices=None, weights: dict[str, float] | None = None,
                 method: str = "deepen", *, name: str | None = None, options: EnsembleOptions | None = None,
                 matrix_params: dict | None = None, **kwargs):
        option_keys = {f.name for f in dataclasses.fields(EnsembleOptions)}
        opts = {k: v for k, v in kwargs.items() if k in option_keys}
        fusion = {k: v for k, v in kwargs.items() if k not in option_keys}
        if options is None:
            options = EnsembleOptions(method=method, weights=weights, **opts,
                                      fusion={**opts.pop("fusion", {}), **fusion})
        elif kwargs or weights is not None or method != "deepen":
            raise ValueError("EnsembleLanguageModel: give either options=EnsembleOptions(...) or keyword "
                             "settings, not both")
        if not members:
            raise ValueError("EnsembleLanguageModel: no members")
        if main not in members:
            raise ValueError(f"main member {main!r} is not among the members {list(members)}")
        options.check(list(members))
        for n, m in members.items():
            missing = missing_member_parts(m)
            if missing:
                raise ValueError(f"ensemble member {n!r} ({type(m).__name__}) cannot be fused: it lacks "
                                 f"{', '.join(missing)} (see `dln_ens.lm.base.LocalMember`); use a local "
                                 f"hf/mod backend, or implement them")
        self.options = options
        self.members, self.main, self.names = dict(members), main, list(members)
        self.name = name or "ensemble(" + "+".join(self.names) + ")"
        self.score_mode = options.resolved_score_mode()
        self.window, self.verify_alignment = options.window, options.verify_alignment
        self.main_member = members[main]
        self.batch_size = options.batch_size or getattr(self.main_member, "batch_size", 8)
        self.vocab_size = self.main_member.vocab_size
        self.stop_ids = set(self.main_member.stop_token_ids)   # EOS and generation_config's ids
        self.surfaces = token_surfaces(self.main_member.tokenizer)
        cls = fusion_class(options.method)
        settings = fusion_settings(options.method, options.fusion, len(self.names))
        mats = self._load_matrices(matrices, matrix_params) if cls.needs_matrices(settings, len(self.names)) else None
        self._continuations: dict[str, Continuations] = {}
        self.fusion = make_fusion(options.method, self.names, main, weights=options.weights, matrices=mats,
                                  vocab=self._vocab, continuation=self._continuation, weighting=options.weighting,
                                  weighting_temperature=options.weighting_temperature,
                                  device=options.compute_device, **options.fusion)
        self.compute_device = self.fusion.device
        self.truncated = 0   # examples cut on the left (members with truncate="left")

    @property
    def others(self) -> list[str]:
        """The non-main members the fusion reads: only these are run."""
        return [n for n in self.fusion.active() if n != self.main]

    def _vocab(self, n: str) -> Vocab:
        tok = self.members[n].tokenizer
        surf = token_surfaces(tok)
        return Vocab(surf, tok.convert_ids_to_tokens(list(range(len(surf)))))

    def _continuation(self, n: str, surface: bytes) -> list[int]:
        if n not in self._continuations:
            tok = self.members[n].tokenizer
            self._continuations[n] = Continuations(tok, token_surfaces(tok))
        return self._continuations[n](surface)

    def _load_matrices(self, matrices, params: dict | None):
        """{member: RelRepMatrix}, checked against the members."""
        if matrices is None:
            raise ValueError(f"{self.name}: method 'deepen' needs relative-representation matrices "
                             f"(a directory built by `sh sh/mat.sh`, or a dict of RelRepMatrix)")
        if isinstance(matrices, (str, Path)):
            from dln_ens.relrep.store import load_matrices
            mats, _ = load_matrices(matrices, self.members, params)
        else:
            mats = dict(matrices)
        for n in self.names:
            if n not in mats:
                raise ValueError(f"{self.name}: no matrix for member {n!r}; rebuild with `sh sh/mat.sh`")
            if mats[n].num_rows != self.members[n].vocab_size:
                raise ValueError(f"{self.name}: the matrix of {n!r} has {mats[n].num_rows} rows but the model "
                                 f"has {self.members[n].vocab_size} logits; rebuild with `sh sh/mat.sh`")
        return mats

    # ---- context limits ----------------------------------------------------------------------

    def _positions(self, name: str, text: str, reserve: int, generating: bool) -> int:
        """Positions member ``name`` needs for ``text`` plus ``reserve`` new main tokens; while
        generating, another member is given two tokens per main token (its tokens of the same
        text may be more; a member that still runs out fails with a ContextLengthError)."""
        member = self.members[name]
        extra = 2 * reserve if generating and name != self.main else reserve
        return len(member.nonempty(member.encode(text))) + extra

    def fit_text(self, index: int, text: str, tail: str, reserve: int, what: str, generating: bool = False) -> str:
        """``text`` such that every member fits ``text + tail`` plus ``reserve`` positions in its
        context limit: unchanged, cut on the left when every member that overflows has policy
        "left" (counted in ``truncated``), else a ContextLengthError naming the member."""
        run = self.fusion.active()     # members that do not run need no room
        limits = {n: self.members[n].context_limit for n in run if getattr(self.members[n], "context_limit", None)}
        over = [(n, need, limits[n]) for n in limits
                if (need := self._positions(n, text + tail, reserve, generating)) > limits[n]]
        if not over:
            return text
        for n, need, limit in over:
            if getattr(self.members[n], "truncate", "error") == "error":
                raise ContextLengthError(n, index, need, limit, what, text=text)
        fits = lambda t: all(self._positions(n, t + tail, reserve, generating) <= limit   # noqa: E731
                             for n, limit in limits.items())
        cut = cut_text_left(text, fits)
        if cut is None:
            n, need, limit = over[0]
            raise ContextLengthError(n, index, need, limit, what + " (even with the input cut away)", text=text)
        self.truncated += 1
        return cut

    # ---- one batch of sequences -------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, texts: list[str], main_ids: list[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
               temperature: float = 0.0, seeds: Sequence[int] | None = None):
        """Generate from one batch of prompts (``texts`` and the main member's ids of them; the
        token-level ``generate``, used by the server). Returns per row the generated ids (through
        the stopping token), their fused log-probs, and the generated text's bytes (without a
        stop token's)."""
        B = len(texts)
        out_ids, out_lp, gen = [[] for _ in range(B)], [[] for _ in range(B)], [b"" for _ in range(B)]
        if max_new_tokens <= 0:
            return out_ids, out_lp, gen
        state = EnsembleState(self, texts, main_ids)
        gens = None
        if temperature > 0:
            gens = [torch.Generator(device=self.compute_device).manual_seed(s) for s in seeds]
        for t in range(max_new_tokens):
            logp = state.fused()
            tok = pick_tokens(logp, temperature, gens)
            lp = logp.gather(1, tok[:, None])[:, 0].tolist()
            tok = tok.tolist()
            done = []
            for i, r in enumerate(state.rows):
                out_ids[r].append(tok[i])
                out_lp[r].append(lp[i])
                if tok[i] in self.stop_ids:
                    done.append(True)
                else:
                    gen[r] += self.surfaces[tok[i]] or b""
                    done.append(bool(stop) and first_stop(final_text(gen[r]), stop) >= 0)
            if t == max_new_tokens - 1 or all(done):
                break
            if any(done):
                live = [i for i, d in enumerate(done) if not d]
                state.keep_rows(live)
                tok = [tok[i] for i in live]
                gens = gens and [gens[i] for i in live]
            state.append(tok)
        return out_ids, out_lp, gen

    @torch.inference_mode()
    def _forced_logprobs(self, texts: list[str], main_ids: list[list[int]], targets: list[list[int]]) -> list[float]:
        """Exact teacher forcing: one fused step per target token, each member conditioned on the
        text so far tokenised as in generation. Summed fused log-probs of each target."""
        state = EnsembleState(self, texts, main_ids)
        out = [0.0] * len(texts)
        for t in range(max(map(len, targets))):
            logp = state.fused()
            tok = [targets[r][t] for r in state.rows]
            lp = logp.gather(1, torch.tensor(tok, device=logp.device)[:, None])[:, 0].tolist()
            for r, x in zip(state.rows, lp):
                out[r] += x
            live = [i for i, r in enumerate(state.rows) if len(targets[r]) > t + 1]
            if not live:
                break
            if len(live) < len(state.rows):
                state.keep_rows(live)
                tok = [tok[i] for i in live]
            state.append(tok)
        return out

    # ---- the protocol -----------------------------------------------------------------------

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[Generation]:
        """As `LanguageModel.generate`; ``logprob`` sums the fused (untempered) log-probs of the
        generated tokens, through the one that completed a stop string or the EOS token."""
        seeds = sampling_seeds(temperature, seed, prompts)
        main = self.main_member
        out: list[Generation | None] = [None] * len(prompts)
        reserve = max(max_new_tokens - 1, 0)
        for idx in chunks(list(range(len(prompts))), self.batch_size):
            texts = [self.fit_text(i, prompts[i], "", reserve, f"a prompt + max_new_tokens={max_new_tokens}",
                                   generating=True) for i in idx]
            main_ids = [main.nonempty(ids) for ids in main.encode_many(texts)]
            try:
                ids, lps, gen = self.decode(texts, main_ids, max_new_tokens, stop, temperature, [seeds[i] for i in idx])
            except ContextLengthError as e:
                raise e.at(idx[e.index]) from None
            for j, i in enumerate(idx):
                out[i] = Generation(text=cut_at_stop(final_text(gen[j]), stop), logprob=float(sum(lps[j])),
                                    num_tokens=len(ids[j]))
        return out

    def score(self, contexts: list[str], targets: list[str]) -> list[Score]:
        """Teacher-forced fused log p(target | context) over the main member's tokenisation of
        the target (`HFLanguageModel.split_pairs`); every member is conditioned on exactly the
        text before each target token, tokenised as in generation.

        ``score_mode="fast"`` (what "auto" picks where the method allows it): per batch of pairs,
        the main member teacher-forces them as `HFLanguageModel.score` does; every other member
        runs one sequence per pair and reads
        its distributions where that sequence has the prefix's tokenisation as a prefix, the
        remaining prefixes as sequences of their own, all in one batched call (`onepass`); the
        fusion runs once over all positions. ``"exact"``: a forced decode, one fused step per
        target token (the reference; the two differ only by float rounding)."""
        contexts = [self.fit_text(i, c, t, -1, "a context + target") for i, (c, t) in enumerate(zip(contexts, targets))]
        split = self.main_member.split_pairs_with_text(contexts, targets)
        out = [Score(0.0, 0)] * len(split)
        todo = sorted((i for i, (_, _, t) in enumerate(split) if t), key=lambda i: split[i][1:])
        for idx in chunks(todo, self.batch_size):
            rows = [split[i] for i in idx]
            if self.score_mode == "fast":
                lps = self._score_onepass(rows)
            else:
                lps = self._forced_logprobs([x for x, _, _ in rows], [c for _, c, _ in rows], [t for _, _, t in rows])
            for j, i in enumerate(idx):
                out[i] = Score(float(lps[j]), len(split[i][2]))
        return out

    @torch.inference_mode()
    def forced_member_logits(self, rows: list[tuple[str, list[int], list[int]]]) -> dict[str, LogitRows]:
        """Teacher forcing over (context text, context ids, target ids) rows: per member the fusion
        reads, its next-token logits before every target token, sum of target lengths rows
        (pair by pair) left where its forwards wrote them (`LogitRows`: the fusion copies one
        block at a time). The main member is conditioned on the ids; every other member on its own
        tokenisation of the text before the token, as in generation, in one pass (`onepass`)."""
        main = self.main_member
        logits = {self.main: logit_rows(main, [c + t[:-1] for _, c, t in rows], [tuple(c) for _, c, _ in rows],
                                       [range(len(c) - 1, len(c) + len(t) - 1) for _, c, t in rows])}
        if self.others:
            surface = lambda k: (self.surfaces[k] if k < len(self.surfaces) else None) or b""   # noqa: E731
            prefixes = [prefix_texts(x, [surface(k) for k in t]) for x, _, t in rows]
            for n in self.others:
                reads = member_reads(self.members[n].tokenizer, prefixes, [x for x, _, _ in rows], window=self.window,
                                     verify=self.verify_alignment, name=n)
                logits[n] = logit_rows(self.members[n], reads.seqs, reads.groups, reads.wanted, order=reads.order)
        return logits

    @torch.inference_mode()
    def forced_distributions(self, rows: list[tuple[str, list[int], list[int]]]) -> torch.Tensor:
        """[sum of target lengths, V_main] fused log-probabilities before every target token of
        (context text, context ids, target ids) rows (`forced_member_logits`, fused in blocks)."""
        return self._by_blocks(self.forced_member_logits(rows), lambda block, a: self.fusion(block))

    @torch.inference_mode()
    def _score_onepass(self, rows: list[tuple[str, list[int], list[int]]]) -> list[float]:
        """Summed fused log-probs of (context text, context ids, target ids) rows (fused in blocks)."""
        flat = torch.tensor([k for _, _, t in rows for k in t])
        lp = self._by_blocks(self.forced_member_logits(rows),
                             lambda block, a: self.fusion.target_logprobs(block, flat[a:a + FUSION_ROWS]))
        return per_target_sums(lp, [t for _, _, t in rows])

    def _by_blocks(self, logits: dict[str, LogitRows], fuse) -> torch.Tensor:
        """``fuse(block, a)`` on every FUSION_ROWS positions a.. of the members' rows (the fusion is
        row-independent: blocks keep its temporaries small), the results concatenated."""
        return torch.cat([fuse({n: x.take(a, a + FUSION_ROWS) for n, x in logits.items()}, a)
                          for a in range(0, len(logits[self.main]), FUSION_ROWS)])

    @torch.inference_mode()
    def next_token_distribution(self, contexts: list[str]) -> torch.Tensor:
        """[B, V_main] float32 fused log-probabilities (cpu) of the token after each context."""
        main = self.main_member
        out = torch.empty((len(contexts), self.vocab_size), dtype=torch.float32)
        for idx in chunks(list(range(len(contexts))), self.batch_size):
            texts = [self.fit_text(i, contexts[i], "", 0, "a context") for i in idx]
            out[idx] = EnsembleState(self, texts, [main.nonempty(ids) for ids in main.encode_many(texts)]).fused().cpu()
        return out

    def next_token_logprobs(self, contexts: list[str], candidates: list[str], *,
                            aggregate: str = "max") -> np.ndarray:
        """One fused step per context; candidates tokenised by the main member and their forms
        combined exactly as `HFLanguageModel.next_token_logprobs` does (see `lm.candidates`)."""
        check_candidates(candidates, aggregate)  # before the fused step, which is costly
        return candidate_logprobs(self.main_member, self.next_token_distribution(contexts),
                                  contexts, candidates, aggregate)
