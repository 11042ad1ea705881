"""``benchmarks/bayesian_digits.py``: equal grids, IVON's temperature, a quick end-to-end run."""

from __future__ import annotations

import json

import pytest
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
ivon = pytest.importorskip("ivon")

from benchmarks import bayesian_digits as bd  # noqa: E402


def test_bayesian_methods_get_equally_sized_grids():
    sizes = {name: len(configs) for name, (_, configs, bayes) in bd.METHODS.items() if bayes}
    assert set(sizes) == {"IVON", "VariationalNGD-dense", "VariationalNGD-diagonal"}
    assert len(set(sizes.values())) == 1 and sizes["IVON"] >= 6
    for name, (_, configs, _) in bd.METHODS.items():
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs), name


def test_ivon_temperature_sets_the_effective_sample_size():
    model = nn.Linear(3, 2)
    opt = bd._ivon(model, dict(lr=0.5, temperature=0.25, hess_init=0.3), 1200)
    group = opt.param_groups[0]
    assert group["ess"] == pytest.approx(4800) and group["hess_init"] == 0.3
    assert bd._ivon(model, dict(lr=0.5), 1200).param_groups[0]["ess"] == 1200


def test_quick_run_writes_results_with_confidence_gap(tmp_path):
    out = tmp_path / "bayesian_digits.json"
    result = bd.main(["--quick", "--methods", "IVON", "VariationalNGD-dense", "--out", str(out)])
    table = out.with_suffix(".md").read_text()
    assert "conf − acc" in table and out.with_suffix(".png").stat().st_size > 10_000
    for methods in result["results"].values():
        entry = methods["VariationalNGD-dense"]
        assert entry["config"] == bd.METHODS["VariationalNGD-dense"][1][0]
        for precision in ("fp32", "bf16"):
            e = entry[precision]
            assert 0.0 < e["acc"] <= 1.0 and 0.0 <= e["ece"] <= 1.0
            assert -1.0 < e["conf_minus_acc"] < 1.0
    assert json.loads(out.read_text())["goals"]
