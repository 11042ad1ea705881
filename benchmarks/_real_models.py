"""Eight small real-shaped Pyro models with synthetic data (seeded), for ``real_models.py``.

Each entry of :data:`MODELS` is ``name -> (model, args)``; every model is float64, written the
ordinary Pyro way (the vectorization is detected by ``NaturalGradientSVI``), and has a cached
NUTS reference in ``benchmarks/data/real_models_nuts.json`` (``python -m benchmarks.real_models
--make-reference``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------- 1. non-centred hierarchy
SIGMA_8 = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64)
Y_8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64)


def hierarchical(sigma, y):
    """Eight schools, non-centred: θ_j = μ + τ θ̃_j."""
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_t(5.0)))
    with pyro.plate("schools", y.shape[0]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(_t(0.0), 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


# ---------------------------------------------------------------------- 2. collinear regression
def _collinear_data(n: int = 2000, p: int = 12, seed: int = 1):
    g = _gen(seed)
    base = torch.randn(n, 3, dtype=F64, generator=g)
    mix = torch.randn(3, p, dtype=F64, generator=g)
    X = base @ mix + 0.05 * torch.randn(n, p, dtype=F64, generator=g)
    beta = torch.randn(p, dtype=F64, generator=g)
    return X, X @ beta + torch.randn(n, dtype=F64, generator=g)


X_COL, Y_COL = _collinear_data()


def collinear(x, y):
    """Gaussian regression with strongly correlated predictors (known noise scale 1)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1], dtype=F64), 3.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), 1.0), obs=y)


# ---------------------------------------------------------------------- 3. AR(5)
def _ar_data(T: int = 200, seed: int = 2):
    g = _gen(seed)
    phi = torch.tensor([0.5, -0.2, 0.15, 0.05, -0.1], dtype=F64)
    y = torch.zeros(T + 5, dtype=F64)
    noise = 0.5 * torch.randn(T + 5, dtype=F64, generator=g)
    for t in range(5, T + 5):
        y[t] = (phi * y[t - 5:t].flip(0)).sum() + noise[t]
    lags = torch.stack([y[5 - k:T + 5 - k] for k in range(1, 6)], -1)
    return lags, y[5:]


LAGS, Y_AR = _ar_data()


def ar5(lags, y):
    """``y_t = Σ_k φ_k y_{t−k} + σ ε_t``."""
    phi = pyro.sample("phi", dist.Normal(torch.zeros(5, dtype=F64), 0.5).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(1.0)))
    with pyro.plate("time", y.shape[0]):
        pyro.sample("y", dist.Normal((lags * phi).sum(-1), sigma), obs=y)


# ---------------------------------------------------------------------- 4. GARCH(1,1)
def _garch_data(T: int = 150, seed: int = 3):
    g = _gen(seed)
    omega, alpha, beta = 0.1, 0.2, 0.7
    s2, e_prev, out = omega / (1 - alpha - beta), 0.0, []
    for _ in range(T):
        s2 = omega + alpha * e_prev**2 + beta * s2
        e_prev = math.sqrt(s2) * float(torch.randn((), dtype=F64, generator=g))
        out.append(e_prev)
    return torch.tensor(out, dtype=F64)


Y_GARCH = _garch_data()


def garch(y):
    """``y_t ~ N(μ, σ_t²)``, ``σ_t² = ω + α (y_{t−1} − μ)² + β σ_{t−1}²``."""
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 1.0))
    omega = pyro.sample("omega", dist.LogNormal(_t(-2.0), 1.0))
    alpha = pyro.sample("alpha", dist.Uniform(_t(0.0), 1.0))
    beta = pyro.sample("beta", dist.Uniform(_t(0.0), 1.0))
    e = y - mu
    s2 = [torch.ones_like(omega) * y.var()]
    for t in range(1, y.shape[-1]):
        s2.append(omega + alpha * e[..., t - 1] ** 2 + beta * s2[-1])
    sd = torch.stack(s2, -1).sqrt()
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), sd).to_event(1), obs=y)


# ---------------------------------------------------------------------- 5. latent-GP Poisson
def _gp_data(n: int = 25, seed: int = 4):
    g = _gen(seed)
    x = torch.linspace(0, 10, n, dtype=F64)
    K = torch.exp(-0.5 * (x[:, None] - x[None]) ** 2 / 1.5**2) + 1e-6 * torch.eye(n, dtype=F64)
    L = torch.linalg.cholesky(K)
    f = L @ torch.randn(n, dtype=F64, generator=g)
    return L, torch.poisson(torch.exp(1.0 + f), generator=g)


