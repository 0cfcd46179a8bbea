"""`dln-ens mat` / `sh sh/mat.sh`: build the zoo if its members are missing, then the matrices
of every ensemble in the config; up-to-date matrices are skipped, stale ones rebuilt."""
from __future__ import annotations

from pathlib import Path

from dln_ens.backend_types import BACKEND_TYPES
from dln_ens.config import Config, ConfigError, require_model_dir
from dln_ens.relrep.build import MemberStats, build_matrices
from dln_ens.relrep.store import check_built, staleness

VALUE_DTYPE = "float16"


def check_matrices(cfg: Config, backends: list[str]) -> None:
    """Before a run writes anything: the ensembles among ``backends`` (and their sub-backends)
    that read matrices have a finished build with the config's settings and intact files."""
    for name in dict.fromkeys(backends):
        b = cfg.backends[name]
        if b.type == "ensemble" and b.uses_matrices():
            check_built(b.matrices, b.members, b.matrix_params())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary_line(ensemble: str, s: MemberStats) -> str:
    k = "dense" if s.k is None else f"k={s.k}"
    return (f"{ensemble}/{s.name}: vocabulary {s.vocab}, anchors {s.anchors}, {k}, "
            f"{_size(s.bytes)} on disk, {s.seconds:.1f} s")


def _hf_name(cfg: Config, member: str) -> str | None:
    """The `hf` backend whose embeddings a member uses (a MoD member shares its base's);
    None for a user class."""
    b = cfg.backends[member]
    return BACKEND_TYPES[b.type].embeddings(b, member)


def _ensure_zoo(cfg: Config, hf_names: set[str]) -> None:
    missing = [n for n in sorted(hf_names) if not Path(cfg.backends[n].path).is_dir()]
    if missing and cfg.zoo is not None:
        from dln_ens.zoo.build import build_zoo
        print(f"models missing ({', '.join(missing)}): building the zoo in {cfg.zoo.dir}")
        build_zoo(cfg.zoo)
    for n in sorted(hf_names):
        require_model_dir(cfg.backends[n].path, f"{cfg.source}: key 'backends.{n}.path'", cfg.backends[n].allow_pickle)


def build_all(cfg: Config, force: bool = False, progress: bool = True, procs=None,
              device: str | None = None) -> dict[str, dict[str, MemberStats]]:
    """Build (or skip, when up to date) the matrices of every ensemble backend in ``cfg``.
    Returns the stats of what was built, per ensemble. ``procs`` (`distributed.Processes`)
    splits each ensemble's members among processes; ``device`` computes the matrices there."""
    from dln_ens.backends import BackendPool
    from dln_ens.distributed import Processes
    procs = procs or Processes()

    ensembles = cfg.ensembles()
    if not ensembles:
        print(f"{cfg.source}: no ensemble backends; no matrices to build")
        return {}
    plan = {}
    local = set()
    for ens, b in ensembles.items():
        hf = {m: _hf_name(cfg, m) for m in b.members}
        users = [m for m, h in hf.items() if h is None]
        local |= {h for h in hf.values() if h is not None}
        if not b.uses_matrices():
            print(f"{ens}: method {b.method!r} with these settings reads no matrices; none built")
            continue
        if users:
            raise ConfigError(f"{cfg.source}: ensemble {ens!r} uses method {b.method!r}, which needs "
                              f"matrices, but member(s) {', '.join(users)} are user classes without "
                              f"embeddings; use local hf/mod members or another method")
        plan[ens] = hf
    # the zoo is built once, by rank 0, before any process looks for its models
    procs.gather_or_raise(lambda: procs.is_main and _ensure_zoo(cfg, local), "build the zoo")
    _ensure_zoo(cfg, local)
    pool = BackendPool(cfg)
    built = {}
    for ens, hf in plan.items():
        b = ensembles[ens]
        members = {m: pool.get(h) for m, h in hf.items()}
        params = b.matrix_params()
        if not force:
            why = staleness(b.matrices, members, params)
            if why is None:
                print(f"{ens}: matrices in {b.matrices} are up to date; skipped")
                continue
            print(f"{ens}: building matrices in {b.matrices} ({why})")
        else:
            print(f"{ens}: building matrices in {b.matrices} (--force)")
        stats = build_matrices(members, b.matrices, temperature=b.temperature, topk=b.topk,
                               anchors=b.anchors, min_anchors=b.min_anchors, num_anchors=b.num_anchors,
                               progress=progress, value_dtype=VALUE_DTYPE, procs=procs, device=device)
        for s in stats.values():
            print(summary_line(ens, s))
        built[ens] = stats
    return built
