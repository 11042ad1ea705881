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
            assert -1.0 < e["conf_minus_acc"] < 1.0 and 0.0 < e["ece_floor"] < 1.0
    assert json.loads(out.read_text())["goals"]


def test_grids_are_the_recorded_selection_on_other_seeds():
    """Each Bayesian method's grid: its 6 candidates with the best validation NLL (averaged
    over both models) on seeds 100-102, by the same rule for every method."""
    from pathlib import Path

    record = json.loads((Path(bd.__file__).parent / "results" / "bayesian_digits_grid.json")
                        .read_text())
    assert record["seeds"] == [100, 101, 102]
    sizes = {len(configs) for configs in bd.CANDIDATES.values()}
    assert len(sizes) == 1 and sizes.pop() > bd.GRID_SIZE
    for method, entry in record["methods"].items():
        assert [r["config"] for r in entry["candidates"]] == bd.CANDIDATES[method]
        assert bd.top_grid(entry["candidates"]) == entry["grid"] == bd.METHODS[method][1]


def test_top_grid_ranks_by_nll_averaged_over_models():
    rows = [dict(config=dict(k=k), val_nll=dict(a=a, b=b))
            for k, a, b in [(0, 0.1, 0.5), (1, 0.2, 0.2), (2, 0.05, 0.3), (3, 0.9, 0.0),
                            (4, 0.3, 0.3), (5, 0.1, 0.1), (6, 0.01, 0.01)]]
    assert [c["k"] for c in bd.top_grid(rows)] == [6, 5, 2, 1, 0, 4]


def test_paired_comparison_counts_seeds_where_ours_is_better(monkeypatch):
    """The paired check on more seeds: per seed ours − IVON, its mean and standard error, and
    the count of seeds where ours is better (lower NLL and ECE, higher accuracy)."""
    table = {("IVON", 3): (0.10, 0.02, 0.95, 0.01), ("IVON", 4): (0.20, 0.01, 0.90, 0.01),
             ("VariationalNGD-dense", 3): (0.08, 0.03, 0.96, 0.025),
             ("VariationalNGD-dense", 4): (0.16, 0.005, 0.90, 0.004)}

    def fake_run(model_name, method, cfg, data, epochs, seed, bf16):
        nll, ece, acc, floor = table[method, seed]
        return dict(nll=nll, ece=ece, acc=acc, ece_floor=floor)

    monkeypatch.setattr(bd, "run", fake_run)
    monkeypatch.setattr(bd, "digits_split", lambda: None)
    results = {"MLP": {"IVON": dict(config={}), "VariationalNGD-dense": dict(config={})}}
    rows = bd.paired(results, [3, 4], epochs=1)
    row = rows["MLP|VariationalNGD-dense|fp32"]
    assert row["nll"]["mean"] == pytest.approx(-0.03) and row["nll"]["better"] == 2
    assert row["nll"]["se"] == pytest.approx(0.01)  # stdev of (-0.02, -0.04) / √2
    assert row["ece"]["better"] == 1 and row["acc"]["better"] == 1
    # ECE less its floor: ours 0.005, 0.001 against IVON's 0.01, 0.0: better on seed 3 only
    assert row["ece_excess"]["mean"] == pytest.approx(-0.002)
    assert row["ece_excess"]["better"] == 1
    assert row["acc"]["ours"] == pytest.approx(0.93) and row["acc"]["ivon"] == pytest.approx(0.925)
    assert set(rows) == {f"MLP|VariationalNGD-dense|{p}" for p in ("fp32", "bf16")}
    text = bd.paired_markdown(rows, [3, 4])
    assert "| MLP | VariationalNGD-dense | fp32 | 0.120 / 0.150 | -0.030 ± 0.010 | 2/2 |" in text
