"""Per-architecture access to what a Mixture-of-Depths head needs from a causal LM.

A MoD head reads the residual stream after each of the last k decoder layers, *before* the
final norm (transformers' ``output_hidden_states`` replaces the last entry with the normed
state, so we capture layer outputs with forward hooks instead), applies its own copy of the
final norm and the model's own LM head. Architectures differ only in where these modules live
and which norm they use; the table below records that. Add a row to support a new family.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn
from dln_ens.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    backbone: str            # attribute path of the decoder stack (returns last_hidden_state + cache)
    layers: str              # attribute path of the decoder layers (nn.ModuleList)
    final_norm: str          # attribute path of the final norm
    norm: Literal["rms", "layer"]
    lora_targets: tuple[str, ...]   # default LoRA target modules (peft names: the attention projections)
    lora_fan_in_fan_out: bool = False   # the targets store weight as [in, out] (GPT-2's Conv1D)
    # the LM head is model.get_output_embeddings() (GPT-NeoX renamed embed_out -> lm_head in v5)


_LLAMA_LIKE = ArchSpec("model", "model.layers", "model.norm", "rms", ("q_proj", "v_proj"))

# model_type -> spec; the model class named in errors comes from the loaded model itself.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": ArchSpec("transformer", "transformer.h", "transformer.ln_f", "layer", ("c_attn",), True),
    "gpt_neox": ArchSpec("gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "layer",
                         ("query_key_value",)),
}
SUPPORTED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GPT2LMHeadModel", "GPTNeoXForCausalLM")


class UnsupportedModelError(UserError, ValueError):
    pass


def _get(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class DepthAccess:
    """The modules of one loaded model that a MoD head uses (all frozen, owned by the model)."""
    model_class: str
    model_type: str
    backbone: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    norm: Literal["rms", "layer"]
    eps: float
    cache_kwarg: str         # "cache" (transformers >= 5) or "past_key_values"
    spec: ArchSpec

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.final_norm.weight.shape[-1]

    def norm_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final norm's (weight, bias) as float32 copies (bias None for RMSNorm)."""
        bias = getattr(self.final_norm, "bias", None)
        return (self.final_norm.weight.detach().float().clone(),
                None if bias is None else bias.detach().float().clone())

    def run_backbone(self, input_ids, attention_mask, past_key_values=None, position_ids=None, use_cache=True):
        """One decoder-stack call with the KV cache; returns (last_hidden_state, cache)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                  self.cache_kwarg: past_key_values}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.backbone(**kwargs)
        return out.last_hidden_state, getattr(out, self.cache_kwarg, None)

    @contextmanager
    def capture_last_layers(self, k: int) -> Iterator[list[torch.Tensor]]:
        """While active, the list receives the outputs (pre-final-norm residual stream) of the
        last k decoder layers, oldest first, once per backbone call."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)

        handles = [layer.register_forward_hook(hook) for layer in self.layers[self.num_layers - k:]]
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()


def depth_access(model: nn.Module) -> DepthAccess:
    """Resolve the MoD access points of a loaded transformers causal LM, or fail naming the
    model class and the supported ones."""
    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    supported = ", ".join(SUPPORTED_CLASSES)
    if spec is None:
        raise UnsupportedModelError(
            f"Mixture-of-Depths does not support {cls} (model_type={model_type!r}). Supported: {supported} "
            f"(model_type {', '.join(ARCHITECTURES)}). To add a family, add a row to ARCHITECTURES in "
            f"dln_ens/mod/arch.py.")
    try:
        backbone, layers = _get(model, spec.backbone), _get(model, spec.layers)
        final_norm, lm_head = _get(model, spec.final_norm), model.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear):
            raise AttributeError(f"get_output_embeddings() returned {type(lm_head).__name__}, not nn.Linear")
    except AttributeError as e:
        raise UnsupportedModelError(
            f"{cls} has model_type={model_type!r} but not the expected module layout ({e}); "
            f"Mixture-of-Depths supports the stock transformers classes {supported}.") from None
    if spec.norm == "layer":
        if not isinstance(final_norm, nn.LayerNorm):
            raise UnsupportedModelError(f"{cls}: expected nn.LayerNorm at {spec.final_norm}, found "
                                        f"{type(final_norm).__name__}")
        eps = final_norm.eps
    else:
        eps = getattr(final_norm, "variance_epsilon", getattr(final_norm, "eps", None))
        if eps is None or getattr(final_norm, "bias", None) is not None:
            raise UnsupportedModelError(f"{cls}: expected an RMSNorm (weight, eps) at {spec.final_norm}, "
                                        f"found {type(final_norm).__name__}")
    params = inspect.signature(backbone.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    return DepthAccess(cls, model_type, backbone, layers, final_norm, lm_head, spec.norm, float(eps), cache_kwarg,
                       spec)
