"""The served backend at token level: one `Engine.complete` call answers a batch of prompts
that share their settings (`Params`).

Backends: an `HFLanguageModel` (a Mixture-of-Depths member included: its ``forward`` makes the
logits) or an `EnsembleLanguageModel` (the fused distribution over the main member's vocabulary).

- Generation is the backend's own decoding, so a served prompt gets exactly the in-process
  ``generate`` text (same per-prompt seeds: sampling is keyed on the prompt text).
- Log-probs of prompt (``echo``) and generated tokens, with ``top_logprobs``, are recomputed
  teacher-forced over prompt + generated ids. HF: one forward pass. Ensemble: the fused
  distribution before every token, each member conditioned as `EnsembleLanguageModel.score`
  conditions it (the main member on the ids, the others on their own tokenisation of the text
  before the position), as the ensemble's one-pass score reads them
  (`EnsembleLanguageModel.forced_distributions`).
  Scoring starts at the first position with text before it: after a BOS token the first text
  token has no log-prob (the other members would see no text). ``logprobs: 0`` without echo
  returns the decoding's own log-probs, no recompute.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dln_ens.errors import UserError
from dln_ens.lm.batching import chunks
from dln_ens.lm.forced import logits_at
from dln_ens.lm.hf import PROMPT_TAIL
from dln_ens.lm.sampling import sampling_seeds
from dln_ens.lm.stopping import continuation_texts, cut_at_stop, first_stop
from dln_ens.relrep.vocab import token_surfaces
from dln_ens.serve.request import Params, Prompt
from dln_ens.serve.tokens import logprobs_block, text_offsets, token_texts


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def every_position(lm, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, the float32 logits [len(s), V] after each of its prefixes (row i predicts
    token i + 1): `lm.forced.logits_at`, batches of ``lm.batch_size``."""
    out = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])   # neighbours share prefixes
    for idx in chunks(order, lm.batch_size):
        rows = [seqs[i] for i in idx]
        lm.check_length(max(map(len, rows)), "a prompt")
        logits = logits_at(lm, rows, list(range(len(rows))), [range(len(s)) for s in rows])
        at = 0
        for i, s in zip(idx, rows):
            out[i] = logits[at:at + len(s)]
            at += len(s)
    return out


@dataclass
class Completion:
    ids: list[int]            # prompt ids
    prompt_text: str | None   # the prompt string; None when it came as token ids
    new_ids: list[int]
    new_logps: list[float]
    raw: str                  # generated text before stop strings are cut
    finish: str


