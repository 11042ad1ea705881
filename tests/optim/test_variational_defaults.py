"""VariationalNGD's defaults train a small network at a constant learning rate.

With ``extra_damping = 0`` (the former default) the factor damping is the prior's
``λ = τδ/N ~ 1e-3``: in directions of low curvature the posterior is the prior ``N(0, 1/δ)``
(draws of standard deviation 1 on every weight) and the natural-gradient step is ``lr/λ``. On
the digits MLP at the default ``lr = 3e-3`` the training loss then spikes and stalls (median
final loss 0.64 and one run at 164 over 6 seeds and 60 epochs; IVON's defaults reach 0.004).
The default ``extra_damping = 1e-2`` bounds both (``python -m benchmarks.vngd_defaults``).
This test fails with ``extra_damping = 0`` (final training loss 0.50 on seed 0).
"""

from __future__ import annotations

import torch
from torch import nn

from structvi.data import load_digits
from structvi.optim import VariationalNGD, calibration, predict


def _train_defaults(seed: int, epochs: int = 25) -> tuple[list[float], float]:
    X, y = load_digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = VariationalNGD(model, data_size=len(train))  # every default, constant lr
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in train[torch.randperm(len(train), generator=gen)].split(64):
            opt.zero_grad()
            with opt.sampled_params(train=True, generator=gen):
                loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(train))
    probs = predict(model, opt, X[test], samples=8, generator=torch.Generator().manual_seed(1))
    return losses, calibration(probs, y[test])["acc"]


def test_defaults_train_the_digits_mlp_at_a_constant_learning_rate():
    for seed in range(3):
        losses, acc = _train_defaults(seed)
        assert all(torch.isfinite(torch.tensor(losses))), (seed, losses)
        assert losses[-1] < 0.15, (seed, losses)
        # no spike: no epoch after the fifth at three times the best loss before it
        assert all(losses[i] < 3 * min(losses[:i]) for i in range(5, len(losses))), (seed, losses)
        assert acc > 0.95, (seed, acc)
