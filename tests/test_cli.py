"""The command line: `structvi demo --quick` runs the bundled examples; bad names are reported."""

from __future__ import annotations

import pytest

from structvi import cli


def test_demo_quick_runs_every_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write their outputs under the working directory
    cli.main(["demo", "--quick"])
    out = capsys.readouterr().out
    for script in cli.DEMOS:
        assert f"=== {script} ===" in out


def test_unknown_benchmark_is_named():
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        cli.main(["bench", "nope"])