class Engine:
    def __init__(self, lm):
        from dln_ens.ensemble.model import EnsembleLanguageModel
        from dln_ens.lm.hf import HFLanguageModel

        if isinstance(lm, EnsembleLanguageModel):
            self.main = lm.main_member
        elif isinstance(lm, HFLanguageModel):
            self.main = lm
        else:
            raise UserError(f"backend {getattr(lm, 'name', lm)!r} ({type(lm).__name__}) cannot be served: "
                            f"dln-ens serve needs a local model ('hf', 'mod' or 'ensemble' backend)")
        self.lm, self.ensemble = lm, isinstance(lm, EnsembleLanguageModel)
        self.name = lm.name
        self.vocab_size = self.main.vocab_size
        self.surfaces = list(token_surfaces(self.main.tokenizer))
        for t, tok in enumerate(self.main.tokenizer.convert_ids_to_tokens(list(range(len(self.surfaces))))):
            if self.surfaces[t] is None and tok and BYTE_TOKEN.fullmatch(tok):   # byte fallback declared special
                self.surfaces[t] = bytes([int(tok[3:5], 16)])
        self.stop_ids = set(self.main.stop_token_ids)
        self.calls = 0   # backend calls (`complete`), for tests and benchmarks

    def piece(self, tok: int) -> bytes:
        return (self.surfaces[tok] if tok < len(self.surfaces) else None) or b""

    def decode(self, ids: list[int]) -> str:
        return "".join(token_texts([self.piece(t) for t in ids]))

    # ---- decoding ---------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], params: Params) -> list[Completion]:
        ids = [self.main.nonempty(self.main.encode(p)) if isinstance(p, str) else p for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        if params.max_tokens == 0:
            return [Completion(i, t, [], [], "", "length") for i, t in zip(ids, texts)]
        if self.ensemble:
            keys = [t if t is not None else self.decode(i) for i, t in zip(ids, texts)]
            seeds = sampling_seeds(params.temperature, params.seed, keys)
            new_ids, logps, raws = [], [], []
            for idx in chunks(list(range(len(ids))), self.lm.batch_size):
                out_ids, out_lp, gen = self.lm.decode([keys[i] for i in idx], [ids[i] for i in idx], params.max_tokens,
                                                      params.stop, params.temperature, [seeds[i] for i in idx])
                new_ids += out_ids
                logps += out_lp
                raws += [g.decode("utf-8", errors="replace") for g in gen]
        else:
            keys = [t if t is not None else " ".join(map(str, i)) for i, t in zip(ids, texts)]
            new_ids, logps = self.lm.generate_ids(ids, max_new_tokens=params.max_tokens, stop=params.stop,
                                                  temperature=params.temperature, seed=params.seed, texts=keys)
            raws = continuation_texts(self.main.tokenizer, [i[-PROMPT_TAIL:] for i in ids], new_ids)
        out = []
        for i, t, new, lp, raw in zip(ids, texts, new_ids, logps, raws):
            stopped = bool(new) and (new[-1] in self.stop_ids or first_stop(raw, params.stop) >= 0)
            out.append(Completion(i, t, new, lp, raw, "stop" if stopped else "length"))
        return out

    # ---- teacher-forced log-probs -------------------------------------------------------------

    @staticmethod
    def _tops(logp: torch.Tensor, k: int) -> list[dict]:
        if k <= 0:
            return [{} for _ in range(logp.shape[0])]
        v, i = logp.topk(min(k, logp.shape[-1]), -1)
        return [dict(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]

    @torch.inference_mode()
    def token_logprobs(self, seqs: list[list[int]], texts: list[str | None], top: int) -> list[tuple[list, list]]:
        """Per sequence: the log-prob of each token given the ones before (None for the first)
        and the top-``top`` alternatives at each position. ``texts``: the prompt strings the
        sequences start with (None for token-id prompts)."""
        if not self.ensemble:
            starts = [1] * len(seqs)
            logps = [torch.log_softmax(x[:-1], -1) for x in every_position(self.lm, seqs)]
        else:
            starts, logps = self._ensemble_logprobs(seqs, texts)
        out = []
        for s, k, lp in zip(seqs, starts, logps):
            if lp is None:
                out.append(([None] * len(s), [None] * len(s)))
                continue
            lp = lp[-(len(s) - k):] if k < len(s) else lp[:0]
            chosen = lp.gather(1, torch.tensor(s[k:], dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
            out.append(([None] * k + chosen, [None] * k + self._tops(lp, top)))
        return out

    def _ensemble_start(self, ids: list[int], text: str | None) -> tuple[int, str]:
        """The first k tokens (the context of the first scored position) and the text they stand
        for: taken from the original prompt ``text`` when the token texts contain it (a BOS, a
        SentencePiece leading space aside), else from the token texts. k is the first position
        with text before it."""
        pieces = [self.piece(t) for t in ids]
        shown = token_texts(pieces)
        offs, whole = text_offsets(shown), "".join(shown)
        at = whole.find(text) if text else -1
        base, shift = (text, at) if at >= 0 else (whole, 0)
        for k in range(1, len(ids)):
            starts_char = not pieces[k] or (pieces[k][0] & 0xC0) != 0x80
            if starts_char and base[:max(0, offs[k] - shift)]:
                return k, base[:offs[k] - shift]
        return len(ids), base

    def _ensemble_logprobs(self, seqs, texts):
        """The fused distribution before every token from position k on, as the decoding loop of
        `EnsembleLanguageModel.score` conditions the members (the main member on the ids, every
        other member on its tokenisation of the visible text before the position), computed with
        the one-pass teacher forcing of the ensemble's score (`forced_distributions`)."""
        lm = self.lm
        starts = [self._ensemble_start(s, t) for s, t in zip(seqs, texts)]
        todo = [i for i, s in enumerate(seqs) if starts[i][0] < len(s)]
        out = [None] * len(seqs)
        for idx in chunks(todo, lm.batch_size):
            lm.main_member.check_length(max(len(seqs[i]) for i in idx), "a prompt")
            rows = [(starts[i][1], seqs[i][:starts[i][0]], seqs[i][starts[i][0]:]) for i in idx]
            fused = lm.forced_distributions(rows)
            at = 0
            for i, (_, _, t) in zip(idx, rows):
                out[i] = fused[at:at + len(t)]
                at += len(t)
        return [k for k, _ in starts], out

    # ---- one batch of requests ------------------------------------------------------------------

    def complete(self, params: Params, prompts: list[Prompt]) -> list[dict]:
        """The choices (without ``index``) for ``prompts``, all with the settings ``params``."""
        self.calls += 1
        gens = self.generate(prompts, params)
        k = params.logprobs
        recompute = k is not None and (params.echo or k > 0)
        if recompute:
            dists = self.token_logprobs([g.ids + g.new_ids for g in gens], [g.prompt_text for g in gens], k)
        choices = []
        for n, g in enumerate(gens):
            prompt_text = g.prompt_text if g.prompt_text is not None else self.decode(g.ids)
            text = cut_at_stop(g.raw, params.stop)
            choice = {"text": prompt_text + text if params.echo else text, "logprobs": None,
                      "finish_reason": g.finish, "prompt_tokens": len(g.ids), "completion_tokens": len(g.new_ids)}
            if k is not None:
                every = g.ids + g.new_ids
                shown = token_texts([self.piece(t) for t in every])
                first = 0 if params.echo else len(g.ids)
                lps, tops = dists[n] if recompute else ([None] * len(g.ids) + g.new_logps, [None] * len(g.ids)
                                                          + [{} for _ in g.new_ids])
                choice["logprobs"] = logprobs_block(shown[first:], every[first:], lps[first:], tops[first:],
                                                    self.piece)
            choices.append(choice)
        return choices
