r"""Pareto-smoothed importance sampling (PSIS) of a fitted Gaussian's draws.

A Gaussian ``q`` that maximizes the ELBO is usually narrower than the posterior ``p`` and cannot
follow its skew. Draw ``z_s ~ q`` and weigh each by the importance ratio

.. math:: r_s = \frac{p(x, z_s)}{q(z_s)}, \qquad
          \mathbb E_p[f] \approx \frac{\sum_s \tilde w_s f(z_s)}{\sum_s \tilde w_s},

where ``w̃`` are the ratios with their ``M = ⌈min(S/5, 3√S)⌉`` largest values replaced by the
expected order statistics of a generalized Pareto fit (PSIS, Vehtari et al. 2024). The fitted
shape ``k̂`` is the diagnostic: below ``min(1 − 1/log10 S, 0.7)`` the corrected estimates are
reliable (and closer to the posterior's than ``q``'s), above it they are not, and :func:`psis`
warns.

:func:`psis` works on any ``q`` with a batched ``log_joint`` ``(n, d) → (n,)`` — e.g. a
:class:`~structvi.fit.FitResult`'s ``q`` and the ``log_joint`` it was fitted to;
:meth:`structvi.pyro.AutoStructuredNormal.psis` does the same for a Pyro model. The smoother is
ArviZ's (``arviz.psislw`` in ArviZ 0.x; ``arviz_stats.psislw`` in 1.x); without either, our own
fit (:func:`structvi.arviz.gpd_khat`'s estimator) is used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["PSISResult", "check_num_samples", "draw", "khat_threshold", "psis",
           "smooth_log_weights"]


def check_num_samples(num_samples: object, minimum: int = 1, name: str = "num_samples") -> int:
    """``num_samples`` as an ``int >= minimum``, or a ``ValueError`` naming the fix."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (the number of draws from q), "
                         f"got {name}={num_samples!r}")
    return num_samples


def khat_threshold(num_samples: int) -> float:
    """The sample-size-dependent reliability threshold ``min(1 − 1/log10(S), 0.7)``."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """``(k̂, σ̂)`` of a generalized Pareto fit to sorted positive exceedances (Zhang & Stephens
    2009 profile estimator, ``k̂`` shrunk towards ½ with the weak prior of Vehtari et al.)."""
    n = x.size
    m = 30 + int(math.sqrt(n))
    quartile = x[max(int(n / 4 + 0.5) - 1, 0)]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3.0 * quartile)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    loglik = n * (np.log(-theta / k) - k - 1.0)
    w = np.exp(loglik - loglik.max())
    theta_hat = float((theta * w).sum() / w.sum())
    k_raw = float(np.log1p(-theta_hat * x).mean())
    sigma = -k_raw / theta_hat
    return (n * k_raw + 10 * 0.5) / (n + 10), sigma


def _smooth_numpy(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Our PSIS smoother for one vector (used when ArviZ offers none)."""
    s = log_ratios.size
    m = int(math.ceil(min(s / 5.0, 3.0 * math.sqrt(s))))
    lw = log_ratios - log_ratios.max()
    order = np.argsort(lw)
    cutoff = lw[order[-m - 1]]
    tail = np.exp(lw[order[-m:]]) - np.exp(cutoff)
    k, sigma = _gpd_fit(tail)
    p = (np.arange(1, m + 1) - 0.5) / m
    quantiles = np.exp(cutoff) + (sigma / k * np.expm1(-k * np.log1p(-p)) if abs(k) > 1e-8
                                  else -sigma * np.log1p(-p))
    smoothed = lw.copy()
    smoothed[order[-m:]] = np.log(np.minimum(quantiles, 1.0))  # truncated at the largest ratio
    smoothed -= np.logaddexp.reduce(smoothed)
    return smoothed, float(k)


def smooth_log_weights(log_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray | float]:
    """PSIS-smoothed, normalized log weights and ``k̂`` along the last axis.

    ArviZ 0.x ``arviz.psislw``; ArviZ 1.x ``arviz_stats.psislw``; else our own smoother.

    Args:
        log_ratios: ``(..., S)`` log importance ratios, finite, ``S >= 25``.

    Returns:
        ``(log_weights, khat)`` of shapes ``(..., S)`` and ``(...)`` (a float for a vector).
    """
    lr = np.asarray(log_ratios, dtype=np.float64)
    import arviz

    smoother = getattr(arviz, "psislw", None)
    if smoother is None:
        try:
            from arviz_stats import psislw as smoother  # ArviZ 1.x
        except ImportError:
            smoother = None
    if smoother is not None:
        try:
            lw, k = smoother(lr)
            lw, k = np.asarray(lw, dtype=np.float64), np.asarray(k, dtype=np.float64)
            return lw, float(k) if k.ndim == 0 else k
        except (TypeError, ValueError):  # another signature: use ours
            pass
    flat = lr.reshape(-1, lr.shape[-1])
    out = [_smooth_numpy(row) for row in flat]
    lw = np.stack([o[0] for o in out]).reshape(lr.shape)
    k = np.array([o[1] for o in out]).reshape(lr.shape[:-1])
    return lw, float(k) if k.ndim == 0 else k


