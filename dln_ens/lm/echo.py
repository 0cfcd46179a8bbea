"""Reading a target's log-probs out of an echoed completion, by character offsets (pure).

An OpenAI-compatible server asked for ``echo=True, logprobs=k`` returns, for the prompt's tokens,
``tokens`` (each token's text), ``token_logprobs`` (None for the first token) and ``text_offset``
(where each token starts). As in vLLM, offsets count characters of ``"".join(tokens)``, which may
differ from the prompt sent (a BOS token's text, SentencePiece's leading space), so the prompt is
located in that string first.

The context/target boundary follows `HFLanguageModel.split_pairs` (lm-evaluation-harness' rule):

1. a token starts exactly where the context ends: the target is that token and the ones after it
   (the target tokenised as in running text);
2. otherwise, if the context ends with whitespace and a token starts where the stripped context
   ends, the target starts there (the whitespace moves into the target);
3. otherwise one token straddles the boundary, and the target starts with it. `split_pairs` would
   tokenise the target alone here, which text alone cannot reproduce: configure the client's
   ``tokenizer`` to send token ids and get exactly `split_pairs`.

A character split across tokens belongs to the token holding its first byte; the tokens holding
its other bytes have empty text. The last token is left out when it was generated (``echo_max_tokens = 1``, for servers that
need ``max_tokens >= 1``).
"""
from __future__ import annotations


class EchoError(ValueError):
    """The echoed logprobs cannot be read (the caller adds the URL and the model)."""


def target_span(tokens: list[str], offsets: list[int], context: str, target: str,
                generated: int = 0) -> tuple[int, int]:
    """Indices [start, end) of the target's tokens in an echo of ``context + target`` followed by
    ``generated`` generated tokens."""
    if len(tokens) != len(offsets):
        raise EchoError(f"{len(tokens)} tokens but {len(offsets)} text offsets")
    shown = "".join(tokens)
    prompt = context + target
    at = shown.find(prompt) if prompt else 0
    if at < 0:
        raise EchoError(f"the echoed tokens {shown[:80]!r} do not contain the prompt {prompt[:80]!r}")
    boundary = at + len(context)
    # the first token with text at each offset (BOS and other empty tokens start nothing)
    starts = {off: i for i, off in reversed(list(enumerate(offsets))) if tokens[i]}
    stop = len(offsets) - generated
    if boundary in starts:
        first = starts[boundary]
    elif context != context.rstrip() and at + len(context.rstrip()) in starts:
        first = starts[at + len(context.rstrip())]
    else:
        first = max((i for i, off in enumerate(offsets) if off < boundary), default=0)
    return first, max(first, stop)


def span_logprobs(token_logprobs: list, start: int, end: int) -> list[float]:
    out = token_logprobs[start:end]
    if any(lp is None for lp in out):
        raise EchoError(f"no log-probability for token {start + out.index(None)} (the prompt's first token "
                        f"has none); give a non-empty context")
    return [float(lp) for lp in out]
