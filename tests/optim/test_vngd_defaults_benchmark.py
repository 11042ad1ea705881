"""``benchmarks/vngd_defaults.py``: the spike count and a quick end-to-end run."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("ivon")

from benchmarks import vngd_defaults as vd  # noqa: E402


def test_spikes_count_epochs_over_three_times_the_best_before():
    calm = [2.0, 1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.09]
    assert vd.spikes(calm) == 0
    # 0.4 > 3 × 0.1 after the fifth epoch; 0.04 would be a spike but is under 0.05
    assert vd.spikes(calm[:7] + [0.4, 0.09]) == 1
    assert vd.spikes([1.0, 0.5, 0.1, 0.01, 0.005, 0.004, 0.04]) == 0
    assert vd.spikes(calm[:6] + [math.nan, math.inf]) == 2
    assert vd.spikes([5.0, 4.0, 3.0]) == 0  # nothing after the fifth epoch


def test_quick_run_reports_every_method(tmp_path):
    out = tmp_path / "vngd_defaults.json"
    results = vd.main(["--quick", "--out", str(out)])
    text = out.with_suffix(".md").read_text()
    for model_name, methods in results.items():
        assert set(methods) == set(vd.METHODS)
        for method, entry in methods.items():
            assert len(entry["runs"]) == 2 and len(entry["spikes"]) == 2
            assert f"| {model_name} (6 ep) | {method} |" in text
            assert 0.0 <= entry["acc"] <= 1.0
