"""``hf``: one local transformers model (`HFLanguageModel.from_pretrained`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import ConfigError


@dataclass
class HFBackend:
    type: Literal["hf"]
    path: str
    device: str = "cpu"
    dtype: str = "auto"
    device_map: Union[str, dict, None] = None
    trust_remote_code: bool = False
    batch_size: int = 16


def check_model_dir(path: str, where: str) -> None:
    """A local model directory must exist and hold a config, weights and a tokenizer."""
    from dln_ens.lm.checkpoint import MissingModelError, check_model_dir as check
    try:
        check(path)
    except MissingModelError as e:
        hint = (" Build the zoo with `dln-ens zoo --conf ...` (or `sh sh/mat.sh`), or point the path"
                " at a local Hugging Face checkpoint.") if not Path(path).exists() else ""
        raise ConfigError(f"{where}: {e}.{hint}") from None


def _check(b: HFBackend, name: str, ctx: CheckContext) -> None:
    from dln_ens.distributed.devices import DeviceSpecError, check_device_spec
    if b.batch_size < 1:
        raise ctx.error(f"backends.{name}.batch_size", f"must be at least 1, got {b.batch_size}")
    for key in ("device", "device_map"):
        try:
            check_device_spec(getattr(b, key))
        except DeviceSpecError as e:
            raise ctx.error(f"backends.{name}.{key}", str(e)) from None
    if ctx.check_paths:
        check_model_dir(b.path, f"{ctx.source}: key 'backends.{name}.path'")


def _build(b: HFBackend, pool, name: str):
    from dln_ens.distributed import processes_from_env
    from dln_ens.distributed.devices import with_local_rank
    from dln_ens.lm.hf import HFLanguageModel
    rank = processes_from_env().local_rank    # "cuda:{local_rank}": one GPU per process
    return HFLanguageModel.from_pretrained(b.path, device=with_local_rank(b.device, rank), dtype=b.dtype,
                                           device_map=with_local_rank(b.device_map, rank),
                                           trust_remote_code=b.trust_remote_code, name=name,
                                           batch_size=b.batch_size)


TYPE = BackendType(schema=HFBackend, build=_build, describe=lambda b: {"path": b.path}, check=_check,
                   check_member=lambda b, name, where, ctx: None, embeddings=lambda b, name: name)
