"""`DepthEnsembleLanguageModel`: a Mixture-of-Depths member over an `HFLanguageModel`.

It shares the base's transformers model and tokenizer (so its vocabulary, input embeddings and
therefore its relative-representation matrix are the base's) and only replaces `forward`:
the last k layers' residual streams each go through a trainable float32 norm (initialised from
the final norm) and the base's LM head, and a router mixes the k logit tensors. With k_last=1
the output is the base model's own output. generate / score / next_token_* and the KV cache
come unchanged from `HFLanguageModel`.

With ``lora`` the member runs LoRA adapters (peft) in its own module tree over the base's weight
tensors (`dln_ens/mod/lora.py`): the base model, shared with other backends, is never modified.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save
from torch import nn

from dln_ens.io import atomic_write_bytes, atomic_write_text
from dln_ens.lm.hf import HFLanguageModel
from dln_ens.mod import heads, lora as lora_files
from dln_ens.mod.arch import DepthAccess, depth_access

HEAD_WEIGHTS = "mod_head.safetensors"
HEAD_CONFIG = "mod_head.json"
FORMAT_VERSION = 1


class DepthHead(nn.Module):
    """The trainable part: k per-layer norms and the router (float32)."""

    def __init__(self, access: DepthAccess, k_last: int, router: Literal["learned", "uniform"]):
        super().__init__()
        self.k_last, self.router_kind, self.norm_kind, self.eps = k_last, router, access.norm, access.eps
        weight, bias = access.norm_params()
        self.norm_weight = nn.Parameter(weight.repeat(k_last, 1))                  # [k, d]
        self.norm_bias = None if bias is None else nn.Parameter(bias.repeat(k_last, 1))
        # starts (almost) uniform; the tiny ramp breaks top-K ties towards the deepest layers.
        # NB: with top_k=1 the renormalised weight is always 1, so the router gets no gradient.
        self.router = nn.Linear(access.hidden_size, k_last) if router == "learned" else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)
            with torch.no_grad():
                self.router.bias.copy_(1e-3 * torch.arange(k_last, dtype=torch.float32))

    def normed(self, j: int, h: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "rms":
            return heads.rms_norm(h, self.norm_weight[j], self.eps)
        return heads.layer_norm(h, self.norm_weight[j], self.norm_bias[j], self.eps)

    def weights(self, final_hidden: torch.Tensor, top_k: int | None) -> torch.Tensor:
        if self.router is None:
            return heads.uniform_weights(final_hidden.shape[:-1], self.k_last, final_hidden.device)
        return heads.route(self.router(final_hidden.float()), top_k)


@dataclass
class DepthOutput:
    logits: torch.Tensor                 # [..., V] mixed logits (float32)
    layer_logits: list[torch.Tensor]     # k x [..., V], oldest layer first, last = final layer
    weights: torch.Tensor                # [..., k]


class DepthEnsembleLanguageModel(HFLanguageModel):
    """``lora``: `config.LoraSettings` or a peft ``LoraConfig`` for fresh adapters (A drawn with
    ``lora_seed``, B = 0); they live in ``self.peft``, a peft model over a weight-sharing copy of
    ``base.model``."""

    def __init__(self, base: HFLanguageModel, k_last: int, router: Literal["learned", "uniform"] = "learned",
                 top_k: int | None = None, name: str | None = None, lora=None, lora_seed: int = 0):
        access = depth_access(base.model)
        if not 1 <= k_last <= access.num_layers:
            raise ValueError(f"k_last={k_last} must be between 1 and the number of decoder layers of "
                             f"{base.name} ({access.num_layers})")
        if router not in ("learned", "uniform"):
            raise ValueError(f"router must be 'learned' or 'uniform', got {router!r}")
        if top_k is not None and not 1 <= top_k <= k_last:
            raise ValueError(f"top_k={top_k} must be between 1 and k_last={k_last}, or None")
        if top_k is not None and router == "uniform":
            raise ValueError("top_k needs a learned router (a uniform router has no largest weights)")
        base.model.requires_grad_(False)   # shared weights: frozen, also under the adapters
        self.peft, model = None, base.model
        if lora is not None:
            if not hasattr(lora, "peft_type"):
                lora = lora_files.peft_config(lora, access, k_last)
            self.peft = lora_files.attach(base.model, lora, lora_seed)
            model, access = self.peft.base_model.model, None
        variant = variant_name(k_last, router, top_k, lora=self.peft is not None)
        super().__init__(model, base.tokenizer, name=name or f"{base.name}+{variant}",
                         batch_size=getattr(base, "batch_size", 16))
        self.base, self.access = base, access or depth_access(model)
        self.context_limit, self.truncate = base.context_limit, base.truncate   # the base's policy
        self.k_last, self.router, self.top_k = k_last, router, top_k
        self.head = DepthHead(self.access, k_last, router).to(self.access.lm_head.weight.device)

    # ---------------------------------------------------------------- forward

    def hidden_parts(self, input_ids, attention_mask, past_key_values=None, position_ids=None, use_cache=True):
        """(k layer outputs [B,T,d] oldest first, final normed hidden [B,T,d], cache)."""
        with self.access.capture_last_layers(self.k_last) as captured:
            final, cache = self.access.run_backbone(input_ids, attention_mask, past_key_values, position_ids,
                                                    use_cache)
        if len(captured) != self.k_last:
            raise RuntimeError(f"{self.name}: captured {len(captured)} layer outputs, expected {self.k_last} "
                               f"(does {self.access.model_class} call its layers once per forward?)")
        dev = self.head.norm_weight.device
        return [h.to(dev) for h in captured], final.to(dev), cache

    def layer_logits(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the j-th of the last k layers: its own norm, then the base's LM head."""
        lm_head = self.access.lm_head
        return lm_head(self.head.normed(j, h).to(lm_head.weight.dtype)).float()

    def depth_logits(self, hiddens: list[torch.Tensor], final: torch.Tensor) -> DepthOutput:
        """Head math on hidden states of any leading shape ([B,T,d] or selected positions [N,d])."""
        layer_logits = [self.layer_logits(j, h) for j, h in enumerate(hiddens)]
        weights = self.head.weights(final, self.top_k)
        return DepthOutput(heads.combine(layer_logits, weights), layer_logits, weights)

    def forward(self, input_ids, attention_mask, past_key_values=None, position_ids=None, logits_to_keep: int = 0):
        """HFLanguageModel's hook: mixed float32 logits [B, T, V] (the last ``logits_to_keep``
        positions when > 0) and the base model's KV cache."""
        dev = self.device
        hiddens, final, cache = self.hidden_parts(input_ids.to(dev), attention_mask.to(dev), past_key_values,
                                                  None if position_ids is None else position_ids.to(dev))
        if logits_to_keep > 0:
            hiddens, final = [h[:, -logits_to_keep:] for h in hiddens], final[:, -logits_to_keep:]
        w = self.head.weights(final, self.top_k)
        out = None  # accumulate layer by layer so k full [B, T, V] tensors never coexist
        for j, h in enumerate(hiddens):
            z = self.layer_logits(j, h)
            out = z if self.k_last == 1 else (w[..., j, None] * z if out is None else out + w[..., j, None] * z)
        return out, cache

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The head's and the LoRA adapters' parameters that require gradients (the base's never do)."""
        out = {f"head.{n}": p for n, p in self.head.named_parameters() if p.requires_grad}
        out.update((f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad)
        return out

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    # ---------------------------------------------------------------- head files

    def fingerprint(self) -> dict:
        return base_fingerprint(self.model, self.access)

    def save_head(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the head (safetensors) and its JSON config into ``directory``; refuses a
        directory that holds a model checkpoint (never overwrite base files)."""
        d = Path(directory)
        example = default_head_dir(d, self.k_last, self.router, self.top_k, lora=self.peft is not None)
        if (d / "config.json").exists() or any(d.glob("model*.safetensors")):
            raise FileExistsError(f"{d} holds a model checkpoint; MoD heads go in their own directory "
                                  f"(e.g. {example})")
        if self.peft is None and lora_files.has_adapter(d):
            raise FileExistsError(f"{d} holds a LoRA adapter ({lora_files.ADAPTER_CONFIG}) that this head "
                                  f"without LoRA would leave behind; save it in another directory (e.g. {example})")
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        adapter = None
        if self.peft is not None:   # the adapter first: mod_head.json, written last, names its checksum
            adapter = {"config": lora_files.ADAPTER_CONFIG, "weights": lora_files.ADAPTER_WEIGHTS,
                       "sha256": lora_files.save_adapter(self.peft, d)}
        meta = {"format_version": FORMAT_VERSION, "k_last": self.k_last, "router": self.router,
                "top_k": self.top_k, "norm": self.head.norm_kind, "eps": self.head.eps, "lora": adapter,
                "base_name": self.base.name, "base": self.fingerprint(), **(extra or {})}
        atomic_write_bytes(d / HEAD_WEIGHTS, save(tensors))
        atomic_write_text(d / HEAD_CONFIG, json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def from_head(cls, base: HFLanguageModel, head_dir: str | os.PathLike, k_last: int | None = None,
                  router: str | None = None, top_k: int | None = None, name: str | None = None
                  ) -> "DepthEnsembleLanguageModel":
        """Load a head written by `dln-ens tune-mod`, with its LoRA adapter when it was trained with
        one. ``k_last`` / ``router``, when given (e.g. from a config), must match the file;
        ``top_k`` given here overrides the trained routing."""
        d = Path(head_dir)
        if not (d / HEAD_CONFIG).is_file() or not (d / HEAD_WEIGHTS).is_file():
            raise FileNotFoundError(f"{d} is not a MoD head directory (needs {HEAD_CONFIG} and {HEAD_WEIGHTS}); "
                                    f"train one with `dln-ens tune-mod --conf ...`")
        meta = json.loads((d / HEAD_CONFIG).read_text())
        for key, want in (("k_last", k_last), ("router", router)):
            if want is not None and meta[key] != want:
                raise ValueError(f"MoD head {d} was trained with {key}={meta[key]!r} but {want!r} was asked "
                                 f"for; set {key} to {meta[key]!r} or retrain with `dln-ens tune-mod`")
        adapter = meta.get("lora")
        if adapter is None and lora_files.has_adapter(d):
            raise ValueError(f"MoD head {d} holds a LoRA adapter ({lora_files.ADAPTER_CONFIG}) that its "
                             f"{HEAD_CONFIG} does not list; retrain with `dln-ens tune-mod` into a fresh directory")
        lora = lora_files.read_config(d) if adapter is not None else None
        mod = cls(base, meta["k_last"], meta["router"], top_k if top_k is not None else meta["top_k"], name=name,
                  lora=lora)
        have = mod.fingerprint()
        diff = [k for k in set(have) | set(meta["base"]) if have.get(k) != meta["base"].get(k)]
        if diff:
            was = meta["base"]
            detail = ", ".join(f"{k}: trained {was.get(k)!r}, now {have.get(k)!r}" for k in sorted(diff))
            raise ValueError(f"MoD head {d} was trained on a different base model than {base.name} ({detail}); "
                             f"retrain it with `dln-ens tune-mod --conf ...`")
        state = load_file(str(d / HEAD_WEIGHTS))
        missing, unexpected = mod.head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"MoD head {d}: tensors do not match the head (missing {missing}, unexpected {unexpected})")
        if adapter is not None:
            lora_files.load_weights(mod.peft, d, adapter["sha256"])
        return mod


def base_fingerprint(model: nn.Module, access: DepthAccess) -> dict:
    """What must be equal for a head to apply: architecture, sizes, the final norm and (a row
    sample of) the LM head."""
    h = hashlib.sha256()
    h.update(access.final_norm.weight.detach().float().cpu().numpy().tobytes())
    w = access.lm_head.weight.detach()
    rows = torch.linspace(0, w.shape[0] - 1, min(w.shape[0], 1024)).long().to(w.device)
    h.update(w[rows].float().cpu().numpy().tobytes())
    return {"model_class": access.model_class, "model_type": access.model_type,
            "num_layers": access.num_layers, "hidden_size": access.hidden_size,
            "vocab_size": int(w.shape[0]), "weights_sha256": h.hexdigest()[:16]}


def default_head_dir(base_path: str | os.PathLike, k_last: int, router: str, top_k: int | None,
                     lora: bool = False) -> Path:
    """<parent>/<base_name>.mod-k<k>-<router>[-top<K>][-lora]/, beside (never inside) the base model."""
    p = Path(base_path).resolve()
    return p.parent / f"{p.name}.{variant_name(k_last, router, top_k, lora)}"


def variant_name(k_last: int, router: str, top_k: int | None, lora: bool = False) -> str:
    """``mod-k<k>-<router>[-top<K>][-lora]``: names a MoD variant (its backend name, its head directory)."""
    return f"mod-k{k_last}-{router}" + (f"-top{top_k}" if top_k else "") + ("-lora" if lora else "")

