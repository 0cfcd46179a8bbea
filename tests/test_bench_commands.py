"""Every `python -m dln_ens.bench` command imports and answers --help (a benchmark that no
longer imports fails here, not when someone needs its figures)."""
from __future__ import annotations

import importlib

import pytest

from dln_ens.bench.__main__ import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bench_command_imports_and_parses_help(name, capsys):
    module = importlib.import_module(COMMANDS[name])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
