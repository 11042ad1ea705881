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


def test_quick_run_writes_results_with_confidence_gap(tmp_path, monkeypatch):
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
    # --resampled-only adds the comparison to the existing JSON, on seeds after its own
    seen = {}

    def fake_resampled(results, seeds, epochs):
        seen.update(seeds=seeds, epochs=epochs, models=sorted(results))
        value = dict(ours=0.1, ivon=0.2, diff=-0.1, lo=-0.15, hi=-0.05, p_better=1.0)
        return {"CNN|VariationalNGD-dense|fp32": dict(
            nll=value, ece=dict(value, floor_ours=0.01, floor_ivon=0.01), acc=dict(
                value, diff=0.01), failed_ours=0, failed_ivon=1,
            ece_per_split=dict(mean=-0.01, se=0.01, better=2))}

    monkeypatch.setattr(bd, "resampled", fake_resampled)
    again = bd.main(["--resampled-only", "--resampled", "2", "--out", str(out)])
    assert seen == dict(seeds=[1, 2], epochs=4, models=sorted(result["results"]))
    assert again["results"] == json.loads(json.dumps(result["results"]))
    text = out.with_suffix(".md").read_text()
    assert "## Against IVON on 2 resampled splits (seeds 1-2)" in text and "| 0 / 1 |" in text
    assert "- [x] CNN VariationalNGD-dense fp32, resampled splits 1-2 pooled: ECE < IVON" in text
    # a second comparison is appended on later seeds, the first kept; used seeds are refused
    bd.main(["--resampled-only", "--resampled", "3", "--out", str(out)])
    assert seen["seeds"] == [3, 4, 5]
    kept = json.loads(out.read_text())["resampled"]
    assert [c["seeds"] for c in kept] == [[1, 2], [3, 4, 5]]
    assert "## Against IVON on 3 resampled splits (seeds 3-5)" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match=r"--resampled-first-seed 4: seeds \[4, 5\] were used"):
        bd.main(["--resampled-only", "--resampled", "2", "--resampled-first-seed", "4",
                 "--out", str(out)])
    assert [c["seeds"] for c in json.loads(out.read_text())["resampled"]] == [[1, 2], [3, 4, 5]]
    # --rewrite redraws the tables from the JSON alone
    before = out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    bd.main(["--rewrite", "--out", str(out)])
    assert out.with_suffix(".md").read_text() == before


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


def _random_run(n, seed, sharp=3.0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharp * torch.randn(n, 10, generator=gen, dtype=torch.float64), 1)
    return probs, torch.randint(10, (n,), generator=gen)


