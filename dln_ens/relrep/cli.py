"""`dln-ens mat` / `sh sh/mat.sh`: build the zoo if its members are missing, then the matrices
of every ensemble in the config; up-to-date matrices are skipped, stale ones rebuilt."""
from __future__ import annotations

from pathlib import Path

from dln_ens.config import Config, ConfigError, EnsembleBackend, HFBackend, ModBackend, check_model_dir
from dln_ens.relrep.build import MemberStats, build_matrices, build_params
from dln_ens.relrep.store import check_built, staleness

VALUE_DTYPE = "float16"


def matrix_params(b) -> dict:
    """The build settings of an ensemble backend's matrices (checked again on load)."""
    return build_params(b.temperature, b.topk, b.num_anchors, b.anchors, VALUE_DTYPE)


def check_matrices(cfg: Config, backends: list[str]) -> None:
    """Before a run writes anything: the ensembles among ``backends`` (and their sub-backends)
    that read matrices have a finished build with the config's settings and intact files."""
    from dln_ens.fusion.methods import needs_matrices
    for name in dict.fromkeys(backends):
        b = cfg.backends[name]
        if isinstance(b, EnsembleBackend) and needs_matrices(b.method, b.members, b.lr, b.steps):
            check_built(b.matrices, b.members, matrix_params(b))


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
    if isinstance(b, ModBackend):
        return b.base
    if isinstance(b, HFBackend):
        return member
    return None


def _ensure_zoo(cfg: Config, hf_names: set[str]) -> None:
    missing = [n for n in sorted(hf_names) if not Path(cfg.backends[n].path).is_dir()]
    if missing and cfg.zoo is not None:
        from dln_ens.zoo.build import build_zoo
        print(f"models missing ({', '.join(missing)}): building the zoo in {cfg.zoo.dir}")
        build_zoo(cfg.zoo)
    for n in sorted(hf_names):
        check_model_dir(cfg.backends[n].path, f"{cfg.source}: key 'backends.{n}.path'", cfg.backends[n].allow_pickle)


def build_all(cfg: Config, force: bool = False, progress: bool = True) -> dict[str, dict[str, MemberStats]]:
    """Build (or skip, when up to date) the matrices of every ensemble backend in ``cfg``.
    Returns the stats of what was built, per ensemble."""
    from dln_ens.backends import BackendPool

    ensembles = cfg.ensembles()
    if not ensembles:
        print(f"{cfg.source}: no ensemble backends; no matrices to build")
        return {}
    plan = {}
    for ens, b in ensembles.items():
        hf = {m: _hf_name(cfg, m) for m in b.members}
        users = [m for m, h in hf.items() if h is None]
        if users:
            if b.method == "deepen":
                raise ConfigError(f"{cfg.source}: ensemble {ens!r} uses method \"deepen\", which needs "
                                  f"matrices, but member(s) {', '.join(users)} are user classes without "
                                  f"embeddings; use local hf/mod members or method \"main\"/\"union\"")
            print(f"{ens}: members {', '.join(users)} are user classes; no matrices (method {b.method!r})")
            continue
        plan[ens] = hf
    _ensure_zoo(cfg, {h for hf in plan.values() for h in hf.values()})
    pool = BackendPool(cfg)
    built = {}
    for ens, hf in plan.items():
        b = ensembles[ens]
        members = {m: pool.get(h) for m, h in hf.items()}
        params = matrix_params(b)
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
                               progress=progress, value_dtype=VALUE_DTYPE)
        for s in stats.values():
            print(summary_line(ens, s))
        built[ens] = stats
    return built
