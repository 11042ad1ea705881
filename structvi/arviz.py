r"""ArviZ export and VI diagnostics for :class:`~structvi.pyro.AutoStructuredNormal` fits.

* :func:`to_inference_data` — draws from the fitted ``q`` as ArviZ data with the groups
  ``posterior``, ``posterior_predictive``, ``log_likelihood`` (so ``az.loo`` works) and
  ``observed_data``; the attributes name structvi and the guide's structure.
* :func:`psis_khat` — the Pareto-``k̂`` diagnostic of the fitted ``q`` (Yao et al. 2018,
  "Yes, but did it work?"; Vehtari et al. 2024): fit a generalized Pareto distribution to the
  largest importance ratios ``w_s = p(x, z_s)/q(z_s)``, ``z_s ~ q``. Usual reading: ``k̂ < 0.5``
  q is close to the posterior; ``0.5 ≤ k̂ < 0.7`` importance-weighted estimates are still
  reliable (PSIS fixes them); ``k̂ ≥ 0.7`` q misses part of the posterior and its estimates are
  not to be trusted. The threshold ``0.7`` is for large sample sizes; with ``S`` draws it is
  ``min(1 − 1/log10(S), 0.7)`` (:func:`khat_threshold`).

ArviZ 0.x (what Python 3.11 installs) and 1.x differ: 1.x takes ``from_dict({group: {var:
array}})`` and moved ``psislw`` to arviz-stats. :func:`_from_dict` dispatches on the installed
major version; :func:`pareto_khat` uses ``az.psislw`` where it exists and otherwise our own
generalized-Pareto fit (:func:`gpd_khat`, the same estimator; a test checks they agree).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["gpd_khat", "khat_threshold", "pareto_khat", "psis_khat", "to_inference_data"]


def _arviz():
    import arviz

    return arviz


def _arviz_major() -> int:
    return int(_arviz().__version__.split(".")[0])


# ---------------------------------------------------------------------- Pareto k-hat
def khat_threshold(num_samples: int) -> float:
    """The sample-size-dependent reliability threshold ``min(1 − 1/log10(S), 0.7)``."""
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def gpd_khat(tail: np.ndarray) -> float:
    """Shape ``k̂`` of a generalized Pareto fit to positive exceedances ``tail``.

    The Zhang & Stephens (2009) empirical-Bayes estimator in the parametrization
    ``θ = −k/σ``: for fixed ``θ`` the maximum-likelihood shape is ``k(θ) = mean(log(1 − θx))``
    and the profile log-likelihood ``ℓ(θ) = n(log(−θ/k(θ)) − k(θ) − 1)``; ``θ`` is averaged
    over a grid of ``m = 30 + ⌊√n⌋`` points with weights ``∝ exp ℓ(θ)``, and ``k̂ = k(θ̂)`` is
    shrunk towards ``½`` with the weak prior of Vehtari et al. (2024):
    ``(n k̂ + 10·½)/(n + 10)``.

    Args:
        tail: the exceedances over the cut-off, shape ``(n,)``, ``n ≥ 5``.

    Returns:
        ``k̂`` (larger: heavier tail).

    Raises:
        ValueError: fewer than 5 values.
    """
    x = np.sort(np.asarray(tail, dtype=np.float64))
    n = x.size
    if n < 5:
        raise ValueError(f"gpd_khat needs at least 5 tail values, got {n}")
    m = 30 + int(math.sqrt(n))
    quartile = x[max(int(n / 4 + 0.5) - 1, 0)]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3.0 * quartile)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    loglik = n * (np.log(-theta / k) - k - 1.0)
    w = np.exp(loglik - loglik.max())
    theta_hat = float((theta * w).sum() / w.sum())
    k_hat = float(np.log1p(-theta_hat * x).mean())
    return (n * k_hat + 10 * 0.5) / (n + 10)


def _khat_numpy(log_w: np.ndarray) -> float:
    """``k̂`` of the largest ``M = ⌈min(S/5, 3√S)⌉`` importance ratios (PSIS tail, r_eff = 1)."""
    s = log_w.size
    m = int(math.ceil(min(s / 5.0, 3.0 * math.sqrt(s))))
    srt = np.sort(log_w - log_w.max())
    cutoff = srt[-m - 1]
    tail = np.exp(srt[-m:]) - np.exp(cutoff)
    return gpd_khat(tail)


def pareto_khat(log_weights: np.ndarray | torch.Tensor) -> float:
    """``k̂`` of a vector of log importance ratios (``az.psislw`` if available).

    Args:
        log_weights: ``log p − log q`` at draws from ``q``, shape ``(S,)`` with ``S ≥ 25``.

    Returns:
        The Pareto shape estimate.

    Raises:
        ValueError: not a finite vector of at least 25 values.
    """
    if isinstance(log_weights, torch.Tensor):
        log_weights = log_weights.detach().double().cpu().numpy()
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 1 or lw.size < 25 or not np.isfinite(lw).all():
        raise ValueError(f"log_weights must be a finite vector of at least 25 values, got shape "
                         f"{lw.shape} with {int((~np.isfinite(lw)).sum())} non-finite values")
    az = _arviz()
    if hasattr(az, "psislw"):
        _, k = az.psislw(lw)
        return float(k)
    return _khat_numpy(lw)


# ---------------------------------------------------------------------- draws from the guide
def _plate_nesting(guide: Any) -> int:
    """Number of plate dims around the guide's latent sites (for a batched unpack)."""
    nesting = 0
    for _, site in guide.prototype_trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
    return nesting


