"""The VI example runs end to end with few steps (it is what `make demo` runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "logistic_regression.py"


def load_example():
    spec = importlib.util.spec_from_file_location("logistic_regression_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_logistic_regression_example(tmp_path, capsys):
    example = load_example()
    out = tmp_path / "nested" / "out"
    rows = example.main(steps=15, out_dir=out, progress=False)
    printed = capsys.readouterr().out
    assert [r["structure"] for r in rows] == ["dense", "low_rank_diagonal (rank=4)", "diagonal"]
    assert all(r["steps"] == 15 and r["seconds"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["elbo"])) for r in rows)
    assert "| structure | ELBO | time (s) | steps |" in printed and "| dense |" in printed
    png = out / "logistic_regression.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_mode_for_structvi_demo(tmp_path):
    rows = load_example().main(steps=500, out_dir=tmp_path, progress=False, quick=True)
    assert all(r["steps"] == 30 for r in rows)


def test_example_command_line_defaults():
    example = load_example()
    args = example._parse_args(["--steps", "7", "--no-progress"])
    assert args.steps == 7 and args.out_dir == "examples/out" and args.no_progress
    assert example._parse_args(["--out", "figs"]).out_dir == "figs"
    assert example._parse_args(["--out-dir", "old"]).out_dir == "old"  # the former name


def test_example_uses_the_bundled_data():
    from structvi.data import load_breast_cancer

    X, y = load_example().load_data()
    X_ref, y_ref = load_breast_cancer()
    assert X.shape == (569, 31) and (X == X_ref).all() and (y == y_ref).all()
    assert abs(float(X[:, :30].mean())) < 1e-12 and (X[:, 30] == 1).all()