L_GP, Y_GP = _gp_data()


def gp_poisson(chol, y):
    """``f = L z`` (non-centred GP, fixed kernel), ``y_i ~ Poisson(exp(b + f_i))``."""
    b = pyro.sample("b", dist.Normal(_t(0.0), 2.0))
    z = pyro.sample("z", dist.Normal(torch.zeros(y.shape[0], dtype=F64), 1.0).to_event(1))
    f = z @ chol.T
    pyro.sample("y", dist.Poisson(torch.exp(b.unsqueeze(-1) + f)).to_event(1), obs=y)


# ---------------------------------------------------------------------- 6. varying intercepts
def _vi_data(groups: int = 8, per: int = 6, seed: int = 5):
    g = _gen(seed)
    idx = torch.arange(groups).repeat_interleave(per)
    x = torch.randn(groups * per, dtype=F64, generator=g)
    a = 1.0 + 0.8 * torch.randn(groups, dtype=F64, generator=g)
    return idx, x, a[idx] + 0.5 * x + 0.7 * torch.randn(groups * per, dtype=F64, generator=g)


IDX_VI, X_VI, Y_VI = _vi_data()


def varying_intercept(idx, x, y):
    """Centred varying intercepts ``a_j ~ N(μ_a, σ_a)``, ``y_i ~ N(a_{j[i]} + b x_i, σ)``."""
    groups = int(idx.max()) + 1
    mu_a = pyro.sample("mu_a", dist.Normal(_t(0.0), 5.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(_t(2.0)))
    b = pyro.sample("b", dist.Normal(_t(0.0), 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)))
    with pyro.plate("groups", groups):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(a[..., idx] + b * x, sigma), obs=y)


# ---------------------------------------------------------------------- 7. small-N log-log
X_LL = torch.tensor([1.2, 2.0, 3.1, 4.5, 6.0, 8.2, 11.0, 15.0], dtype=F64)
Y_LL = torch.tensor([2.1, 3.9, 4.2, 7.5, 8.1, 13.0, 14.2, 22.0], dtype=F64)


def loglog(x, y):
    """``log y = a + b log x + σ ε`` with a flat prior on ``σ`` (uniform on (0, 100)), N = 8."""
    a = pyro.sample("a", dist.Normal(_t(0.0), 10.0))
    b = pyro.sample("b", dist.Normal(_t(0.0), 10.0))
    sigma = pyro.sample("sigma", dist.Uniform(_t(0.0), 100.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x.log(), sigma), obs=y.log())


# ---------------------------------------------------------------------- 8. interaction
def _int_data(n: int = 150, seed: int = 6):
    g = _gen(seed)
    x = torch.randn(n, 2, dtype=F64, generator=g) + torch.tensor([1.0, 2.0], dtype=F64)
    y = 0.5 + x[:, 0] - 0.5 * x[:, 1] + 0.3 * x[:, 0] * x[:, 1]
    return x, y + torch.randn(n, dtype=F64, generator=g)


X_INT, Y_INT = _int_data()


def interaction(x, y):
    """``y = c + b₁x₁ + b₂x₂ + b₁₂x₁x₂ + σ ε`` (uncentred predictors: correlated posterior)."""
    c = pyro.sample("c", dist.Normal(_t(0.0), 5.0))
    b = pyro.sample("b", dist.Normal(torch.zeros(3, dtype=F64), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)))
    feats = torch.stack([x[:, 0], x[:, 1], x[:, 0] * x[:, 1]], -1)
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(c + (feats * b).sum(-1), sigma), obs=y)


MODELS = {
    "hierarchical": (hierarchical, (SIGMA_8, Y_8)),
    "collinear": (collinear, (X_COL, Y_COL)),
    "ar5": (ar5, (LAGS, Y_AR)),
    "garch": (garch, (Y_GARCH,)),
    "gp_poisson": (gp_poisson, (L_GP, Y_GP)),
    "varying_intercept": (varying_intercept, (IDX_VI, X_VI, Y_VI)),
    "loglog": (loglog, (X_LL, Y_LL)),
    "interaction": (interaction, (X_INT, Y_INT)),
}
