"""``structvi.optim.ece_floor``: the ECE of a calibrated predictor at finite sample size."""

from __future__ import annotations

import pytest
import torch

from structvi.optim import calibration, ece_floor


def _probs(n: int, sharpness: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, 4, generator=gen), -1)


def test_floor_is_the_mean_ece_against_labels_drawn_from_the_predictions():
    probs = _probs(400, 3.0)
    floor = ece_floor(probs, draws=50, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    by_hand = sum(calibration(probs, torch.multinomial(probs.double(), 1, generator=gen)[:, 0])
                  ["ece"] for _ in range(50)) / 50
    assert floor == pytest.approx(by_hand, rel=1e-12)


def test_floor_shrinks_with_more_points_and_grows_with_middling_confidence():
    small = ece_floor(_probs(100, 3.0), draws=100, generator=torch.Generator().manual_seed(0))
    large = ece_floor(_probs(3000, 3.0), draws=100, generator=torch.Generator().manual_seed(0))
    assert large < 0.5 * small  # roughly 1/sqrt(n)
    sharp = ece_floor(_probs(400, 8.0), draws=100, generator=torch.Generator().manual_seed(0))
    soft = ece_floor(_probs(400, 1.5), draws=100, generator=torch.Generator().manual_seed(0))
    assert sharp < soft


def test_miscalibrated_labels_are_well_above_the_floor():
    probs = _probs(400, 3.0)
    floor = ece_floor(probs, draws=100, generator=torch.Generator().manual_seed(0))
    flatter = torch.softmax(torch.log(probs) / 3, -1)  # the truth is much less certain
    labels = torch.multinomial(flatter, 1, generator=torch.Generator().manual_seed(2))[:, 0]
    assert calibration(probs, labels)["ece"] > 3 * floor


@pytest.mark.parametrize("bad, match", [
    (torch.ones(3), "probs must be"), (torch.full((2, 3), float("nan")), "finite"),
    (-torch.ones(2, 3), "non-negative"), (torch.zeros(2, 3), "positive sum")])
def test_bad_probabilities_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ece_floor(bad)


def test_bad_draws_are_named():
    with pytest.raises(ValueError, match="draws=0"):
        ece_floor(_probs(10, 1.0), draws=0)
