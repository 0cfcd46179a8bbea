"""The DLN variational objective as pure numpy functions (no models, no I/O).

Shapes: B examples, H hidden samples per example, K candidate prompts, C output classes.
A ``mask`` [B, H] marks which hidden samples exist (examples may have different numbers of
samples, e.g. with rewrite_wrong_only); padded entries get zero weight.
"""
from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def class_log_likelihood(class_logprobs: np.ndarray, target_idx: np.ndarray) -> np.ndarray:
    """log p(y | context) with the distribution renormalised over the output classes
    (the DLN scorer): [N, C] log-probs, [N] target class -> [N]."""
    lp = log_softmax(class_logprobs, axis=-1)
    return lp[np.arange(lp.shape[0]), np.asarray(target_idx)]


def posterior_weights(log_likelihood: np.ndarray, log_prior: np.ndarray | None,
                      temperature: float, mask: np.ndarray | None = None) -> np.ndarray:
    """w_ij = softmax_j((log p(y_i | h_ij) + log p(h_ij | x_i)) / T): the sharpened posterior
    over each example's hidden samples. [B, H] -> [B, H], rows sum to 1 over the mask."""
    if temperature <= 0:
        raise ValueError(f"posterior temperature must be > 0, got {temperature}")
    logits = np.asarray(log_likelihood, dtype=np.float64)
    if log_prior is not None:
        logits = logits + np.asarray(log_prior, dtype=np.float64)
    logits = logits / temperature
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    return np.exp(log_softmax(logits, axis=1))


def elbo(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ELBO of each candidate: mean over examples of the posterior-weighted score,
    (1/B) sum_i sum_j w_ij s_ijk. [B, H, K], [B, H] -> [K]. Padded samples must have w = 0."""
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    weighted = np.where(weights[:, :, None] > 0, scores * weights[:, :, None], 0.0)
    return weighted.sum(axis=1).mean(axis=0)


def trust_kl(class_probs: np.ndarray) -> np.ndarray:
    """KL(p_current || p_k) per candidate, averaged over examples, where candidate 0 is the
    current prompt: [B, K, C] class probabilities -> [K] (0 for the current prompt)."""
    p = np.asarray(class_probs, dtype=np.float64)
    ref = p[:, :1, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(ref > 0, ref * (np.log(ref) - np.log(p)), 0.0)
    return terms.sum(-1).mean(0)


def penalty(wrong_loglik: np.ndarray, wrong: np.ndarray, scale: str = "batch") -> np.ndarray:
    """The log-likelihood each candidate gives to the wrong outputs the current prompts
    produced, summed over the wrong examples and divided by the batch size B (``scale="batch"``,
    the DLN reference) or averaged over the wrong examples (``scale="wrong"``):
    [B, K], [B] bool -> [K] (zeros if none wrong)."""
    wrong = np.asarray(wrong, dtype=bool)
    ll = np.asarray(wrong_loglik, dtype=np.float64)
    if not wrong.any():
        return np.zeros(ll.shape[1])
    if scale == "batch":
        return ll[wrong].sum(0) / ll.shape[0]
    if scale == "wrong":
        return ll[wrong].mean(0)
    raise ValueError(f"penalty scale must be 'batch' or 'wrong', got {scale!r}")


def candidate_objective(elbos: np.ndarray, kl: np.ndarray | None = None, trust_factor: float = 0.0,
                        wrong_penalty: np.ndarray | None = None,
                        logp_penalty: float = 0.0) -> np.ndarray:
    """What prompt selection maximises: ELBO - trust_factor * KL - logp_penalty * (log-lik of
    the wrong outputs)."""
    obj = np.asarray(elbos, dtype=np.float64).copy()
    if trust_factor and kl is not None:
        obj = obj - trust_factor * np.asarray(kl)
    if logp_penalty and wrong_penalty is not None:
        obj = obj - logp_penalty * np.asarray(wrong_penalty)
    return obj


def select(objective: np.ndarray) -> int:
    """Index of the best candidate; ties go to the earliest (the current prompt is first)."""
    return int(np.argmax(np.asarray(objective)))
