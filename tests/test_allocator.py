"""`dln_ens.allocator`: freed memory stays with the process (glibc), and the entry points' switch."""
import json
import os
import subprocess
import sys

import pytest

from dln_ens import allocator


PROBE = """
import json, os, sys, torch
from dln_ens import allocator
if sys.argv[1] == "keep" and not allocator.keep_freed_memory():
    print(json.dumps(None)); sys.exit()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
out = []
for _ in range(2):   # 20 tensors of 10 MB, filled (every page touched), then freed
    f0, r0 = allocator.page_faults(), rss_mb()
    xs = [torch.empty(10 << 18).fill_(1.0) for _ in range(20)]
    del xs
    out.append({"faults": allocator.page_faults() - f0, "kept_mb": rss_mb() - r0})
print(json.dumps(out))
"""


def probe(mode: str):
    """Two rounds of taking and freeing 200 MB in a fresh interpreter (the allocator's settings
    are process-wide: the test process keeps its own), with glibc's defaults or after
    `keep_freed_memory`."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_new_page_faults():
    """Under glibc's defaults 200 MB of 10 MB tensors goes back to the kernel when freed, and
    the next 200 MB takes its 51,200 pages again; after `keep_freed_memory` it stays with the
    process and the second round takes a fraction of them (about a quarter here: the heap's
    blocks are not all reused in place)."""
    if not os.path.exists("/proc/self/statm") or allocator.page_faults() is None:
        pytest.skip("no resident-size or page-fault count on this system")
    kept = probe("keep")
    if kept is None:
        pytest.skip("not glibc: the allocator's settings are left alone")
    defaults = probe("defaults")
    assert defaults[0]["kept_mb"] < 50 and defaults[1]["faults"] > 40_000, defaults
    assert kept[0]["kept_mb"] > 150 and kept[1]["faults"] < defaults[1]["faults"] / 2, (kept, defaults)


def test_entry_points_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory_unless_disabled() is False and not calls
    monkeypatch.delenv(allocator.ENV)
    assert allocator.keep_freed_memory_unless_disabled() is True and calls == [1]


def test_a_bad_switch_value_is_an_error_naming_the_variable(monkeypatch, capsys):
    from dln_ens.cli import main
    monkeypatch.setenv(allocator.ENV, "yes")
    assert main(["tasks"]) == 2
    err = capsys.readouterr().err
    assert allocator.ENV in err and "0" in err and "'yes'" in err