def _posterior_draws(guide: Any, num_samples: int, generator: torch.Generator | None):
    """``num_samples`` draws of every latent site, shape ``(S,) + site shape`` (constrained)."""
    with torch.no_grad():
        q = guide.get_posterior()
        U = q.sample((num_samples,), generator=generator)
        nesting = _plate_nesting(guide)
        values, _ = guide.constrain(U.reshape((num_samples,) + (1,) * nesting + U.shape[1:]))
    shapes = {name: site["value"].shape
              for name, site in guide.prototype_trace.iter_stochastic_nodes()}
    return {name: v.reshape((num_samples,) + shapes[name]) for name, v in values.items()}


def _replay_draws(model, draws, args, kwargs, *, predictive: bool):
    """Run the model at each draw: per-observation log-likelihoods, predictive draws, data."""
    import pyro.poutine as poutine

    num = next(iter(draws.values())).shape[0]
    loglik, pred, observed, deterministic = {}, {}, {}, {}
    for s in range(num):
        with torch.no_grad(), poutine.block():
            tr = poutine.trace(poutine.condition(model, {k: v[s] for k, v in draws.items()}))
            trace = tr.get_trace(*args, **kwargs)
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["infer"].get("_deterministic"):
                deterministic.setdefault(name, []).append(site["value"])
            elif site["is_observed"] and name not in draws:
                fn = site["fn"]
                loglik.setdefault(name, []).append(fn.log_prob(site["value"]))
                if predictive:
                    pred.setdefault(name, []).append(fn.sample())
                observed[name] = site["value"]
    stack = {k: torch.stack(v) for k, v in loglik.items()}
    return stack, {k: torch.stack(v) for k, v in pred.items()}, observed, {
        k: torch.stack(v) for k, v in deterministic.items()}


