"""``examples/bayesian_digits.py`` runs end to end (a few steps) and writes its diagram."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
EXAMPLE = Path(__file__).parents[2] / "examples" / "bayesian_digits.py"


def test_bayesian_digits_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bayesian_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "reliability.png"
    results = module.main(["--steps", "60", "--samples", "4", "--models", "MLP", "--out",
                           str(out)])
    assert out.stat().st_size > 10_000
    for rows in results.values():
        assert {"AdamW", "StructuredNGD", "VariationalNGD"} <= set(rows)
        for r in rows.values():
            assert 0.0 <= r["ece"] <= 1.0 and r["nll"] > 0
        assert rows["VariationalNGD"]["nll"] < math.log(10) - 0.02  # below chance level
