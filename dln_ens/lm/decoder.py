"""One model's batched decoding state: a padded KV cache whose attention mask may have holes.

Both `HFLanguageModel.generate` and every member of `EnsembleLanguageModel` decode through
`DecodeState`; only the `LocalMember` parts of a model are used (``last_logits``, ``forward``,
``pad_token_id``, ``device``). The layout is that of `lm.batching`:

- the prompts start as `forced.prefill` runs them (their common prefix once, then each row's
  own tokens left-padded after it);
- ``step`` appends one token per row (plain decoding);
- ``advance`` lets each row keep its first ``keep[b]`` tokens and append its own new tokens (an
  ensemble member re-tokenising the shared text). A row is rolled back by zeroing the mask of
  its dropped columns, never by cropping the cache: the columns stay, invisible;
- ``select`` drops finished rows from the cache, the mask and the logits.

State is kept in tensors: ``lengths[b]`` counts row b's real tokens (its next position id), and
the real tokens of a row are its mask-1 columns in order, so a rollback is one cumulative sum.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from dln_ens.lm.batching import chunks, pad, positions
from dln_ens.lm.forced import prefill


class DecodeState:
    """Next-token ``logits`` [B, V] float32 of each row, over the model's KV ``cache``.

    ``prompt_nll=True`` runs the prompts with every position's logits and keeps each row's summed
    negative log-likelihood of its prompt tokens in ``prompt_nll`` [B] (perplexity weighting)."""

    def __init__(self, model, seqs: Sequence[Sequence[int]], prompt_nll: bool = False):
        if any(not s for s in seqs):
            raise ValueError(f"{getattr(model, 'name', type(model).__name__)}: a prompt has no tokens")
        self.model = model
        self.prompt_nll = None
        if prompt_nll:   # all positions' logits: B x T x V floats, once per prompt
            ids, self.mask = pad(seqs, model.pad_token_id, "left", model.device)
            logits, self.cache = model.forward(ids, self.mask, None, positions(self.mask, ids.shape[1]))
            self.logits = logits[:, -1]
            lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None].to(logits.device))[..., 0]
            seen = (self.mask[:, :-1] * self.mask[:, 1:]).to(lp.device)
            self.prompt_nll = -(lp * seen).sum(-1)
        else:
            self.logits, self.cache, self.mask = prefill(model, seqs)
        self.lengths = torch.tensor([len(s) for s in seqs], device=self.mask.device)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [B]; returns (and keeps) the next-token logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], 1)
        self.logits, self.cache = self.model.last_logits(tokens[:, None], self.mask, self.cache,
                                                         self.lengths[:, None])
        self.lengths = self.lengths + 1
        return self.logits

    def advance(self, keep: Sequence[int], new: Sequence[Sequence[int]]) -> None:
        """Row b keeps its first ``keep[b]`` tokens and appends ``new[b]``. A row that drops
        tokens must append at least one (its logits are those of its last token); a row with
        nothing new and nothing dropped keeps its logits."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long, device=self.mask.device)
        count = torch.as_tensor([len(x) for x in new], dtype=torch.long, device=self.mask.device)
        dropped = keep_t < self.lengths
        if bool(dropped.any()):
            if bool((dropped & (count == 0)).any()):
                raise ValueError("a rolled-back row must feed at least one token")
            self.mask = self.mask * (self.mask.cumsum(1) <= keep_t[:, None])
        n = int(count.max()) if len(new) else 0
        if n == 0:
            return
        ids, block = pad(new, self.model.pad_token_id, "left", self.mask.device)
        # left padding: row b's j-th new token sits at column n - count[b] + j, position keep[b] + j
        pos = (keep_t[:, None] + torch.arange(n, device=ids.device) - (n - count)[:, None]).clamp(min=0)
        self.mask = torch.cat([self.mask, block], 1)
        logits, self.cache = self.model.last_logits(ids, self.mask, self.cache, pos)
        fed = (count > 0).to(logits.device)
        self.logits = logits if bool(fed.all()) else torch.where(fed[:, None], logits, self.logits.to(logits.device))
        self.lengths = keep_t + count

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only ``rows`` (in that order): finished rows leave the batch."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.mask.device))
        self.mask, self.lengths = self.mask[idx.to(self.mask.device)], self.lengths[idx.to(self.mask.device)]
        self.logits = self.logits[idx.to(self.logits.device)]
        if self.prompt_nll is not None:
            self.prompt_nll = self.prompt_nll[idx.to(self.prompt_nll.device)]

    def continuation_logprobs(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], chunk: int = 256) -> torch.Tensor:
        """[P] summed log-probs of each non-empty token list ``seqs[i]`` appended to row
        ``rows[i]``: the first token from the current logits, the rest from one forward per chunk
        of pairs over a copy of their rows' cache (the state itself is not changed)."""
        dev = self.logits.device
        first = torch.tensor([s[0] for s in seqs], device=dev)
        out = torch.log_softmax(self.logits[torch.tensor(list(rows), device=dev)], -1).gather(1, first[:, None])[:, 0]
        longer = [i for i, s in enumerate(seqs) if len(s) > 1]
        for part in chunks(longer, chunk):
            idx = torch.tensor([rows[i] for i in part], device=self.mask.device)
            feed = [seqs[i][:-1] for i in part]
            ids, block = pad(feed, self.model.pad_token_id, "left", self.mask.device)
            n = ids.shape[1]
            m = torch.tensor([len(f) for f in feed], device=ids.device)
            pos = (self.lengths[idx][:, None] + torch.arange(n, device=ids.device) - (n - m)[:, None]).clamp(min=0)
            logits, _ = self.model.forward(ids, torch.cat([self.mask[idx], block], 1), cache_rows(self.cache, idx), pos)
            lp = torch.log_softmax(logits, -1)
            tgt, _ = pad([seqs[i][1:] for i in part], 0, "left", lp.device)
            got = lp.gather(2, tgt[..., None])[..., 0] * block.to(lp.device)
            out[torch.tensor(part, device=dev)] += got.sum(-1).to(dev)
        return out


def cache_rows(cache, idx: torch.Tensor):
    """A KV cache holding rows ``idx`` of ``cache`` (repeats allowed); ``cache`` is left as it is."""
    if not hasattr(cache, "layers"):
        cache = copy.deepcopy(cache)
    else:
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
    cache.batch_select_indices(idx)
    return cache
