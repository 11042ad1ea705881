"""Shared fault scenarios of the robustness tests (a small regression, seeded)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import SINGD_RULES


def regression(seed: int = 0, n: int = 512, d: int = 8) -> tuple[Tensor, Tensor]:
    """``y = sin(x·w) + noise``: a smooth target an MLP fits to MSE ≈ 0.5 in 40 steps."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 1, generator=gen)
    return X, torch.sin(X @ w) + 0.1 * torch.randn(n, 1, generator=gen)


def regression_net(seed: int = 0, d: int = 8, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 1))


def ngd(net: nn.Module, **options) -> torch.optim.Optimizer:
    """The published INGD/SINGD update (no normalization) at a large step size."""
    return StructuredNGD(net, **{"lr": 0.05, **SINGD_RULES, **options})


def ngd_default(net: nn.Module, **options) -> torch.optim.Optimizer:
    """The defaults (normalized step, relative damping)."""
    return StructuredNGD(net, **options)


def adamw(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=1e-2)


def run(make: Callable[[nn.Module], torch.optim.Optimizer], *, spike: float | None = None,
        at: int = 40, steps: int = 80, clip: float | None = None, nan_at: int | None = None,
        seed: int = 0, batch: int = 32) -> list[float]:
    """Full-data MSE after each step; the loss of step ``at`` is multiplied by ``spike``."""
    X, y = regression(seed)
    net = regression_net(seed)
    opt = make(net)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    for t in range(steps):
        idx = torch.randint(0, X.shape[0], (batch,), generator=gen)
        loss = nn.functional.mse_loss(net(X[idx]), y[idx])
        if spike is not None and t == at:
            loss = loss * spike
        if nan_at is not None and t == nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        with torch.no_grad():
            history.append(nn.functional.mse_loss(net(X), y).item())
    return history
