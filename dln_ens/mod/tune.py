"""`dln-ens tune-mod`: train a Mixture-of-Depths head (norms + router) on a task.

Training text per example is the forward format every model in the project sees:
"{instruction}\\n\\nInput: {input}\\nAnswer: {target}\\n". By default the loss covers only the
answer tokens (" {target}\\n", what the member is asked to predict at evaluation time);
``loss_on="all"`` covers every token. Loss = CE(mixed logits) + lambda_kd * sum_j KL(final || j),
final layer detached (Luo & Specia 2024). The base model stays frozen; without LoRA it runs
without gradients (its states at the target positions are computed once), with LoRA (the
member's own adapters, `dln_ens/mod/lora.py`) the adapters train jointly with the head under
the same loss and the backbone runs forward and backward every step. ``train_head=False``
trains the adapters alone (with k_last=1: plain LoRA, the comparison without MoD).
Held-out loss (the task's dev split, CE of the mixed logits) is measured before training and
after each epoch; the best epoch's head is kept and saved (early stopping with ``patience``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dln_ens.checks import check_number
from dln_ens.data.task import Example, Task
from dln_ens.lm.batching import common_prefix, pad
from dln_ens.mod import heads, lora as lora_files
from dln_ens.mod.model import DepthEnsembleLanguageModel, default_head_dir


def forward_text(instruction: str, ex: Example) -> tuple[str, str]:
    """(prompt, prompt + answer) in the project's fixed forward format."""
    prompt = f"{instruction}\n\nInput: {ex.input}\nAnswer:"
    return prompt, f"{prompt} {ex.target}\n"


@dataclass
class Batch:
    input_ids: torch.Tensor      # [B, T] right-padded
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor      # [B, T] True where token t is a training target


def encode_examples(lm, instruction: str, examples: list[Example], loss_on: str) -> list[tuple[list[int], int]]:
    """Per example (token ids of the full text, index of the first target token). The answer
    starts where the tokenisation of the prompt alone stops agreeing with the full text's."""
    out = []
    for ex in examples:
        prompt, full = forward_text(instruction, ex)
        ids = lm.encode(full)
        start = common_prefix(lm.encode(prompt), ids)
        if loss_on == "all":
            start = 1
        if start >= len(ids):
            raise ValueError(f"example {ex.input[:40]!r}: no answer tokens after the prompt")
        out.append((ids, max(start, 1)))
    return out


def collate(items: list[tuple[list[int], int]], pad_id: int, device) -> Batch:
    ids, att = pad([seq for seq, _ in items], pad_id, "right", device)
    loss = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (seq, start) in enumerate(items):
        loss[i, start:len(seq)] = True
    return Batch(ids, att, loss.to(device))


@dataclass
class Features:
    """One example's frozen-backbone states at the positions that predict its target tokens."""
    hiddens: torch.Tensor    # [k, n, d] last k layer outputs (pre-norm)
    final: torch.Tensor      # [n, d] the base's normed final state (router input)
    labels: torch.Tensor     # [n] the tokens to predict


def extract_features(mod: DepthEnsembleLanguageModel, items: list[tuple[list[int], int]], pad_id: int
                     ) -> list[Features]:
    """Run the backbone once over a batch; keep only the target positions. Gradients flow only
    into LoRA adapters (when the member has them and grad mode is on)."""
    batch = collate(items, pad_id, mod.device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and mod.peft is not None):
        hiddens, final, _ = mod.hidden_parts(batch.input_ids, batch.attention_mask, use_cache=False)
    sel = batch.loss_mask[:, 1:].to(final.device)          # hidden at t predicts token t+1
    labels = batch.input_ids[:, 1:].to(final.device)
    return [Features(torch.stack([h[i, :-1][sel[i]] for h in hiddens]), final[i, :-1][sel[i]], labels[i][sel[i]])
            for i in range(len(items))]


