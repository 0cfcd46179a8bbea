"""Variational prompt training of DLN-1 / DLN-2 (Sordoni et al. 2023, Algorithms 1 and 2),
with the semantics of the DLN reference implementation (microsoft/deep-language-networks,
``dln/vi/model.py``) wherever the paper is silent.

One `step` per training batch:

1. forward pass under the current prompts (greedy). A batch without errors is skipped, except
   by DLN-1 with log-probability scoring, which still proposes (the reference);
2. DLN-2: sample ``num_h_samples`` hidden states h~ per example from the posterior q(h | x, y)
   (all examples, or only the wrong ones with ``rewrite_wrong_only``: the others keep their
   forward h as their one sample); weight them by w = softmax((log p(y | h~) + log p(h~ | x)) / T).
   The forward h is *not* a posterior sample: it only enters the trust-region KL and the logp
   penalty (variant ``posterior_include_forward_h``: it joins the samples);
3. propose prompts per trained layer with the backward template, all in one generate call:
   ``num_p_samples - 1`` new ones, proposal i rewriting the prompt i of [current, *memory]
   (rotation); candidates = current + memory + proposals;
4. p2 = argmax ELBO_2(p) - trust_factor KL(p_current || p) on the forward h, with
   ELBO_2(p) = mean_i sum_j w_ij log p(y_i | x_i, h~_ij, p);
   p1 = argmax ELBO_1(p) - logp_penalty_t * (sum over wrong i of log p(h_i | x_i, p)) / B, with
   ELBO_1(p) = mean_i sum_j w_ij log p(h~_ij | x_i, p) and logp_penalty_t decaying linearly to 0
   over the run. DLN-1 is the same with one sample of weight 1 (no h).

With ``scoring="accuracy"`` the output-layer score is 0/1 correctness instead of log p(y | .).
With ``held_out_prompt_ranking`` each proposal reads its own random half of the batch and the
candidates are ranked on the whole batch (variant ``held_out_mode="split"``: one half proposes,
the other half alone ranks).

Validation bookkeeping (`validated`) keeps the best dev prompts, the prompt memory (a prompt
joins it when it beats the best dev accuracy) and, with ``tolerance`` >= 0, reloads the best
prompts after that many validations without a gain.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from dln_ens.config import DLNConfig
from dln_ens.data.task import Example, Task
from dln_ens.dln import elbo as E
from dln_ens.dln.network import DeepLanguageNetwork, input_with_thoughts
from dln_ens.dln.samplers import BackwardInfo, PosteriorSampler, PromptProposer, ProposalJob
from dln_ens.scoring import CallCache


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


def balanced_batch_indices(targets: list[str], batch_size: int, seed: int, iteration: int) -> list[int]:
    """A class-balanced batch (the reference's ``--balance_batch``): the examples of each target
    in a fresh random order, the targets in a random order, then one example of each target in
    turn until the batch is full (a target that runs out is skipped)."""
    if not targets:
        raise ValueError("the task has no training examples")
    rng = np.random.default_rng(derive_seed(seed, "balanced", iteration))
    by_target: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        by_target.setdefault(t, []).append(i)
    pools = [[int(i) for i in rng.permutation(by_target[t])] for t in by_target]
    order = [int(k) for k in rng.permutation(len(pools))]
    out: list[int] = []
    while len(out) < min(batch_size, len(targets)):
        for k in order:
            if pools[k] and len(out) < batch_size:
                out.append(pools[k].pop(0))
    return out


class VariationalTrainer:
    def __init__(self, network: DeepLanguageNetwork, proposer: PromptProposer,
                 posterior: PosteriorSampler | None, task: Task, cfg: DLNConfig, seed: int | None = None):
        self.net, self.proposer, self.posterior, self.task, self.cfg = network, proposer, posterior, task, cfg
        self.seed = cfg.seed if seed is None else seed
        self.memory: list[dict] = []   # best dev prompts: {"prompts": {...}, "score": float}, best first
        self.best: dict | None = None  # {"prompts", "dev", "iteration"} of the best validation
        self.patience = 0              # validations since the best one (tolerance)
        if network.depth == 2 and posterior is None:
            raise ValueError("DLN-2 needs a posterior sampler")
        if network.depth == 2 and cfg.num_h_samples < 1 and not cfg.posterior_include_forward_h:
            raise ValueError("DLN-2 needs at least one hidden sample: set num_h_samples >= 1 (or "
                             "posterior_include_forward_h to train on the forward h alone)")
        if cfg.trust_factor > 0 and not network.output.classes:
            raise ValueError(f"trust_factor > 0 needs output classes (the KL is between class "
                             f"distributions); task {task.name!r} has none: set trust_factor to 0")
        if cfg.scoring not in ("logprob", "accuracy"):
            raise ValueError(f"scoring must be 'logprob' or 'accuracy', got {cfg.scoring!r}")

    # ------------------------------------------------------------------ batches
    def batch_indices(self, train: list[Example], iteration: int) -> list[int]:
        if self.cfg.balance_batch:
            return balanced_batch_indices([e.target for e in train], self.cfg.batch_size, self.seed, iteration)
        return batch_indices(len(train), self.cfg.batch_size, self.seed, iteration)

    # ------------------------------------------------------------------ memory and validation
    def remember(self, prompts: dict[str, str], score: float) -> None:
        """Keep the ``memory_size`` best dev prompts (they join every candidate list and the
        rotation of proposal starts)."""
        if self.cfg.memory_size <= 0:
            return
        self.memory = [m for m in self.memory if m["prompts"] != prompts]
        self.memory.append({"prompts": dict(prompts), "score": float(score)})
        self.memory.sort(key=lambda m: -m["score"])  # stable: ties keep the older entry first
        del self.memory[self.cfg.memory_size:]

    def validated(self, acc: float, iteration: int) -> dict:
        """Bookkeeping after a validation of the current prompts: best prompts, memory (on a
        new best; every validation with memory_policy "top"), tolerance reload."""
        prompts = self.net.prompts
        improved = self.best is None or acc > self.best["dev"]
        if improved:
            self.best = {"prompts": prompts, "dev": float(acc), "iteration": iteration}
            self.patience = 0
        else:
            self.patience += 1
        if improved or self.cfg.memory_policy == "top":
            self.remember(prompts, acc)
        reloaded = False
        if self.cfg.tolerance >= 0 and self.patience >= self.cfg.tolerance:
            reloaded = self.best["prompts"] != prompts
            self.net.set_prompts(self.best["prompts"])
            self.patience = 0
        return {"improved": improved, "reloaded": reloaded}

    def _memory_prompts(self, key: str) -> list[str]:
        return [m["prompts"][key] for m in self.memory if key in m["prompts"]]

    def logp_penalty_at(self, iteration: int) -> float:
        """The logp penalty of iteration t (1-based): decays linearly, 0 after the last."""
        if not self.cfg.decay_logp_penalty or self.cfg.iters <= 0:
            return self.cfg.logp_penalty
        return self.cfg.logp_penalty * (1.0 - (iteration - 1) / self.cfg.iters)

    # ------------------------------------------------------------------ scoring helpers
    def _output_scores(self, prompts, inputs, targets, hs, cache) -> np.ndarray:
        out = self.net.output
        if self.cfg.scoring == "accuracy":
            return out.correctness(prompts, inputs, targets, self.task.is_correct, hs, cache)
        return out.log_likelihood(prompts, inputs, targets, hs, cache)[0]

    def _split(self, batch_size: int, iteration: int) -> tuple[list[int], list[int]]:
        """(examples the proposer sees, examples candidates are ranked on): the whole batch for
        both, except with the "split" held-out mode (two disjoint halves)."""
        idx = list(range(batch_size))
        if not (self.cfg.held_out_prompt_ranking and self.cfg.held_out_mode == "split") or batch_size < 2:
            return idx, idx
        perm = np.random.default_rng(derive_seed(self.seed, iteration, "held_out")).permutation(batch_size)
        half = batch_size // 2
        return sorted(int(i) for i in perm[:half]), sorted(int(i) for i in perm[half:])

    def _job(self, current: str, key: str, infos: list[BackwardInfo]) -> ProposalJob:
        """Proposals rotate over [current, *memory] as listed (the current prompt, usually also
        in the memory, then comes up twice per round, as in the reference)."""
        cfg = self.cfg
        starts = [current] + (self._memory_prompts(key) if cfg.rotate_proposal_prompts else [])
        num = cfg.num_p_samples - 1 if cfg.proposals_include_current else cfg.num_p_samples
        half = cfg.held_out_prompt_ranking and cfg.held_out_mode == "per_proposal"
        return ProposalJob(starts, infos, num, half)

    def _candidates(self, current: str, proposals: list[str], key: str) -> list[str]:
        """Unique, in order: current, memory, proposals (the reference's order; variant
        proposals_include_current=False keeps the former order current, proposals, memory)."""
        mem = self._memory_prompts(key)
        order = [current] + mem + proposals if self.cfg.proposals_include_current else [current] + proposals + mem
        return list(dict.fromkeys(order))

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
        proposes_anyway = self.net.depth == 1 and self.cfg.scoring == "logprob" and not self.cfg.skip_error_free_batches
        if not wrong.any() and not proposes_anyway:
            record.update(updated=False, reason="no errors in the batch", prompts=self.net.prompts)
            return record
        record.update(self._update(x, y, hs, preds, wrong, iteration, cache), updated=True, prompts=self.net.prompts)
        return record

    def _posterior(self, x, y, xh, h1, wrong, iteration, cache) -> tuple[list[list[str]], np.ndarray]:
        """(posterior samples H[i] per example, their weights [B, Hmax]); an example that is not
        rewritten keeps its forward h as its sample."""
        cfg, hid, B = self.cfg, self.net.hidden, len(x)
        rewrite = [i for i in range(B) if wrong[i] or not cfg.rewrite_wrong_only]
        sampled = self.posterior.sample(hid.prompt, [xh[i] for i in rewrite], [y[i] for i in rewrite],
                                        cfg.num_h_samples, derive_seed(self.seed, iteration, "posterior"))
        H = [[h] for h in h1]
        for i, samples in zip(rewrite, sampled):
            H[i] = ([h1[i]] if cfg.posterior_include_forward_h else []) + samples
        Hmax = max(len(h) for h in H)
        mask = np.asarray([[j < len(H[i]) for j in range(Hmax)] for i in range(B)])
        cells = [(i, j) for i in range(B) for j in range(len(H[i]))]
        # weights under the current prompts (uniform from T = 100 on, as the reference)
        if Hmax == 1 or cfg.posterior_temp >= 100:
            return H, mask / mask.sum(axis=1, keepdims=True)
        ll = np.zeros((B, Hmax))
        ll[tuple(zip(*cells))] = self._output_scores(
            [self.net.output.prompt] * len(cells), [x[i] for i, _ in cells], [y[i] for i, _ in cells],
            [H[i][j] for i, j in cells], cache)
        prior = None
        if cfg.scoring == "logprob":
            prior = np.zeros((B, Hmax))
            prior[tuple(zip(*cells))] = hid.log_prob([hid.prompt] * len(cells), [x[i] for i, _ in cells],
                                                     [H[i][j] for i, j in cells], cache)
        return H, E.posterior_weights(ll, prior, cfg.posterior_temp, mask)

    def _update(self, x, y, h1, preds, wrong, iteration, cache) -> dict:
        """One update of every layer's prompt. DLN-1 is the two-layer case without a hidden
        layer: one "sample" h = None of weight 1 per example, and the logp penalty falls on the
        output layer's own wrong answers."""
        cfg, out, hid = self.cfg, self.net.output, self.net.hidden
        B = len(x)
        prop, rank = self._split(B, iteration)
        record = {}
        if hid is None:
            H, weights = [[None] for _ in range(B)], np.ones((B, 1))
        else:
            xh = [hid.view(v) for v in x]   # what the hidden layer and the posterior read
            H, weights = self._posterior(x, y, xh, h1, wrong, iteration, cache)
            record["posterior"] = {"samples": H, "weights": [weights[i, :len(H[i])].tolist() for i in range(B)]}
        Hmax = weights.shape[1]

        # proposals for every layer in one call
        rng = np.random.default_rng(derive_seed(self.seed, iteration, "proposal_order"))
        seen = [x[i] if hid is None else input_with_thoughts(x[i], h1[i]) for i in range(B)]
        jobs = [self._job(out.prompt, "p2", [BackwardInfo(seen[i], y[i], preds[i], bool(wrong[i])) for i in prop])]
        if hid is not None:
            h_star = [H[i][int(np.argmax(weights[i]))] for i in range(B)]
            jobs.append(self._job(hid.prompt, "p1", [BackwardInfo(xh[i], h_star[i], h1[i], bool(wrong[i]))
                                                     for i in prop]))
        props = self.proposer.propose(jobs, rng, derive_seed(self.seed, iteration, "proposal"))
        w = weights[rank]
        rcells = [(r, i, j) for r, i in enumerate(rank) for j in range(len(H[i]))]
        penalty = self.logp_penalty_at(iteration)

        def grid(cands: list[str], score) -> np.ndarray:
            """[len(rank), Hmax, K]: ``score(prompts, example indices, hs)`` of every ranked
            sample under every candidate, in one call."""
            req = [(r, i, j, k) for r, i, j in rcells for k in range(len(cands))]
            s = np.zeros((len(rank), Hmax, len(cands)))
            flat = score([cands[k] for *_, k in req], [i for _, i, _, _ in req], [H[i][j] for _, i, j, _ in req])
            for (r, _, j, k), v in zip(req, flat):
                s[r, j, k] = v
            return s

        def by_candidate(cands: list[str], score, targets) -> np.ndarray:
            """[len(rank), K]: ``score(prompts, inputs, targets)`` of every ranked example."""
            return score([c for _ in rank for c in cands], [x[i] for i in rank for _ in cands],
                         [targets[i] for i in rank for _ in cands]).reshape(len(rank), len(cands), -1)

        # p2: ELBO over the posterior samples
        c2 = self._candidates(out.prompt, props[0], "p2")
        s2 = grid(c2, lambda ps, idx, hs: self._output_scores(ps, [x[i] for i in idx], [y[i] for i in idx],
                                                                hs, cache))
        elbo2 = E.elbo(s2, w)
        kl = pen2 = None
        if cfg.trust_factor > 0:   # on the forward h under each candidate
            kl = E.trust_kl(by_candidate(c2, lambda ps, xs, ys: out.log_likelihood(
                ps, xs, ys, None if h1 is None else [h1[i] for i in rank for _ in c2], cache)[1], y))
        if hid is None and penalty > 0:   # log-lik, under each candidate, of the wrong answers given
            pen2 = E.penalty(by_candidate(c2, lambda ps, xs, ys: out.log_likelihood(
                ps, xs, ys, None, cache)[0], preds)[..., 0], wrong[rank], cfg.logp_penalty_scale)
        obj2 = E.candidate_objective(elbo2, kl, cfg.trust_factor, pen2, penalty)
        best2 = E.select(obj2)
        out.prompt = c2[best2]
        record.update(p2_candidates=_table(c2, elbo2, obj2, kl, pen2), elbo2=float(elbo2[best2]),
                      logp_penalty=penalty)
        if hid is None:
            return record

        # p1: ELBO of the posterior samples under each candidate
        c1 = self._candidates(hid.prompt, props[1], "p1")
        s1 = grid(c1, lambda ps, idx, hs: hid.log_prob(ps, [x[i] for i in idx], hs, cache))
        elbo1 = E.elbo(s1, w)
        pen = None
        if penalty > 0:   # log p(forward h | x, p) of the wrong examples under each candidate
            pen = E.penalty(by_candidate(c1, lambda ps, xs, hs: hid.log_prob(ps, xs, hs, cache), h1)[..., 0],
                            wrong[rank], cfg.logp_penalty_scale)
        obj1 = E.candidate_objective(elbo1, None, 0.0, pen, penalty)
        best1 = E.select(obj1)
        hid.prompt = c1[best1]
        record.update(p1_candidates=_table(c1, elbo1, obj1, None, pen), elbo1=float(elbo1[best1]))
        return record

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"prompts": self.net.prompts, "memory": self.memory, "best": self.best, "patience": self.patience}

    def load_state_dict(self, state: dict) -> None:
        self.net.set_prompts(state["prompts"])
        self.memory = [dict(m) for m in state["memory"]]
        self.best = dict(state["best"]) if state.get("best") else None
        self.patience = int(state.get("patience", 0))


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
