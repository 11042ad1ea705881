"""Every example saves its figure into its --out directory (few steps each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eight_schools_saves_marginals_against_nuts(tmp_path):
    out = load("eight_schools").main(steps=20, draws=200, verbose=False, out_dir=tmp_path / "o",
                                     nuts_samples=30, nuts_warmup=20)
    assert out["png"] == tmp_path / "o" / "eight_schools.png"
    assert out["png"].read_bytes()[:8] == PNG


def test_eight_schools_without_out_dir_skips_nuts():
    assert load("eight_schools").main(steps=5, draws=48, verbose=False)["png"] is None


def test_train_digits_saves_training_curves(tmp_path, capsys):
    pytest.importorskip("sklearn")
    accuracy = load("train_digits").main(["--epochs", "1", "--out", str(tmp_path)])
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "train_digits.png").read_bytes()[:8] == PNG
    assert f"saved {tmp_path / 'train_digits.png'}" in capsys.readouterr().out


def test_logistic_regression_script_saves_into_out(tmp_path):
    example = load("logistic_regression")
    args = example._parse_args(["--out", str(tmp_path / "x"), "--steps", "5"])
    example.main(steps=args.steps, out_dir=args.out_dir, progress=False)
    assert (tmp_path / "x" / "logistic_regression.png").read_bytes()[:8] == PNG
