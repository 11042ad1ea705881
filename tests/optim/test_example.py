"""``examples/train_digits.py`` runs (one short epoch per structure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).parents[2] / "examples" / "train_digits.py"


@pytest.mark.parametrize("args", [["--structure", "hierarchical", "--bf16"],
                                  ["--structure", "diagonal"]],
                         ids=["hierarchical-bf16", "diagonal"])
def test_train_digits_example_runs(args):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(["--epochs", "3", *args])  # the default lr
    assert 0.5 < accuracy <= 1.0
