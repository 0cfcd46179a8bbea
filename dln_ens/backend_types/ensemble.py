"""``ensemble``: DeePEn-style fusion of members with different vocabularies (`EnsembleLanguageModel`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from dln_ens.backend_types.base import BackendType, CheckContext
from dln_ens.confparse import above, at_least
from dln_ens.ensemble.options import EnsembleOptions


@dataclass(kw_only=True)
class EnsembleBackend(EnsembleOptions):
    type: Literal["ensemble"]
    members: list[str]               # names of local backends (hf, mod, class implementing LocalMember)
    main: str                        # the member whose vocabulary the fused distribution uses
    matrices: str                    # directory built by `sh sh/mat.sh`
    # matrix build (`dln-ens mat`)
    temperature: float = field(default=100.0, metadata=above(0))
    topk: Union[int, None] = field(default=64, metadata=at_least(1))      # None = dense matrices
    min_anchors: int = field(default=100, metadata=at_least(1))
    num_anchors: Union[int, None] = field(default=None, metadata=at_least(1))   # the n most consistent; None = all
    anchors: Union[str, None] = None       # a fixed anchors.json for controlled comparisons

    def options(self) -> EnsembleOptions:
        return EnsembleOptions(**{f: getattr(self, f) for f in EnsembleOptions.__dataclass_fields__})

    def matrix_params(self) -> dict:
        """The build settings of this ensemble's matrices (recorded in meta.json, checked on load)."""
        from dln_ens.relrep.build import build_params
        from dln_ens.relrep.cli import VALUE_DTYPE
        return build_params(self.temperature, self.topk, self.num_anchors, self.anchors, VALUE_DTYPE)

    def uses_matrices(self) -> bool:
        from dln_ens.fusion.registry import fusion_class, fusion_settings
        s = fusion_settings(self.method, self.fusion, len(self.members))
        return fusion_class(self.method).needs_matrices(s, len(self.members))


def _check(b: EnsembleBackend, name: str, ctx: CheckContext) -> None:
    where = f"backends.{name}"
    if not b.members:
        raise ctx.error(f"{where}.members", "an ensemble needs at least one member")
    for i, m in enumerate(b.members):
        ctx.need_member(f"{where}.members[{i}]", m)
    if len(set(b.members)) != len(b.members):
        raise ctx.error(f"{where}.members", f"members must be distinct, got {b.members}")
    if b.main not in b.members:
        raise ctx.error(f"{where}.main", f"{b.main!r} is not one of the members {b.members}")
    from dln_ens.confparse import Ctx, parse_dataclass
    from dln_ens.fusion.base import SettingsError
    from dln_ens.fusion.registry import fusion_class
    try:
        cls = fusion_class(b.method)
    except SettingsError as e:
        raise ctx.error(f"{where}.method", str(e)) from None
    parse_dataclass(cls.Settings, b.fusion, f"{where}.fusion", Ctx(ctx.source))   # types, unknown keys
    try:
        b.options().check(b.members)
    except SettingsError as e:
        key = e.key if e.key in EnsembleOptions.__dataclass_fields__ else f"fusion.{e.key}"   # else a method setting
        raise ctx.error(f"{where}.{key}", str(e)) from None
    from dln_ens.distributed.devices import DeviceSpecError, check_device_spec
    try:
        check_device_spec(b.compute_device)
    except DeviceSpecError as e:
        raise ctx.error(f"{where}.compute_device", str(e)) from None


def _validate(b: EnsembleBackend, name: str, ctx: CheckContext) -> None:
    for i, m in enumerate(b.members):
        member = ctx.backends[m]
        ctx.types[member.type].check_member(member, m, f"backends.{name}.members[{i}]", ctx)


def _build(b: EnsembleBackend, pool, name: str):
    import dataclasses
    from dln_ens.distributed import processes_from_env
    from dln_ens.distributed.devices import with_local_rank
    from dln_ens.ensemble.model import EnsembleLanguageModel
    members = {m: pool.get(m) for m in b.members}
    device = with_local_rank(b.compute_device, processes_from_env().local_rank)
    options = dataclasses.replace(b.options(), compute_device=device)
    return EnsembleLanguageModel(members, main=b.main, matrices=b.matrices, options=options, name=name,
                                 matrix_params=b.matrix_params())


def _describe(b: EnsembleBackend) -> dict:
    from dln_ens.fusion.registry import fusion_settings
    import dataclasses
    info = {"members": "+".join(b.members), "main": b.main, "method": b.method, "score_mode": b.score_mode,
            "weights": "uniform" if b.weights is None else b.weights,
            "weighting": b.weighting or ("fixed" if b.weights else "uniform")}
    info.update(dataclasses.asdict(fusion_settings(b.method, b.fusion, len(b.members))))
    if b.uses_matrices():
        info["matrix"] = "dense" if b.topk is None else f"sparse k={b.topk}"
    return info


def _depends_on(b: EnsembleBackend, other) -> dict:
    """Its members, and its matrices (their meta.json holds a checksum of each matrix)."""
    from pathlib import Path
    from dln_ens.fingerprint import file_digest
    meta = Path(b.matrices) / "meta.json"
    return {"members": {m: other(m) for m in b.members},
            "matrices": file_digest(meta) if b.uses_matrices() and meta.is_file() else None}


TYPE = BackendType(schema=EnsembleBackend, build=_build, describe=_describe, check=_check, validate=_validate,
                   depends_on=_depends_on,
                   not_member="fuse the members of both ensembles in one instead")
