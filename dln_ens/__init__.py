"""dln-ens: Deep Language Networks over DeePEn-style heterogeneous ensembles and
Mixture-of-Depths members. See README.md and DESIGN (docs) for the architecture."""
from dln_ens.lm.base import Generation, LanguageModel, Score

__version__ = "0.1.0"
__all__ = ["LanguageModel", "Generation", "Score", "HFLanguageModel", "EnsembleLanguageModel",
           "DepthEnsembleLanguageModel", "OpenAILanguageModel", "build_matrices"]

_LAZY = {
    "HFLanguageModel": "dln_ens.lm.hf",
    "EnsembleLanguageModel": "dln_ens.ensemble.model",
    "DepthEnsembleLanguageModel": "dln_ens.mod.model",
    "OpenAILanguageModel": "dln_ens.lm.openai",
    "build_matrices": "dln_ens.relrep.build",
}


def __getattr__(name):  # heavy modules (torch, transformers) load on first use
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dln_ens' has no attribute {name!r}")
