"""Variational prompt training of DLN-1 / DLN-2 (Sordoni et al. 2023, Algorithms 1 and 2).

One `step` per training batch:

1. forward pass under the current prompts (greedy); if the batch has no error, no update;
2. DLN-2: sample ``num_h_samples`` hidden states per example from the posterior q(h | x, y)
   (all examples, or only the wrong ones with ``rewrite_wrong_only``); the forward h is kept
   as a sample too; weight them by w = softmax((log p(y | h) + log p(h | x)) / T);
3. propose ``num_p_samples`` prompts per trained layer with the backward template, in one
   generate call; candidates = current prompt + proposals + prompts in memory;
4. p2 = argmax ELBO_2(p) = mean_i sum_j w_ij log p(y_i | x_i, h_ij, p)  [- trust_factor KL];
   p1 = argmax ELBO_1(p) = mean_i sum_j w_ij log p(h_ij | x_i, p)       [- logp_penalty ...].
   DLN-1 is the same with one hidden sample of weight 1 (no h).

With ``scoring="accuracy"`` the output-layer score is 0/1 correctness instead of log p(y | .).
With ``held_out_prompt_ranking`` the batch is split in two halves by a seeded permutation:
proposals see one half, candidates are ranked on the other.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from dln_ens.config import DLNConfig
from dln_ens.data.task import Example, Task
from dln_ens.dln import elbo as E
from dln_ens.dln.layers import CallCache
from dln_ens.dln.network import DeepLanguageNetwork, input_with_thoughts
from dln_ens.dln.samplers import BackwardInfo, PosteriorSampler, PromptProposer, ProposalJob


def derive_seed(*keys) -> int:
    """A 31-bit seed from any keys (base seed, iteration, stage...): stable across runs and
    processes, so a resumed run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(json.dumps([str(k) for k in keys]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def batch_indices(num_train: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """Training batch of iteration t (1-based): consecutive slices of a seeded permutation per
    epoch, wrapping into the next epoch's permutation."""
    if num_train == 0:
        raise ValueError("the task has no training examples")
    out, start = [], (iteration - 1) * batch_size
    for pos in range(start, start + min(batch_size, num_train)):
        epoch, offset = divmod(pos, num_train)
        perm = np.random.default_rng(derive_seed(seed, "epoch", epoch)).permutation(num_train)
        out.append(int(perm[offset]))
    return out


class VariationalTrainer:
    def __init__(self, network: DeepLanguageNetwork, proposer: PromptProposer,
                 posterior: PosteriorSampler | None, task: Task, cfg: DLNConfig, seed: int | None = None):
        self.net, self.proposer, self.posterior, self.task, self.cfg = network, proposer, posterior, task, cfg
        self.seed = cfg.seed if seed is None else seed
        self.memory: list[dict] = []   # best dev prompts: {"prompts": {...}, "score": float}, best first
        if network.depth == 2 and posterior is None:
            raise ValueError("DLN-2 needs a posterior sampler")
        if cfg.trust_factor > 0 and not network.output.classes:
            raise ValueError(f"trust_factor > 0 needs output classes (the KL is between class "
                             f"distributions); task {task.name!r} has none: set trust_factor to 0")
        if cfg.scoring not in ("logprob", "accuracy"):
            raise ValueError(f"scoring must be 'logprob' or 'accuracy', got {cfg.scoring!r}")

    # ------------------------------------------------------------------ memory
    def remember(self, prompts: dict[str, str], score: float) -> None:
        """Keep the ``memory_size`` best dev prompts (they join every candidate list)."""
        if self.cfg.memory_size <= 0:
            return
        self.memory = [m for m in self.memory if m["prompts"] != prompts]
        self.memory.append({"prompts": dict(prompts), "score": float(score)})
        self.memory.sort(key=lambda m: -m["score"])  # stable: ties keep the older entry first
        del self.memory[self.cfg.memory_size:]

    def _memory_prompts(self, key: str) -> list[str]:
        return [m["prompts"][key] for m in self.memory if key in m["prompts"]]

    # ------------------------------------------------------------------ scoring helpers
    def _output_scores(self, prompts, inputs, targets, hs, cache) -> np.ndarray:
        out = self.net.output
        if self.cfg.scoring == "accuracy":
            return out.correctness(prompts, inputs, targets, self.task.is_correct, hs, cache)
        return out.log_likelihood(prompts, inputs, targets, hs, cache)[0]

    def _split(self, batch_size: int, iteration: int) -> tuple[list[int], list[int]]:
        """(examples the proposer sees, examples candidates are ranked on)."""
        idx = list(range(batch_size))
        if not self.cfg.held_out_prompt_ranking or batch_size < 2:
            return idx, idx
        perm = np.random.default_rng(derive_seed(self.seed, iteration, "held_out")).permutation(batch_size)
        half = batch_size // 2
        return sorted(int(i) for i in perm[:half]), sorted(int(i) for i in perm[half:])

    # ------------------------------------------------------------------ one step
    def step(self, batch: list[Example], iteration: int) -> dict:
        x = [e.input for e in batch]
        y = [e.target for e in batch]
        cache = CallCache()
        hs, preds = self.net.forward(x, cache)
        wrong = np.asarray([not self.task.is_correct(p, t) for p, t in zip(preds, y)])
        record = {"iteration": iteration, "train_loss": float(wrong.mean()), "train_acc": float(1 - wrong.mean()),
                  "prompts_before": self.net.prompts, "predictions": preds}
        if hs is not None:
            record["hidden"] = hs
        if not wrong.any():
            record.update(updated=False, reason="no errors in the batch", prompts=self.net.prompts)
            return record
        if self.net.depth == 1:
            record.update(self._step_one_layer(x, y, preds, wrong, iteration, cache))
        else:
            record.update(self._step_two_layers(x, y, hs, preds, wrong, iteration, cache))
        record["updated"] = True
        record["prompts"] = self.net.prompts
        return record

    def _candidates(self, current: str, proposals: list[str], key: str) -> list[str]:
        return list(dict.fromkeys([current] + proposals + self._memory_prompts(key)))   # unique, in order

    def _step_one_layer(self, x, y, preds, wrong, iteration, cache) -> dict:
        cfg, out = self.cfg, self.net.output
        prop, rank = self._split(len(x), iteration)
        infos = [BackwardInfo(x[i], y[i], preds[i], bool(wrong[i])) for i in prop]
        rng = np.random.default_rng(derive_seed(self.seed, iteration, "proposal_order"))
        (props,) = self.proposer.propose([ProposalJob(out.prompt, infos, cfg.num_p_samples)], rng,
                                         derive_seed(self.seed, iteration, "proposal"))
        cands = self._candidates(out.prompt, props, "p2")
        K = len(cands)
        rx = [x[i] for i in rank for _ in cands]
        ry = [y[i] for i in rank for _ in cands]
        rp = [c for _ in rank for c in cands]
        scores = self._output_scores(rp, rx, ry, None, cache)
        scores = scores.reshape(len(rank), 1, K)
        elbos = E.elbo(scores, np.ones((len(rank), 1)))
        kl = pen = None
        if cfg.trust_factor > 0:
            probs = out.log_likelihood(rp, rx, ry, None, cache)[1]
            kl = E.trust_kl(probs.reshape(len(rank), K, -1))
        if cfg.logp_penalty > 0:
            # log-likelihood, under each candidate, of the wrong answers the current prompt gave
            wrong_ll = out.log_likelihood(rp, rx, [preds[i] for i in rank for _ in cands], None, cache)[0]
            pen = E.penalty(wrong_ll.reshape(len(rank), K), wrong[rank])
        obj = E.candidate_objective(elbos, kl, cfg.trust_factor, pen, cfg.logp_penalty)
        best = E.select(obj)
        out.prompt = cands[best]
        return {"p2_candidates": _table(cands, elbos, obj, kl, pen), "elbo2": float(elbos[best])}

    def _step_two_layers(self, x, y, h1, preds, wrong, iteration, cache) -> dict:
        cfg, out, hid = self.cfg, self.net.output, self.net.hidden
        B = len(x)
        prop, rank = self._split(B, iteration)
        p1, p2 = hid.prompt, out.prompt

        # posterior samples; the forward h is always sample 0
        rewrite = [i for i in range(B) if wrong[i] or not cfg.rewrite_wrong_only]
        sampled = self.posterior.sample(p1, [x[i] for i in rewrite], [y[i] for i in rewrite],
                                        cfg.num_h_samples, derive_seed(self.seed, iteration, "posterior"))
        H = [[h] for h in h1]
        for i, samples in zip(rewrite, sampled):
            H[i].extend(samples)
        Hmax = max(len(h) for h in H)
        mask = np.asarray([[j < len(H[i]) for j in range(Hmax)] for i in range(B)])
        cells = [(i, j) for i in range(B) for j in range(len(H[i]))]

        # posterior weights under the current prompts
        if Hmax > 1:
            ll = np.zeros((B, Hmax))
            ll[tuple(zip(*cells))] = self._output_scores(
                [p2] * len(cells), [x[i] for i, _ in cells], [y[i] for i, _ in cells],
                [H[i][j] for i, j in cells], cache)
            prior = None
            if cfg.scoring == "logprob":
                prior = np.zeros((B, Hmax))
                prior[tuple(zip(*cells))] = hid.log_prob([p1] * len(cells), [x[i] for i, _ in cells],
                                                         [H[i][j] for i, j in cells], cache)
            weights = E.posterior_weights(ll, prior, cfg.posterior_temp, mask)
        else:
            weights = mask.astype(float)
        h_star = [H[i][int(np.argmax(weights[i]))] for i in range(B)]

        # proposals for both layers in one call
        rng = np.random.default_rng(derive_seed(self.seed, iteration, "proposal_order"))
        jobs = [ProposalJob(p2, [BackwardInfo(input_with_thoughts(x[i], h1[i]), y[i], preds[i], bool(wrong[i]))
                                 for i in prop], cfg.num_p_samples),
                ProposalJob(p1, [BackwardInfo(x[i], h_star[i], h1[i], bool(wrong[i])) for i in prop],
                            cfg.num_p_samples)]
        props2, props1 = self.proposer.propose(jobs, rng, derive_seed(self.seed, iteration, "proposal"))
        c2 = self._candidates(p2, props2, "p2")
        c1 = self._candidates(p1, props1, "p1")
        w = weights[rank]
        rcells = [(r, i, j) for r, i in enumerate(rank) for j in range(len(H[i]))]

        def grid(cands: list[str], score) -> np.ndarray:
            """[len(rank), Hmax, K]: ``score(prompts, example indices, hs)`` of every ranked
            sample under every candidate, in one call."""
            req = [(r, i, j, k) for r, i, j in rcells for k in range(len(cands))]
            s = np.zeros((len(rank), Hmax, len(cands)))
            flat = score([cands[k] for *_, k in req], [i for _, i, _, _ in req], [H[i][j] for _, i, j, _ in req])
            for (r, _, j, k), v in zip(req, flat):
                s[r, j, k] = v
            return s

        # p2: ELBO over the posterior samples
        K2 = len(c2)
        s2 = grid(c2, lambda ps, idx, hs: self._output_scores(ps, [x[i] for i in idx], [y[i] for i in idx],
                                                                hs, cache))
        elbo2 = E.elbo(s2, w)
        kl = None
        if cfg.trust_factor > 0:   # on the forward h (sample 0) under each candidate
            probs = out.log_likelihood([c for _ in rank for c in c2], [x[i] for i in rank for _ in c2],
                                       [y[i] for i in rank for _ in c2], [h1[i] for i in rank for _ in c2],
                                       cache)[1]
            kl = E.trust_kl(probs.reshape(len(rank), K2, -1))
        obj2 = E.candidate_objective(elbo2, kl, cfg.trust_factor)
        best2 = E.select(obj2)

        # p1: ELBO of the sharpened samples under each candidate
        s1 = grid(c1, lambda ps, idx, hs: hid.log_prob(ps, [x[i] for i in idx], hs, cache))
        elbo1 = E.elbo(s1, w)
        pen = None
        if cfg.logp_penalty > 0:   # log p(forward h | x, p) on the wrong examples
            pen = E.penalty(s1[:, 0, :], wrong[rank])
        obj1 = E.candidate_objective(elbo1, None, 0.0, pen, cfg.logp_penalty)
        best1 = E.select(obj1)

        hid.prompt, out.prompt = c1[best1], c2[best2]
        return {"posterior": {"samples": H, "weights": [weights[i, :len(H[i])].tolist() for i in range(B)]},
                "p1_candidates": _table(c1, elbo1, obj1, None, pen),
                "p2_candidates": _table(c2, elbo2, obj2, kl, None),
                "elbo1": float(elbo1[best1]), "elbo2": float(elbo2[best2])}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"prompts": self.net.prompts, "memory": self.memory}

    def load_state_dict(self, state: dict) -> None:
        self.net.set_prompts(state["prompts"])
        self.memory = [dict(m) for m in state["memory"]]


def _table(cands, elbos, obj, kl, pen) -> list[dict]:
    rows = []
    for k, c in enumerate(cands):
        row = {"prompt": c, "elbo": float(elbos[k]), "objective": float(obj[k])}
        if kl is not None:
            row["kl"] = float(kl[k])
        if pen is not None:
            row["wrong_loglik"] = float(pen[k])
        rows.append(row)
    return rows
