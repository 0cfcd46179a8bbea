"""Backend types by config ``type``: a new one is one module plus one line here (README "Extending")."""
from dln_ens.backend_types import ensemble, hf, mod, openai, user_class
from dln_ens.backend_types.base import BackendType, CheckContext

__all__ = ["BACKEND_TYPES", "BackendType", "CheckContext"]

BACKEND_TYPES: dict[str, BackendType] = {
    "hf": hf.TYPE,
    "mod": mod.TYPE,
    "ensemble": ensemble.TYPE,
    "class": user_class.TYPE,
    "openai": openai.TYPE,
}
