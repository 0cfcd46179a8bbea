"""Deep Language Networks (Sordoni et al. 2023) over any `LanguageModel` backend."""
from dln_ens.dln.layers import HiddenLayer, OutputLayer
from dln_ens.dln.network import DeepLanguageNetwork
from dln_ens.dln.run import run_dln
from dln_ens.dln.samplers import PosteriorSampler, PromptProposer
from dln_ens.dln.templates import DLNTemplate, TemplateLibrary, load_template
from dln_ens.dln.trainer import VariationalTrainer

__all__ = ["DeepLanguageNetwork", "OutputLayer", "HiddenLayer", "PromptProposer", "PosteriorSampler",
           "VariationalTrainer", "TemplateLibrary", "DLNTemplate", "load_template", "run_dln"]