def feature_losses(mod: DepthEnsembleLanguageModel, feats: list[Features]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(CE of the mixed logits per target token, distillation loss, number of target tokens).
    Only target positions go through the head: k full [B, T, V] tensors are never built."""
    hiddens = torch.cat([f.hiddens for f in feats], 1)
    final, labels = torch.cat([f.final for f in feats]), torch.cat([f.labels for f in feats])
    out = mod.depth_logits(list(hiddens), final)
    ce = F.cross_entropy(out.logits, labels)
    kd = heads.distill_loss(out.layer_logits) if mod.k_last > 1 else ce.new_zeros(())
    return ce, kd, int(labels.numel())


class FeatureSource:
    """Features of a fixed list of examples: computed once and kept when they fit in
    ``max_bytes`` (the base is frozen, so every epoch would recompute the same states),
    otherwise recomputed per batch. Both give the same numbers. Never kept for a member with
    LoRA adapters (its states change as they train)."""

    def __init__(self, mod, data: list[tuple[list[int], int]], pad_id: int, batch_size: int, max_bytes: int,
                 desc: str = "", progress: bool = False):
        self.mod, self.data, self.pad_id = mod, data, pad_id
        n_targets = sum(len(ids) - start for ids, start in data)
        width = mod.access.hidden_size * (mod.k_last + 1) * 4
        self.cached = None
        if mod.peft is None and n_targets * width <= max_bytes:
            self.cached = []
            for i in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, leave=False):
                self.cached += extract_features(mod, data[i:i + batch_size], pad_id)

    def get(self, idx: list[int]) -> list[Features]:
        if self.cached is not None:
            return [self.cached[i] for i in idx]
        return extract_features(self.mod, [self.data[i] for i in idx], self.pad_id)


@torch.no_grad()
def held_out_loss(mod: DepthEnsembleLanguageModel, data, batch_size: int, pad_id: int) -> float:
    """Mean per-token CE of the mixed logits over the target tokens of ``data`` (encoded
    examples or a FeatureSource)."""
    src = data if isinstance(data, FeatureSource) else FeatureSource(mod, data, pad_id, batch_size, 0)
    total, n = 0.0, 0
    for i in range(0, len(src.data), batch_size):
        ce, _, cnt = feature_losses(mod, src.get(list(range(i, min(i + batch_size, len(src.data))))))
        total, n = total + ce.item() * cnt, n + cnt
    return total / max(n, 1)


@dataclass
class TuneResult:
    head_dir: Path | None
    num_trainable: int
    initial_dev_loss: float
    best_dev_loss: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def tune_mod(mod: DepthEnsembleLanguageModel, task: Task, *, out_dir: str | Path | None = None,
             epochs: int = 3, lr: float = 1e-3, lambda_kd: float = 0.1, batch_size: int = 16,
             patience: int = 2, seed: int = 0, loss_on: Literal["target", "all"] = "target",
             max_train_examples: int | None = None, max_dev_examples: int | None = 200,
             progress: bool = True, max_feature_bytes: int = 2 << 30, train_head: bool = True,
             lora_lr: float | None = None) -> TuneResult:
    """Train ``mod``'s head (``train_head``) and its LoRA adapters if it has any, in place, on
    ``task.train``; keep the epoch with the best dev loss and, if ``out_dir`` is given, save it
    there. Without LoRA the frozen base's states at the target positions are computed once when
    they fit in ``max_feature_bytes`` (else once per batch). ``lora_lr``: the adapters' learning
    rate (default ``lr``)."""
    if loss_on not in ("target", "all"):
        raise ValueError(f"loss_on must be 'target' or 'all', got {loss_on!r}")
    check_number("epochs", epochs, ge=1, integer=True)
    check_number("lr", lr, gt=0)
    check_number("lambda_kd", lambda_kd, ge=0)
    check_number("batch_size", batch_size, ge=1, integer=True)
    check_number("patience", patience, ge=0, integer=True)
    if not task.train or not task.dev:
        raise ValueError(f"task {task.name!r} needs non-empty train and dev splits for tune-mod")
    if not train_head and mod.peft is None:
        raise ValueError(f"{mod.name}: train_head=False leaves nothing to train without LoRA adapters")
    mod.head.requires_grad_(train_head)
    t0 = time.time()
    torch.manual_seed(seed)
    pad_id = mod.pad_token_id
    train = FeatureSource(mod, encode_examples(mod, task.instruction, task.train[:max_train_examples], loss_on),
                          pad_id, batch_size, max_feature_bytes, f"tune-mod {mod.name}: base states", progress)
    dev = FeatureSource(mod, encode_examples(mod, task.instruction, task.dev[:max_dev_examples], loss_on),
                        pad_id, batch_size, max_feature_bytes)
    params = mod.trainable_parameters()
    groups = [{"params": [p for n, p in params.items() if n.startswith("head.")], "lr": lr},
              {"params": [p for n, p in params.items() if not n.startswith("head.")], "lr": lora_lr or lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    initial = held_out_loss(mod, dev, batch_size, pad_id)
    best, best_epoch, bad = initial, 0, 0
    best_state = snapshot(params)
    history = [{"epoch": 0, "train_loss": None, "dev_loss": initial}]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train.data), generator=gen).tolist()
        steps = range(0, len(order), batch_size)
        bar = tqdm(steps, desc=f"tune-mod {mod.name} epoch {epoch}/{epochs}", disable=not progress, leave=False)
        run, seen = 0.0, 0
        if mod.peft is not None:
            lora_files.set_dropout(mod.peft, True)
        for i in bar:
            ce, kd, _ = feature_losses(mod, train.get(order[i:i + batch_size]))
            loss = ce + lambda_kd * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run, seen = run + loss.item(), seen + 1
            bar.set_postfix(loss=f"{run / seen:.4f}")
        if mod.peft is not None:
            lora_files.set_dropout(mod.peft, False)
        dev_loss = held_out_loss(mod, dev, batch_size, pad_id)
        if not math.isfinite(dev_loss):
            raise FloatingPointError(f"tune-mod {mod.name}: dev loss became {dev_loss}; lower tune_mod.lr")
        history.append({"epoch": epoch, "train_loss": run / max(seen, 1), "dev_loss": dev_loss})
        if progress:
            tqdm.write(f"[tune-mod] {mod.name} epoch {epoch}: train {run / max(seen, 1):.4f}  dev {dev_loss:.4f}")
        if dev_loss < best - 1e-6:
            best, best_epoch, bad = dev_loss, epoch, 0
            best_state = snapshot(params)
        else:
            bad += 1
            if bad >= patience:
                break
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best_state[n])
    head_dir = None
    if out_dir is not None:
        head_dir = mod.save_head(out_dir, extra={"task": task.name, "loss_on": loss_on, "epochs": epochs,
                                                 "best_epoch": best_epoch, "lr": lr, "lambda_kd": lambda_kd,
                                                 "train_head": train_head, "lora_lr": lora_lr,
                                                 "seed": seed, "history": history})
    return TuneResult(head_dir, mod.num_trainable(), initial, best, best_epoch, history, time.time() - t0)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def tune_mod_from_config(cfg) -> TuneResult:
    """`dln-ens tune-mod --conf ...`: tune the `mod` backend named by ``cfg.tune_mod.backend`` and
    write its head to the backend's ``head`` directory, or beside its base model when unset."""
    from dln_ens.backend_types import BACKEND_TYPES
    from dln_ens.config import ConfigError, HFBackend, ModBackend
    from dln_ens.data import load_task

    tm = cfg.tune_mod
    if tm is None:
        raise ConfigError(f"{cfg.source}: no \"tune_mod\" section; add {{\"tune_mod\": {{\"backend\": <a mod backend>}}}}")
    mods = [n for n, b in cfg.backends.items() if isinstance(b, ModBackend)]
    name = tm.backend or (mods[0] if len(mods) == 1 else "")
    if not isinstance(cfg.backends.get(name), ModBackend):
        raise ConfigError(f"{cfg.source}: key 'tune_mod.backend': name the `mod` backend to tune "
                          f"(mod backends here: {', '.join(mods) or 'none'})")
    mb: ModBackend = cfg.backends[name]
    hb: HFBackend = cfg.backends[mb.base]
    lora = tm.lora or None
    if lora is not None:
        lora_files.require_peft()
    default_dir = default_head_dir(hb.path, mb.k_last, mb.router, mb.top_k, lora=lora is not None)
    out_dir = Path(mb.head) if mb.head else default_dir
    if out_dir.resolve() == Path(hb.path).resolve():
        raise ConfigError(f"{cfg.source}: key 'backends.{name}.head' points at the base model directory "
                          f"{hb.path}; a MoD head needs its own directory (e.g. {default_dir})")
    base = BACKEND_TYPES["hf"].build(hb, None, mb.base)   # loaded as every `hf` backend is
    try:
        mod = DepthEnsembleLanguageModel(base, mb.k_last, mb.router, mb.top_k, name=name, lora=lora,
                                         lora_seed=tm.seed)
    except lora_files.LoraTargetError as e:
        raise ConfigError(f"{cfg.source}: key 'tune_mod.lora.target_modules': {e}") from None
    task = load_task(tm.task)
    result = tune_mod(mod, task, out_dir=out_dir, epochs=tm.epochs, lr=tm.lr, lambda_kd=tm.lambda_kd,
                      batch_size=tm.batch_size, patience=tm.patience, seed=tm.seed, loss_on=tm.loss_on,
                      max_train_examples=tm.max_train_examples, max_dev_examples=tm.max_dev_examples,
                      train_head=tm.train_head, lora_lr=lora.lr if lora else None)
    what = "head" + (" + LoRA adapter" if lora else "")
    print(f"[tune-mod] {name}: dev loss {result.initial_dev_loss:.4f} -> {result.best_dev_loss:.4f} "
          f"(epoch {result.best_epoch}, {result.num_trainable} trainable parameters); {what} saved to {result.head_dir}")
    if mb.head is None:
        print(f"[tune-mod] to use it, set \"head\": \"{result.head_dir}\" in backends.{name} of {cfg.source}")
    return result