def test_pooled_splits_match_calibration_of_the_concatenated_points():
    """Pooling the per-split bin statistics (unit weights) gives what ``calibration`` gives on
    all test points at once; integer weights count a split as often as repeated."""
    import torch

    from structvi.optim import calibration

    runs = [_random_run(n, s) for s, n in enumerate((50, 80, 33))]
    # confidences on bin edges (1.0, 0.2 = 3/15, 0.6 = 9/15) fall in the same bins as there
    edge = torch.zeros(3, 10, dtype=torch.float64)
    edge[0, 2] = 1.0
    edge[1] = 0.8 / 9
    edge[1, 4] = 0.2
    edge[2, :2] = torch.tensor([0.6, 0.4], dtype=torch.float64)
    runs.append((edge, torch.tensor([2, 5, 1])))
    stats = [bd.split_stats(p, y) for p, y in runs]
    got = bd.pooled(stats, torch.ones(4))
    want = calibration(torch.cat([p for p, _ in runs]), torch.cat([y for _, y in runs]))
    for key in ("nll", "ece", "acc"):
        assert float(got[key]) == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    repeated = calibration(torch.cat([runs[0][0], runs[0][0], runs[2][0]]),
                           torch.cat([runs[0][1], runs[0][1], runs[2][1]]))
    batch = bd.pooled(stats, torch.tensor([[2.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert float(batch["ece"][0]) == pytest.approx(repeated["ece"], rel=1e-12)
    assert float(batch["ece"][1]) == pytest.approx(want["ece"], rel=1e-12)


def test_bootstrap_weights_draw_splits_with_replacement():
    import torch

    w = bd.bootstrap_weights(5, 400, torch.Generator().manual_seed(0))
    assert w.shape == (400, 5) and bool((w.sum(1) == 5).all())
    assert bool((w == 0).any()) and 0.8 < float(w.mean(0).min()) <= float(w.mean(0).max()) < 1.2


def test_compare_pooled_intervals_separate_a_real_difference_from_none():
    """Ours sharper and right where IVON is right but overconfident when wrong: the NLL
    difference's interval lies below 0; the same runs against themselves give 0 inside it."""
    import torch

    ivon, ours = [], []
    for s in range(8):
        probs, y = _random_run(200, s, sharp=1.0)
        ivon.append(bd.split_stats(probs, y))
        better = 0.5 * probs + 0.5 * torch.nn.functional.one_hot(y, 10).double()
        ours.append(bd.split_stats(better, y))
    row = bd.compare_pooled(ours, ivon, draws=500)
    assert row["nll"]["hi"] < 0 and row["nll"]["p_better"] == 1.0
    assert row["acc"]["diff"] > 0 and row["acc"]["lo"] > 0
    same = bd.compare_pooled(ivon, ivon, draws=200)
    assert same["ece"]["diff"] == 0 and same["ece"]["lo"] <= 0 <= same["ece"]["hi"]
    assert same["ece"]["p_better"] == 0.0
    with pytest.raises(ValueError, match="as many runs"):
        bd.compare_pooled(ours[:3], ivon, draws=10)


def test_resampled_trains_each_seed_on_its_own_split_and_flags_failed_runs(monkeypatch):
    """``resampled``: seed s trains on ``digits_split(s)``; both methods' test points pooled; a
    run below 50 % test accuracy counts as failed; goals from the pooled intervals."""
    import torch

    calls = []

    def fake_split(seed):
        probs, y = _random_run(40, 100 + seed)
        return {"test": (probs, y)}

    def fake_train(model_name, method, cfg, data, epochs, seed, bf16):
        calls.append((method, seed, bf16))
        return None, method, data, [0.0]

    def fake_probs(model, opt, X, bayes, seed):
        y = fake_split(seed)["test"][1]
        onehot = torch.nn.functional.one_hot(y, 10).double()
        if opt == "IVON" and seed == 5:  # did not train: confidently wrong
            return torch.nn.functional.one_hot((y + 1) % 10, 10).double() * 0.9 + 0.01
        sharp = 0.7 if opt != "IVON" else 0.4
        return sharp * onehot + (1 - sharp) * X

    monkeypatch.setattr(bd, "digits_split", fake_split)
    monkeypatch.setattr(bd, "train", fake_train)
    monkeypatch.setattr(bd, "predictive_probs", fake_probs)
    results = {"MLP": {"IVON": dict(config={}), "VariationalNGD-dense": dict(config={})}}
    rows = bd.resampled(results, [4, 5, 6], epochs=1)
    assert {(m, s) for m, s, _ in calls} == {(m, s) for m in ("IVON", "VariationalNGD-dense")
                                            for s in (4, 5, 6)}
    row = rows["MLP|VariationalNGD-dense|fp32"]
    assert row["failed_ivon"] == 1 and row["failed_ours"] == 0
    assert row["nll"]["diff"] < 0 and row["acc"]["diff"] > 0
    assert len(row["ece_ours_per_split"]) == 3 and 0 < row["ece"]["floor_ours"] < 1
    text = bd.resampled_markdown(rows, [4, 5, 6])
    assert "## Against IVON on 3 resampled splits (seeds 4-6)" in text
    assert "| MLP | VariationalNGD-dense | bf16 |" in text and "| 0 / 1 |" in text
    got = bd.goals({}, [dict(seeds=[4, 5, 6], rows=rows)])
    assert got["MLP VariationalNGD-dense fp32, resampled splits 4-6 pooled: acc >= IVON"]["met"]
