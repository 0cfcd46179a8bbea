"""`python -m dln_ens.bench {mat|decode|dln|score|fusion|mod|mod-lora|serve|methods|parallel} ...`: benchmarks (not tests; they print tables)."""
from __future__ import annotations

import importlib
import importlib.util
import sys

COMMANDS = {"mat": "dln_ens.bench.mat", "decode": "dln_ens.bench.decode", "dln": "dln_ens.bench.dln",
            "score": "dln_ens.bench.score", "fusion": "dln_ens.bench.fusion", "mod": "dln_ens.bench.mod", "mod-lora": "dln_ens.bench.mod_lora",
            "serve": "dln_ens.bench.serve", "methods": "dln_ens.bench.methods", "parallel": "dln_ens.bench.parallel"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = {}
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            available[name] = module
    if not argv or argv[0] not in available:
        print(f"usage: python -m dln_ens.bench {{{'|'.join(available)}}} [options]", file=sys.stderr)
        return 2
    from dln_ens.allocator import keep_freed_memory_unless_disabled
    from dln_ens.errors import UserError
    try:
        kept = keep_freed_memory_unless_disabled()
    except UserError as e:
        print(f"python -m dln_ens.bench: error: {e}", file=sys.stderr)
        return 2
    print(f"freed memory kept in the process: {'yes' if kept else 'no'} (dln_ens.allocator)", flush=True)
    return importlib.import_module(available[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
