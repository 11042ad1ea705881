"""Problems, exact KLs and family optima shared by the VI benchmarks (float64 throughout).

* ``diabetes``: scikit-learn's diabetes regression, standardized, bias column (d = 11), prior
  ``N(0, I)``, noise variance fixed at the least-squares estimate.
* ``synthetic``: linear regression with correlated Gaussian features, d = 200, n = 1000, σ = 1.
* ``breast_cancer``: logistic regression on scikit-learn's breast-cancer data, standardized, bias
  column (d = 31), prior ``N(0, I)``.

Every distribution is compared as a dense ``(mean, covariance)`` pair: ``kl_to_exact`` gives the
exact ``KL(q‖p)`` for the conjugate problems, ``CommonELBO`` an ELBO estimate with one fixed set
of standard-normal draws for every method (common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


@dataclass
class Problem:
    """A Bayesian regression with prior ``N(0, I)``.

    Attributes:
        name: short name.
        kind: ``"linear"`` (exact posterior known) or ``"logistic"``.
        loglik: ``log p(y | w)`` for a batch of weights ``(n, d) → (n,)``.
        mean: exact posterior mean (linear) or ``None``.
        precision: exact posterior precision (linear) or ``None``.
    """

    name: str
    kind: str
    loglik: Callable[[Tensor], Tensor]
    dim: int
    mean: Tensor | None = None
    precision: Tensor | None = None

    def log_joint(self, W: Tensor) -> Tensor:
        """``log p(y | w) + log N(w; 0, I)`` up to a constant, ``(n, d) → (n,)``."""
        return self.loglik(W) - 0.5 * W.square().sum(-1)


def _standardize(X: Tensor) -> Tensor:
    X = (X - X.mean(0)) / X.std(0)
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)


def _linear(name: str, X: Tensor, y: Tensor, sigma2: float) -> Problem:
    precision = X.T @ X / sigma2 + torch.eye(X.shape[1], dtype=F64)
    mean = torch.linalg.solve(precision, X.T @ y / sigma2)

    def loglik(W: Tensor) -> Tensor:
        return -0.5 * (y - W @ X.T).square().sum(-1) / sigma2

    return Problem(name, "linear", loglik, X.shape[1], mean, precision)


def diabetes() -> Problem:
    """Diabetes regression, d = 11, σ² from least squares."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = _standardize(torch.as_tensor(X, dtype=F64)), torch.as_tensor(y, dtype=F64)
    y = (y - y.mean()) / y.std()
    w = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    sigma2 = float((y - X @ w).square().sum() / (X.shape[0] - X.shape[1]))
    return _linear("diabetes (d=11)", X, y, sigma2)


def synthetic(dim: int = 200, n: int = 1000, seed: int = 0) -> Problem:
    """Correlated features ``x = (½I + L) g``, ``L`` random ``N(0, 1/d)``; σ = 1."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(dim, dim, generator=gen, dtype=F64) / dim**0.5
    mix = 0.5 * torch.eye(dim, dtype=F64) + noise
    X = torch.randn(n, dim, generator=gen, dtype=F64) @ mix
    w = torch.randn(dim, generator=gen, dtype=F64) / dim**0.5
    y = X @ w + torch.randn(n, generator=gen, dtype=F64)
    return _linear(f"synthetic (d={dim})", X, y, 1.0)


def breast_cancer() -> Problem:
    """Logistic regression on breast cancer, d = 31."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X, y = _standardize(torch.as_tensor(X, dtype=F64)), torch.as_tensor(y, dtype=F64)

    def loglik(W: Tensor) -> Tensor:
        logits = W @ X.T
        return (y * logits - torch.nn.functional.softplus(logits)).sum(-1)

    return Problem("breast cancer (d=31)", "logistic", loglik, X.shape[1])


