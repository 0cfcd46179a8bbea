"""`dln_ens.allocator`: freed memory stays with the process (glibc), and the entry points' switch."""
import pytest
import torch

from dln_ens import allocator
from dln_ens.bench.score import page_faults


def test_kept_memory_is_reused_without_new_page_faults():
    """After `keep_freed_memory`, a 16 MB tensor allocated, filled and freed over and over takes
    its pages once: the later rounds take (almost) no fresh pages, as glibc's defaults would
    when they hand the block back to the kernel."""
    if not allocator.keep_freed_memory() or page_faults() is None:
        pytest.skip("not glibc on a Unix system: the allocator's settings are left alone")
    assert allocator.kept
    faults = []
    for _ in range(4):
        f0 = page_faults()
        x = torch.empty(4 << 20)   # 16 MB, above glibc's default mmap threshold
        x.fill_(1.0)               # touches every page
        y = torch.empty(2 << 20).fill_(2.0)
        del x, y
        faults.append(page_faults() - f0)
    assert max(faults[2:]) < 64, faults   # 16 MB is 4,096 pages of 4 KB


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
