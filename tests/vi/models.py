"""Models on which the VI step goes wrong without a step rule (issue: "never go wrong silently").

Each builder returns a ``log_joint`` mapping ``(n, d) → (n,)`` (float64 unless a dtype is
given), seeded synthetic data, and the dimension. They are shared by the regression tests in
``tests/vi`` and by ``benchmarks/fault_sweep.py``.

* :func:`poisson_regression`: ``y_i ~ Poisson(exp(a x_i + b))``, prior ``N(0, I)``, d = 2. From
  ``(−3, −3)`` the local quadratic model of the mean step is far too flat.
* :func:`garch`: a GARCH(1,1) volatility model on bounded parameters (``ω > 0``,
  ``α, β ≥ 0``, ``α + β < 1``) through an unconstrained map, d = 3; samples far out overflow.
* :func:`latent_gp_poisson`: Poisson counts with a latent GP, ``f = L(α, ρ) f̃`` (non-centred),
  d = 2 + 11 = 13; ``exp(f)`` overflows where ``α`` is large.
* :func:`cauchy`: independent standard Cauchy coordinates (heavy tails, indefinite Hessian).
* :func:`stiff_gaussian`: a Gaussian with condition number ``cond``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

F64 = torch.float64
LogJoint = Callable[[Tensor], Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def poisson_regression(n: int = 100, seed: int = 0) -> tuple[LogJoint, int]:
    """``y ~ Poisson(exp(a x + b))`` with ``x ~ N(0, 1)``, ``(a, b) = (1.5, 1)``, prior ``N(0, I)``."""
    gen = _gen(seed)
    x = torch.randn(n, generator=gen, dtype=F64)
    y = torch.poisson(torch.exp(1.5 * x + 1.0), generator=gen)
    const = torch.lgamma(y + 1).sum()

    def log_joint(Z: Tensor) -> Tensor:
        f = Z[:, :1] * x.to(Z.dtype) + Z[:, 1:2]
        loglik = (y.to(Z.dtype) * f - torch.exp(f)).sum(-1) - const.to(Z.dtype)
        return loglik - 0.5 * Z.square().sum(-1)

    return log_joint, 2


def garch(T: int = 150, seed: int = 0) -> tuple[LogJoint, int]:
    """GARCH(1,1) returns ``r_t ~ N(0, σ_t²)``, ``σ_t² = ω + α r_{t−1}² + β σ_{t−1}²``.

    Unconstrained ``z``: ``ω = exp(z_0)``, ``α = σ(z_1)``, ``β = σ(z_2)``, prior ``N(0, I)`` on
    ``z``, the recursion started at the stationary variance ``ω / (1 − α − β)`` — as a user
    writes it: where ``α + β > 1`` that is negative and the log-likelihood is NaN. Data from
    ``ω = 0.1, α = 0.15, β = 0.8``, near the boundary.
    """
    gen = _gen(seed)
    omega, alpha, beta = 0.1, 0.15, 0.8
    r = torch.zeros(T, dtype=F64)
    var = omega / (1 - alpha - beta)
    for t in range(T):
        r[t] = math.sqrt(var) * torch.randn((), generator=gen, dtype=F64)
        var = omega + alpha * r[t] ** 2 + beta * var
    r2 = r.square()

    def log_joint(Z: Tensor) -> Tensor:
        om, a, b = torch.exp(Z[:, 0]), torch.sigmoid(Z[:, 1]), torch.sigmoid(Z[:, 2])
        rr = r2.to(Z.dtype)
        var = om / (1 - a - b)  # stationary start: negative (log → NaN) when α + β > 1
        ll = torch.zeros_like(om)
        for t in range(T):
            ll = ll - 0.5 * (torch.log(2 * math.pi * var) + rr[t] / var)
            var = om + a * rr[t] + b * var
        return ll - 0.5 * Z.square().sum(-1)

    return log_joint, 3


def latent_gp_poisson(n: int = 11, seed: int = 0) -> tuple[LogJoint, int]:
    """Poisson counts ``y_i ~ Poisson(exp(f_i))`` on a grid with ``f = L(α, ρ) f̃``.

    ``L`` is the Cholesky factor of ``α² exp(−(x−x')²/(2ρ²)) + 10⁻⁶ I`` (inside the model: the
    user's model, not the VI method), ``z = (log α, log ρ, f̃)`` with prior ``N(0, I)``.
    """
    gen = _gen(seed)
    x = torch.linspace(0.0, 1.0, n, dtype=F64)
    f_true = 2.5 * torch.sin(6 * x) + 2.0
    y = torch.poisson(torch.exp(f_true), generator=gen)
    const = torch.lgamma(y + 1).sum()
    sq = (x[:, None] - x[None, :]).square()

    def log_joint(Z: Tensor) -> Tensor:
        dt = Z.dtype
        alpha, rho = torch.exp(Z[:, 0]), torch.exp(Z[:, 1])
        cov = alpha[:, None, None] ** 2 * torch.exp(-sq.to(dt) / (2 * rho[:, None, None] ** 2))
        cov = cov + 1e-6 * torch.eye(n, dtype=dt)
        L, _ = torch.linalg.cholesky_ex(cov)
        f = (L @ Z[:, 2:, None])[..., 0]
        loglik = (y.to(dt) * f - torch.exp(f)).sum(-1) - const.to(dt)
        return loglik - 0.5 * Z.square().sum(-1)

    return log_joint, n + 2


def cauchy(d: int = 2) -> tuple[LogJoint, int]:
    """Independent standard Cauchy coordinates: ``−Σ log(1 + z_j²)`` (+ const)."""

    def log_joint(Z: Tensor) -> Tensor:
        return -torch.log1p(Z.square()).sum(-1)

    return log_joint, d


def stiff_gaussian(
    d: int = 6, cond: float = 1e4, seed: int = 0, dtype: torch.dtype = F64
) -> tuple[LogJoint, Tensor, Tensor]:
    """``N(m, Λ⁻¹)`` with eigenvalues of ``Λ`` log-spaced in ``[1, cond]`` and a random basis.

    Returns:
        ``(log_joint, m, Λ)`` with ``m`` and ``Λ`` in float64; ``log_joint`` computes in ``Z``'s
        dtype.
    """
    gen = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    eig = torch.logspace(0, math.log10(cond), d, dtype=F64)
    Lam = Q @ torch.diag(eig) @ Q.T
    m = torch.randn(d, generator=gen, dtype=F64)

    def log_joint(Z: Tensor) -> Tensor:
        D = Z - m.to(Z.dtype)
        return -0.5 * ((D @ Lam.to(Z.dtype)) * D).sum(-1)

    return log_joint, m, Lam