# ---------------------------------------------------------------------- metrics
def kl_to_exact(problem: Problem, mean: Tensor, cov: Tensor) -> float:
    """``KL(N(mean, cov) ‖ exact posterior)`` (dense, float64)."""
    Lam, m = problem.precision, problem.mean
    diff = mean.to(F64) - m
    cov = cov.to(F64)
    logdet_cov = 2 * torch.linalg.cholesky(cov).diagonal().log().sum()
    logdet_lam = 2 * torch.linalg.cholesky(Lam).diagonal().log().sum()
    value = 0.5 * ((Lam * cov).sum() + diff @ Lam @ diff - problem.dim - logdet_cov - logdet_lam)
    return float(value)


class CommonELBO:
    """ELBO estimates with one fixed set of antithetic draws shared by every method."""

    def __init__(self, problem: Problem, num_samples: int = 2048, seed: int = 12345) -> None:
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(num_samples // 2, problem.dim, generator=gen, dtype=F64)
        self.eps = torch.cat([eps, -eps])
        self.problem = problem

    def __call__(self, mean: Tensor, cov: Tensor) -> float:
        L = torch.linalg.cholesky(cov.to(F64))
        with torch.no_grad():
            Z = mean.to(F64) + self.eps @ L.T
            energy = self.problem.log_joint(Z).mean()
        entropy = 0.5 * self.problem.dim * (1 + math.log(2 * math.pi)) + L.diagonal().log().sum()
        return float(energy + entropy)


# ---------------------------------------------------------------------- family optima
def mean_field_floor(problem: Problem) -> float:
    """Smallest KL over diagonal covariances: ``Σ = diag(Λ)^{-1}``, exact mean (closed form)."""
    return kl_to_exact(problem, problem.mean, torch.diag(1 / problem.precision.diagonal()))


def lowrank_cov_floor(problem: Problem, rank: int, iters: int = 300) -> float:
    """Smallest KL over ``Σ = W Wᵀ + diag(exp(s))`` (Pyro's low-rank guide) by L-BFGS.

    The mean is the exact one (the KL separates); the covariance part is minimized from the
    mean-field optimum plus a small random ``W``.
    """
    Lam, d = problem.precision, problem.dim
    gen = torch.Generator().manual_seed(0)
    W = (1e-3 * torch.randn(d, rank, generator=gen, dtype=F64)).requires_grad_(True)
    s = (-problem.precision.diagonal().log()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, s], max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        cov = W @ W.T + torch.diag(s.exp())
        logdet = 2 * torch.linalg.cholesky(cov).diagonal().log().sum()
        loss = 0.5 * ((Lam * cov).sum() - logdet)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return kl_to_exact(problem, problem.mean, W @ W.T + torch.diag(s.exp()))


def structure_floor(problem: Problem, structure: str, iters: int = 500, **options) -> float:
    """Smallest KL over ``Σ = K Kᵀ`` with ``K`` in a structvi structure, by L-BFGS.

    Minimizes ``½ tr(Λ K Kᵀ) − log|det K|`` over the structure's stored tensors (autograd through
    ``to_dense`` and ``logabsdet``; a reference computation, not library code) from ``K`` with
    ``diag(K) = diag(Λ)^{-1/2}``; the mean is the exact one.
    """
    from structvi.structures import make_structure, structure_from_spec

    Lam = problem.precision
    start = make_structure(structure, problem.dim, dtype=F64, **options)
    start = start.scale(1.0).retract(start.project(torch.diag(-0.5 * Lam.diagonal().log())),
                                     "expm")
    tensors = {k: t.detach().clone().requires_grad_(True) for k, t in start.tensors().items()}
    spec = start.spec()
    opt = torch.optim.LBFGS(list(tensors.values()), max_iter=iters, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        K = structure_from_spec(tensors, spec)
        A = K.to_dense()
        loss = 0.5 * (Lam * (A @ A.T)).sum() - K.logabsdet()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        A = structure_from_spec(tensors, spec).to_dense()
        return kl_to_exact(problem, problem.mean, A @ A.T)
