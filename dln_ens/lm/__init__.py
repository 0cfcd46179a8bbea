from dln_ens.lm.base import Generation, LanguageModel, Score

__all__ = ["Generation", "LanguageModel", "Score", "HFLanguageModel"]


def __getattr__(name):  # keep `import dln_ens.lm` cheap: torch/transformers load on first use
    if name == "HFLanguageModel":
        from dln_ens.lm.hf import HFLanguageModel
        return HFLanguageModel
    raise AttributeError(name)
