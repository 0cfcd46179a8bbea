"""``hf``: one local transformers model (`HFLanguageModel.from_pretrained`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import ConfigError, at_least


@dataclass
class HFBackend:
    type: Literal["hf"]
    path: str
    device: str = "cpu"
    dtype: str = "auto"
    device_map: Union[str, dict, None] = None
    trust_remote_code: bool = False
    batch_size: int = field(default=16, metadata=at_least(1))
    allow_pickle: bool = False       # load pytorch_model.bin (pickle: can run code) when no safetensors
    context_limit: Union[int, None] = field(default=None, metadata=at_least(2))   # None = max_position_embeddings
    truncate: Literal["error", "left"] = "error"   # examples longer than the limit: refuse, or keep their end


def require_model_dir(path: str, where: str, allow_pickle: bool = False) -> None:
    """A local model directory must exist and hold a config, safetensors weights (pickle only
    with ``allow_pickle``) and a tokenizer."""
    from dln_ens.lm.checkpoint import MissingModelError, UnsafeCheckpointError, check_model_dir as check
    try:
        check(path, allow_pickle)
    except MissingModelError as e:
        hint = (" Build the zoo with `dln-ens zoo --conf ...` (or `sh sh/mat.sh`), or point the path"
                " at a local Hugging Face checkpoint.") if not Path(path).exists() else ""
        raise ConfigError(f"{where}: {e}.{hint}") from None
    except UnsafeCheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check(b: HFBackend, name: str, ctx: CheckContext) -> None:
    from dln_ens.distributed.devices import DeviceSpecError, check_device_spec
    for key in ("device", "device_map"):
        try:
            check_device_spec(getattr(b, key))
        except DeviceSpecError as e:
            raise ctx.error(f"backends.{name}.{key}", str(e)) from None
    if ctx.check_paths:
        require_model_dir(b.path, f"{ctx.source}: key 'backends.{name}.path'", b.allow_pickle)


def _build(b: HFBackend, pool, name: str):
    from dln_ens.distributed import processes_from_env
    from dln_ens.distributed.devices import with_local_rank
    from dln_ens.lm.hf import HFLanguageModel
    rank = processes_from_env().local_rank    # "cuda:{local_rank}": one GPU per process
    return HFLanguageModel.from_pretrained(b.path, device=with_local_rank(b.device, rank), dtype=b.dtype,
                                           device_map=with_local_rank(b.device_map, rank),
                                           trust_remote_code=b.trust_remote_code, name=name,
                                           batch_size=b.batch_size, allow_pickle=b.allow_pickle,
                                           context_limit=b.context_limit, truncate=b.truncate)


def _depends_on(b: HFBackend, other) -> dict:
    from dln_ens.fingerprint import folder_digest
    return {"files": folder_digest(b.path)} if Path(b.path).is_dir() else {}


TYPE = BackendType(schema=HFBackend, build=_build, describe=lambda b: {"path": b.path}, check=_check,
                   check_member=lambda b, name, where, ctx: None, embeddings=lambda b, name: name,
                   depends_on=_depends_on)