def _numpy_chain(group: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``(S, ...)`` tensors as ``(1 chain, S draws, ...)`` arrays."""
    return {k: v.detach().double().cpu().numpy()[None] for k, v in group.items()}


def _from_dict(groups: dict[str, dict[str, np.ndarray]], **extra: Any):
    """``az.from_dict`` for ArviZ 0.x (groups as keywords) and 1.x (one dict of groups)."""
    az = _arviz()
    params = inspect.signature(az.from_dict).parameters
    extra = {k: v for k, v in extra.items() if v is not None}
    attrs = extra.pop("attrs", {})
    if "attrs" in params:
        extra["attrs"] = dict(attrs)
    if _arviz_major() >= 1:
        data = az.from_dict(groups, **extra)
    else:
        data = az.from_dict(**groups, **extra)
    for name in groups:  # every group carries them (1.x has no top-level attrs argument)
        data[name].attrs.update(attrs)
    return data


def to_inference_data(
    guide: Any,
    model: Callable[..., Any],
    num_samples: int = 1000,
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    posterior_predictive: bool = True,
    coords: dict[str, Any] | None = None,
    dims: dict[str, list[str]] | None = None,
    generator: torch.Generator | None = None,
):
    """Draws from a fitted :class:`~structvi.pyro.AutoStructuredNormal` as ArviZ data.

    The model is run once per draw with the latent sites substituted (pass the full data set,
    not a subsampled plate, so that ``log_likelihood`` has one entry per observation).

    Args:
        guide: the fitted guide.
        model: the Pyro model.
        num_samples: number of draws ``S`` (one chain).
        model_args: model positional arguments.
        model_kwargs: model keyword arguments.
        posterior_predictive: also draw the observed sites at each draw.
        coords: ArviZ coordinates.
        dims: ArviZ dimension names per variable.
        generator: source of the draws from ``q``.

    Returns:
        ``InferenceData`` (ArviZ 0.x) / ``DataTree`` (1.x) with ``posterior`` (latent and
        ``pyro.deterministic`` sites), ``log_likelihood``, ``observed_data`` and, if asked,
        ``posterior_predictive``; attributes ``inference_library="structvi"``, the guide class and
        ``structvi_structure`` (the factor's JSON spec).

    Raises:
        ValueError: ``num_samples`` not an integer ``>= 1``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got num_samples={num_samples!r}")
    kwargs = {} if model_kwargs is None else model_kwargs
    guide.setup(*model_args, **kwargs)
    draws = _posterior_draws(guide, num_samples, generator)
    loglik, pred, observed, deterministic = _replay_draws(
        model, draws, model_args, kwargs, predictive=posterior_predictive)
    groups = {"posterior": _numpy_chain({**draws, **deterministic}),
              "log_likelihood": _numpy_chain(loglik),
              "observed_data": {k: v.detach().double().cpu().numpy() for k, v in observed.items()}}
    if posterior_predictive:
        groups["posterior_predictive"] = _numpy_chain(pred)
    from structvi import __version__ as version

    attrs = {"inference_library": "structvi", "inference_library_version": str(version),
             "guide": type(guide).__name__, "structvi_structure": json.dumps(guide.factor_spec())}
    return _from_dict(groups, coords=coords, dims=dims, attrs=attrs)


def psis_khat(
    guide: Any,
    model: Callable[..., Any],
    num_samples: int = 1000,
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Pareto ``k̂`` of the importance ratios ``log p(x, T(u)) + log|J_T(u)| − log q(u)``.

    ``u_s = μ + K ε_s`` with ``log q(u_s) = −½‖ε_s‖² − log|det K| − (d/2) log 2π`` (no solve).
    Reading (module docstring): ``k̂ < 0.7`` — ``q`` is a reliable posterior approximation.

    Args:
        guide: the fitted :class:`~structvi.pyro.AutoStructuredNormal`.
        model: the Pyro model.
        num_samples: number of draws ``S`` (``≥ 25``; 1000 or more recommended).
        model_args: model positional arguments.
        model_kwargs: model keyword arguments.
        generator: source of the draws.

    Returns:
        ``k̂``.
    """
    from structvi.pyro.svi import latent_log_joint

    kwargs = {} if model_kwargs is None else model_kwargs
    guide.setup(*model_args, **kwargs)
    with torch.no_grad():
        q = guide.get_posterior()
        d = q.dim
        eps = torch.randn(num_samples, d, generator=generator, dtype=q.loc.dtype)
        U = q.loc + q.factor.matmul(eps.T.to(q.factor.dtype)).T.to(q.loc.dtype)
        log_q = -0.5 * eps.double().square().sum(1) - float(q.factor.logabsdet()) \
            - 0.5 * d * math.log(2 * math.pi)
        log_p = latent_log_joint(model, guide, model_args, kwargs)(U).double()
    return pareto_khat((log_p - log_q).cpu().numpy())
