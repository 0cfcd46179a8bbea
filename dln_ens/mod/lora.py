"""LoRA adapters (peft) for a Mixture-of-Depths member, without touching the shared base model.

An `hf` backend is shared: the plain member, ensembles and other MoD members all run the same
transformers model. A MoD member with LoRA therefore runs its own *module tree* over the base's
*weight tensors*: `shared_weight_copy` deep-copies the modules while every parameter and buffer
stays the very same tensor object, and peft injects its LoRA layers into that copy only.

Memory: the base weights are not duplicated; the member adds its adapters (r x (d_in + d_out)
per targeted projection), a copy of the (weightless) module objects, and while training the
optimizer state and the activations of the backward pass through the backbone. The adapters are
never merged into the weights (that would change the shared model), so each targeted projection
runs its small LoRA branch at inference too.

Files (peft's own format, so `peft.PeftModel.from_pretrained(model, head_dir)` reads them too):
``adapter_config.json`` + ``adapter_model.safetensors``, beside ``mod_head.*`` in the head directory.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes, save
from torch import nn

from dln_ens.errors import UserError
from dln_ens.io import atomic_write_bytes, atomic_write_text
from dln_ens.mod.arch import DepthAccess

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MissingPeftError(UserError, ImportError):
    pass


class LoraTargetError(UserError, ValueError):
    """The LoRA target modules do not exist in the model (the message lists the ones that do), or
    hit the input embeddings or the LM head, which a MoD member shares with its base."""


def require_peft():
    try:
        import peft
    except ImportError:
        raise MissingPeftError("LoRA needs the optional dependency peft: pip install 'dln-ens[lora]' "
                               "(or pip install 'peft>=0.10')") from None
    return peft


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the very tensors of ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def peft_config(settings, access: DepthAccess, k_last: int):
    """peft's LoraConfig from `config.LoraSettings`: the architecture's default targets unless
    given; ``layers="late"`` restricts the adapters to the last ``k_last`` decoder layers."""
    peft = require_peft()
    late = settings.layers == "late"
    return peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=list(settings.target_modules or access.spec.lora_targets),
        layers_to_transform=list(range(access.num_layers - k_last, access.num_layers)) if late else None,
        layers_pattern=access.spec.layers.rsplit(".", 1)[-1] if late else None,
        fan_in_fan_out=access.spec.lora_fan_in_fan_out)


def attach(model: nn.Module, config, seed: int = 0):
    """A peft model with fresh adapters (A drawn with ``seed``, B = 0: the same outputs as
    ``model``) over a weight-sharing copy of ``model``; ``model`` itself is left as it was."""
    peft = require_peft()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)   # repeatable, and the caller's random stream untouched
            # peft asks transformers >= 5 a deprecated question; nothing for our users to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            wrapped = peft.get_peft_model(shared_weight_copy(model), config)
    except ValueError as e:
        if "target" not in str(e).lower():
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise LoraTargetError(f"LoRA target modules {sorted(config.target_modules)} not found in "
                              f"{type(model).__name__}; its linear modules are: {', '.join(names)}") from None
    inner = wrapped.base_model.model
    if any(hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")
           for m in (inner.get_input_embeddings(), inner.get_output_embeddings())):
        raise LoraTargetError(f"LoRA target modules {sorted(config.target_modules)} include the input embeddings "
                              f"or the LM head; a MoD member shares both with its base (vocabulary matrices, "
                              f"layer logits): target the attention or MLP projections instead")
    return wrapped


def set_dropout(peft_model, training: bool) -> None:
    """LoRA dropout on (training) or off; the base model's own dropout stays off (eval)."""
    for name, m in peft_model.named_modules():
        if name.endswith("lora_dropout"):
            m.train(training)


def save_adapter(peft_model, directory: Path) -> str:
    """Write the adapter in peft's format; returns the sha256 of the weights file."""
    peft = require_peft()
    state = peft.get_peft_model_state_dict(peft_model)
    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    cfg = peft_model.peft_config["default"].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, data)
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return hashlib.sha256(data).hexdigest()


def has_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).exists() or (directory / ADAPTER_WEIGHTS).exists()


def read_config(directory: Path):
    peft = require_peft()
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"MoD head {directory} lists a LoRA adapter but {f} is missing; "
                                    f"retrain it with `dln-ens tune-mod --conf ...`")
    return peft.LoraConfig.from_pretrained(str(directory))


def load_weights(peft_model, directory: Path, sha256: str) -> None:
    """Load the adapter weights into ``peft_model`` (built from `read_config`), checking that
    they are the file `save_adapter` wrote with this head."""
    peft = require_peft()
    data = (directory / ADAPTER_WEIGHTS).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"MoD head {directory}: {ADAPTER_WEIGHTS} is not the adapter saved with "
                         f"mod_head.json (checksum differs); retrain with `dln-ens tune-mod --conf ...`")
    state = load_bytes(data)
    result = peft.set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"MoD head {directory}: the adapter does not fit the model (missing {missing[:4]}, "
                         f"unexpected {list(result.unexpected_keys)[:4]})")