class PSISResult(NamedTuple):
    """Draws of ``q`` with their Pareto-smoothed importance weights.

    Attributes:
        draws: the draws ``z_s`` from ``q``, ``(S, d)``.
        log_ratios: raw ``log p(x, z_s) − log q(z_s)``, ``(S,)``.
        log_weights: smoothed, normalized log weights (``logsumexp = 0``), ``(S,)``.
        khat: Pareto ``k̂`` of the ratios.
        threshold: the reliability threshold for ``S`` draws (:func:`khat_threshold`).
    """

    draws: Tensor
    log_ratios: Tensor
    log_weights: Tensor
    khat: float
    threshold: float

    @property
    def reliable(self) -> bool:
        """``k̂`` below the threshold: the corrected estimates can be trusted."""
        return self.khat < self.threshold

    def weights(self) -> Tensor:
        """Normalized smoothed weights ``w̃_s / Σ w̃``."""
        return self.log_weights.exp()

    def ess(self) -> float:
        """Importance-sampling effective sample size ``1 / Σ w̃²``."""
        return float(1.0 / self.weights().square().sum())

    def mean(self, values: Tensor | None = None) -> Tensor:
        """Weighted mean of ``values`` (``(S, ...)``; default the draws)."""
        values = self.draws if values is None else values
        w = self.weights().to(values.dtype).reshape((-1,) + (1,) * (values.dim() - 1))
        return (w * values).sum(0)

    def std(self, values: Tensor | None = None) -> Tensor:
        """Weighted standard deviation of ``values`` (``(S, ...)``; default the draws)."""
        values = self.draws if values is None else values
        w = self.weights().to(values.dtype).reshape((-1,) + (1,) * (values.dim() - 1))
        mean = (w * values).sum(0)
        return (w * (values - mean).square()).sum(0).clamp_min(0).sqrt()

    def resample(self, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Indices of ``num_samples`` draws resampled with probability ``w̃`` (with
        replacement; default ``S``): ``draws[idx]`` is approximately a posterior sample."""
        num = self.draws.shape[0] if num_samples is None else check_num_samples(num_samples)
        return torch.multinomial(self.weights().float(), num, replacement=True,
                                 generator=generator)


def psis_from_ratios(draws: Tensor, log_ratios: Tensor, *, warn: bool = True) -> PSISResult:
    """:class:`PSISResult` from draws and their raw log ratios (warns when ``k̂`` is high).

    Raises:
        ValueError: fewer than 25 draws or non-finite ratios.
    """
    lr = log_ratios.detach().double().cpu().numpy()
    if lr.ndim != 1 or lr.size < 25 or not np.isfinite(lr).all():
        raise ValueError(f"PSIS needs a finite vector of at least 25 log ratios, got shape "
                         f"{lr.shape} with {int((~np.isfinite(lr)).sum())} non-finite values")
    lw, k = smooth_log_weights(lr)
    threshold = khat_threshold(lr.size)
    if warn and k >= threshold:
        warnings.warn(f"Pareto k-hat = {k:.2f} >= {threshold:.2f}: q misses part of the posterior "
                      f"and importance-corrected estimates are not reliable (a richer structure, "
                      f"more steps, or MCMC)", UserWarning, stacklevel=3)
    return PSISResult(draws, log_ratios.detach(), torch.as_tensor(lw, device=log_ratios.device),
                      float(k), threshold)


def draw(q, num_samples: int, *, generator: torch.Generator | None = None
         ) -> tuple[Tensor, Tensor]:
    """``num_samples`` draws ``u_s = μ + K ε_s`` of ``q`` and their ``log q(u_s)`` (no solve).

    ``log q(u_s) = −½‖ε_s‖² − log|det K| − (d/2) log 2π``; the draws are those of
    ``q.sample((num_samples,), generator=generator)`` (the same ``ε``).

    Returns:
        ``(U, log_q)`` of shapes ``(S, d)`` and ``(S,)`` (``log_q`` in float64).
    """
    with torch.no_grad():
        eps = torch.randn(num_samples, q.dim, generator=generator, dtype=q.loc.dtype,
                          device=q.loc.device)
        U = q.loc + q.factor.matmul(eps.T.to(q.factor.dtype)).T.to(q.loc.dtype)
        log_q = (-0.5 * eps.double().square().sum(1) - float(q.factor.logabsdet())
                 - 0.5 * q.dim * math.log(2 * math.pi))
    return U, log_q


def psis(q, log_joint: Callable[[Tensor], Tensor], num_samples: int = 1000, *,
         generator: torch.Generator | None = None, warn: bool = True) -> PSISResult:
    """Pareto-smoothed importance weights of ``num_samples`` draws of ``q`` (module docstring).

    Args:
        q: a :class:`~structvi.gaussian.StructuredGaussian` (e.g. ``FitResult.q``).
        log_joint: ``log p(x, z)`` for a batch of points, ``(n, d) → (n,)``.
        num_samples: number of draws ``S`` (an integer ``>= 25``; 1000 or more recommended).
        generator: source of the draws.
        warn: warn when ``k̂`` exceeds the threshold.

    Returns:
        The :class:`PSISResult` (``draws`` in ``q``'s space).

    Raises:
        ValueError: a bad ``num_samples`` or non-finite log densities.
    """
    check_num_samples(num_samples, 25)
    U, log_q = draw(q, num_samples, generator=generator)
    with torch.no_grad():
        log_p = log_joint(U).double()
    return psis_from_ratios(U, log_p - log_q, warn=warn)
