"""One local transformers causal LM behind the LanguageModel protocol.

Every model call goes through ``forward`` (the Mixture-of-Depths subclass overrides it to
produce its own logits). Batches are laid out so that no row's result depends on the others:

- ``prefill`` runs a batch of token-id lists: their longest common prefix once (its KV cache
  repeated over the batch), then each row's remaining tokens left-padded after it, so the last
  column holds every row's next-token logits. The mask then has a hole between prefix and row.
- ``generate`` decodes through `lm.decoder.DecodeState` (the ensemble's members use the same
  one): prefill as above, then one token per row per step; finished rows leave the batch.
- ``score`` prefills each distinct context once, copies its cache to every target of that
  context (``Cache.batch_select_indices`` with repeated indices) and teacher-forces the targets
  right-padded after it.
Position ids always count the real tokens before a position (``batching.positions``).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dln_ens.checks import SettingError, check_number
from dln_ens.lm.base import Generation, Score
from dln_ens.lm.batching import chunks
from dln_ens.lm.checkpoint import check_model_dir, unreadable_checkpoint
from dln_ens.lm.context import ContextLengthError, check_policy, keep_end
from dln_ens.lm.decoder import DecodeState
from dln_ens.lm.forced import logit_rows, prefill, summed_logprobs
from dln_ens.lm.loading import resolve_dtype
from dln_ens.lm.candidates import candidate_logprobs, check_candidates
from dln_ens.lm.sampling import pick_tokens, sampling_seeds
from dln_ens.lm.stopping import continuation_texts, cut_at_stop, first_stop

PROMPT_TAIL = 4  # prompt tokens decoded with the continuation so its first piece keeps its leading space


class HFLanguageModel:
    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int = 16):
        check_number("batch_size", batch_size, ge=1, integer=True)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.batch_size = batch_size
        self.device = model.get_input_embeddings().weight.device
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size

        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
            (gen_eos[0] if gen_eos else None)
        # generation ends on any of them, as transformers' generate does
        self.stop_token_ids = sorted({*gen_eos, *([self.eos_token_id] if self.eos_token_id is not None else [])})
        # padded positions are masked out, so any id works; never add a token (no embedding resize)
        self.pad_token_id = next((t for t in (tokenizer.pad_token_id, self.eos_token_id) if t is not None), 0)

        self.max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.context_limit, self.truncate = self.max_length, "error"   # see `set_context`
        self.truncated = 0   # examples cut on the left so far (truncate="left")
        model_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in model_args else "past_key_values"  # transformers 5 renamed it
        self._model_keeps_logits = "logits_to_keep" in model_args
        # an override of `forward` (MoD) may not take logits_to_keep; then all positions come back
        self._forward_keeps_logits = "logits_to_keep" in inspect.signature(self.forward).parameters

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "auto", device_map=None,
                        trust_remote_code: bool = False, name: str | None = None, batch_size: int = 16,
                        allow_pickle: bool = False, context_limit: int | None = None, truncate: str = "error"):
        """Load a local checkpoint directory (never downloads). ``dtype="auto"`` keeps the
        checkpoint's dtype; ``device_map`` (accelerate) places the model and overrides ``device``.
        Weights load from safetensors only, unless ``allow_pickle`` (pickle can run code).
        ``context_limit`` / ``truncate``: see `set_context`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_dir(path, allow_pickle)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype(dtype), device_map=device_map, local_files_only=True,
                trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
        except Exception as e:  # noqa: BLE001 - a damaged file: name it and the fix, not a traceback
            raise unreadable_checkpoint(path, e) from e
        if device_map is None:
            model.to(device)
        lm = cls(model, tokenizer, name=name or path.name, batch_size=batch_size)
        lm.set_context(context_limit, truncate)
        return lm

    def set_context(self, limit: int | None = None, truncate: str = "error") -> None:
        """Context limit in positions (None = the model's max_position_embeddings; never more)
        and the policy for longer examples: "error" or "left" (`dln_ens.lm.context`)."""
        check_number("context_limit", limit, ge=2, integer=True, optional=True)
        if limit is not None and self.max_length is not None and limit > self.max_length:
            raise SettingError(f"context_limit={limit} of {self.name} exceeds its max_position_embeddings="
                               f"{self.max_length}")
        self.context_limit = limit if limit is not None else self.max_length
        self.truncate = check_policy(truncate)

    def fit(self, ids: list[int], reserve: int, index: int, what: str, text: str | None = None) -> list[int]:
        """``ids`` such that len + ``reserve`` positions fit the context limit: unchanged, cut
        on the left (policy "left", counted in ``truncated``), or a ContextLengthError."""
        limit = self.context_limit
        if limit is None or len(ids) + reserve <= limit:
            return ids
        room = limit - reserve
        if self.truncate == "error" or room < 1:
            raise ContextLengthError(self.name, index, len(ids) + reserve, limit, what, text=text)
        self.truncated += 1
        return keep_end(ids, room, self.tokenizer.bos_token_id)

    # ---- tokens -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The tokenizer on the whole text, with the special tokens it adds by default (BOS...)."""
        return self.tokenizer(text)["input_ids"]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts))["input_ids"] if len(texts) else []

    def nonempty(self, ids: list[int]) -> list[int]:
        """A context must hold a token to predict from: an empty one starts from BOS (else EOS),
        like lm-evaluation-harness' prefix token."""
        if ids:
            return ids
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id
        if start is None:
            raise ValueError(f"{self.name}: empty context and the tokenizer has neither a BOS nor an EOS token")
        return [start]

    def split_pairs(self, contexts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(context ids, target ids) at the context/target boundary, as lm-evaluation-harness does.

        1. ctx = encode(context), whole = encode(context + target); if ctx is a prefix of whole,
           target = whole[len(ctx):] (the target is tokenised as it would be in running text).
        2. Otherwise, if the context ends with whitespace, move it into the target (lm-eval's
           rule): ctx = encode(context.rstrip()); target = whole[len(ctx):] if that is a prefix.
        3. Otherwise target = the target encoded alone without special tokens, after ctx.
        An empty context becomes [BOS] (``nonempty``).
        """
        return [(ctx, tgt) for _, ctx, tgt in self.split_pairs_with_text(contexts, targets)]

    def split_pairs_with_text(self, contexts: Sequence[str], targets: Sequence[str]
                              ) -> list[tuple[str, list[int], list[int]]]:
        """`split_pairs` plus the context text the context ids stand for (rule 2 moves the
        context's trailing whitespace into the target)."""
        if len(contexts) != len(targets):
            raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
        ctxs = self.encode_many(contexts)
        wholes = self.encode_many([c + t for c, t in zip(contexts, targets)])
        out = []
        for context, target, ctx, whole in zip(contexts, targets, ctxs, wholes):
            stripped = context.rstrip()
            text = context
            if whole[:len(ctx)] == ctx:
                tgt = whole[len(ctx):]
            elif stripped != context and whole[:len(s := self.encode(stripped))] == s:
                text, ctx, tgt = stripped, s, whole[len(s):]
            else:
                tgt = self.tokenizer(target, add_special_tokens=False)["input_ids"]
            out.append((text, self.nonempty(ctx), tgt))
        return out

    def check_length(self, n: int, what: str) -> None:
        if self.max_length is not None and n > self.max_length:
            raise ValueError(f"{self.name}: {what} needs {n} positions but the model has "
                             f"max_position_embeddings={self.max_length}; shorten the input")

    # ---- model calls ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0):
        """THE single hook for model calls: float32 logits [B, T, V] and the updated KV cache.
        ``attention_mask`` covers past + new columns; ``logits_to_keep`` = n > 0 returns only
        the last n positions (a saving, never required of overrides)."""
        kw = {self._cache_arg: past_key_values}
        if self._model_keeps_logits:
            kw["logits_to_keep"] = logits_to_keep
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=None if position_ids is None else position_ids.to(self.device),
                         use_cache=True, **kw)
        return out.logits.float(), getattr(out, self._cache_arg)

    def last_logits(self, ids, mask, cache, pos):
        """``forward`` reduced to the last position's logits [B, V] (and the cache)."""
        if self._forward_keeps_logits:
            logits, cache = self.forward(ids, mask, cache, pos, logits_to_keep=1)
        else:
            logits, cache = self.forward(ids, mask, cache, pos)
        return logits[:, -1], cache

    def prefill(self, seqs: Sequence[Sequence[int]]):
        """Run non-empty token-id lists as one batch (`forced.prefill`): next-token logits
        [B, V] float32, the KV cache and the attention mask [B, S]."""
        return prefill(self, seqs)

    # ---- the protocol -----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[Generation]:
        """Continue each prompt: greedy when temperature is 0 (token for token what transformers'
        ``generate(do_sample=False)`` gives), else sampled from softmax(logits / temperature).

        Ends at EOS, at the first occurrence of any stop string (cut from ``text``) or after
        ``max_new_tokens``. ``num_tokens`` counts the generated tokens up to and including the
        one that completed the stop string (or the EOS token); ``logprob`` sums the model's
        untempered log-softmax over those same tokens. Sampling gives each sequence its own
        random stream (``stopping.sequence_seeds``): the same ``seed`` repeats exactly, and a
        prompt samples the same text whatever it is batched with.
        """
        prompt_ids = [self.fit(self.nonempty(ids), max(max_new_tokens - 1, 0), i,
                               f"a prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens}", prompts[i])
                      for i, ids in enumerate(self.encode_many(prompts))]
        new_ids, token_logps = self.generate_ids(prompt_ids, max_new_tokens=max_new_tokens, stop=stop,
                                                 temperature=temperature, seed=seed, texts=prompts)
        tails = [p[-PROMPT_TAIL:] for p in prompt_ids]
        texts = continuation_texts(self.tokenizer, tails, new_ids)
        return [Generation(text=cut_at_stop(t, stop), logprob=float(sum(lp)), num_tokens=len(ids))
                for t, ids, lp in zip(texts, new_ids, token_logps)]

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], *, max_new_tokens: int, stop: Sequence[str] = (),
                     temperature: float = 0.0, seed: int | None = None, texts: Sequence[str] | None = None):
        """Token-level ``generate``: per prompt, the generated ids (through the stopping token)
        and their log-probs. ``texts`` (the prompts' strings) key the per-sequence seeds."""
        n = len(prompt_ids)
        seeds = sampling_seeds(temperature, seed, texts if texts is not None else
                               [" ".join(map(str, p)) for p in prompt_ids])
        new_ids, logps = [[] for _ in range(n)], [[] for _ in range(n)]
        order = sorted(range(n), key=lambda i: prompt_ids[i])  # neighbours share prefixes
        batches = list(chunks(order, self.batch_size))
        for idx in tqdm(batches, desc=f"generate {self.name}", leave=False, disable=len(batches) < 4):
            outs = self._generate_batch([prompt_ids[i] for i in idx], max_new_tokens, stop, temperature,
                                        [seeds[i] for i in idx])
            for i, (ids, lp) in zip(idx, outs):
                new_ids[i], logps[i] = ids, lp
        return new_ids, logps

    def _generate_batch(self, prompt_ids, max_new_tokens, stop, temperature, seeds):
        b = len(prompt_ids)
        self.check_length(max(map(len, prompt_ids)) + max(max_new_tokens - 1, 0), "a prompt + max_new_tokens")
        if max_new_tokens <= 0:
            return [([], [])] * b
        state = DecodeState(self, prompt_ids)
        logits, dev = state.logits, state.logits.device
        tokens = torch.full((b, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        logps = torch.zeros((b, max_new_tokens), device=dev)
        lengths = torch.zeros(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)  # original row of each live row
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds] if temperature > 0 else None
        eos = torch.tensor(self.stop_token_ids, dtype=torch.long, device=dev)
        tails = [p[-PROMPT_TAIL:] for p in prompt_ids]
        for t in range(max_new_tokens):
            tok = pick_tokens(logits, temperature, gens)
            tokens[rows, t] = tok
            logps[rows, t] = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
            lengths[rows] = t + 1
            done = torch.isin(tok, eos)
            if stop:
                live = rows.tolist()
                texts = continuation_texts(self.tokenizer, [tails[r] for r in live], tokens[rows, :t + 1].tolist())
                done |= torch.tensor([first_stop(x, stop) >= 0 for x in texts], device=dev)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):  # finished rows leave the batch
                keep = (~done).nonzero()[:, 0]
                state.select(keep.cpu())
                tok, rows = tok[keep], rows[keep]
                if gens is not None:
                    gens = [gens[j] for j in keep.tolist()]
            logits = state.step(tok)
        lengths, tokens, logps = lengths.tolist(), tokens.tolist(), logps.tolist()
        return [(tokens[i][:n], logps[i][:n]) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def score(self, contexts: list[str], targets: list[str]) -> list[Score]:
        """Teacher-forced log p(target | context), summed over the target's tokens. The
        context/target boundary is tokenised as in ``split_pairs`` (lm-evaluation-harness).
        Each distinct context in a batch is run once (and the batch's common prefix once);
        its KV cache is then shared by all of its targets."""
        pairs = [(self.fit(c, len(t) - 1, i, f"a context of {len(c)} tokens + a target of {len(t)}", contexts[i]), t)
                 for i, (c, t) in enumerate(self.split_pairs(contexts, targets))]
        self.check_length(max((len(c) + len(t) - 1 for c, t in pairs), default=0), "a context + target")
        out = [Score(logprob=0.0, num_tokens=0)] * len(pairs)  # empty targets
        order = sorted((i for i, (_, t) in enumerate(pairs) if t), key=lambda i: pairs[i])
        batches = list(chunks(order, self.batch_size))
        for idx in tqdm(batches, desc=f"score {self.name}", leave=False, disable=len(batches) < 4):
            for i, lp in zip(idx, self._score_batch([pairs[i] for i in idx])):
                out[i] = Score(logprob=lp, num_tokens=len(pairs[i][1]))
        return out

    def _score_batch(self, pairs):
        seqs = [list(c) + list(t[:-1]) for c, t in pairs]
        wanted = [range(len(c) - 1, len(c) + len(t) - 1) for c, t in pairs]
        logits = logit_rows(self, seqs, [tuple(c) for c, _ in pairs], wanted)
        return summed_logprobs(logits, [t for _, t in pairs])

    @torch.inference_mode()
    def next_token_distribution(self, contexts: list[str]) -> torch.Tensor:
        """[B, V] float32 log-probabilities (cpu) of the token after each context."""
        ids = [self.fit(self.nonempty(x), 0, i, "a context", contexts[i]) for i, x in enumerate(self.encode_many(contexts))]
        self.check_length(max(map(len, ids), default=0), "a context")
        out = torch.empty((len(ids), self.vocab_size), dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        for idx in chunks(order, self.batch_size):
            logits, _, _ = self.prefill([ids[i] for i in idx])
            out[idx] = torch.log_softmax(logits, -1).cpu()
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: list[str], candidates: list[str], *,
                            aggregate: str = "max") -> np.ndarray:
        """[len(contexts), len(candidates)] log-probability of each candidate as the next text,
        its forms combined by ``aggregate`` (see `lm.candidates`). One forward pass per batch of
        contexts."""
        check_candidates(candidates, aggregate)  # before the forward passes
        return candidate_logprobs(self, self.next_token_distribution(contexts), contexts, candidates, aggregate)
