"""The CPU training loop of a zoo member: plain next-token loss on its corpus documents.

Deterministic given the seed: the batch order comes from a seeded ``random.Random`` and the
initialisation from ``torch.manual_seed`` (set by the caller before building the model).
"""
from __future__ import annotations

import math
import random

import torch
from tqdm import tqdm


def encode_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document as the model sees it: the tokenizer's default special
    tokens (BOS for the families that add one), then the text, then EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; the zoo needs one")
    return [tokenizer(d)["input_ids"] + [eos] for d in docs]


def batches(seqs: list[list[int]], batch_size: int, rng: random.Random):
    """Endless batches of similar-length sequences (less padding on a CPU): each epoch shuffles,
    cuts into chunks of 32 batches, sorts each chunk by length, and shuffles the batches."""
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        chunk = 32 * batch_size
        out = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lambda i: len(seqs[i]))
            out += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
        rng.shuffle(out)
        yield from out


def collate(seqs: list[list[int]], idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
        mask[r, :len(seqs[i])] = 1
    return ids, mask


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (unpadded) positions. Padding is found with the
    mask, not the pad id, because some tokenizers pad with their EOS token."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100)


def train_lm(model, tokenizer, docs: list[str], *, steps: int, batch_size: int, lr: float, seed: int,
             warmup: float = 0.05, desc: str = "train") -> list[float]:
    """Train ``model`` in place with AdamW (linear warm-up, cosine decay); returns the losses."""
    seqs = encode_docs(tokenizer, docs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(f"train/{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / n_warm if s < n_warm else 0.5 * (1 + math.cos(math.pi * (s - n_warm) / max(1, steps - n_warm))))
    model.train()
    losses = []
    stream = batches(seqs, batch_size, rng)
    bar = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
    for _ in bar:
        ids, mask = collate(seqs, next(stream), pad)
        loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
