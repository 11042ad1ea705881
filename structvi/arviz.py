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
array}})`` and moved ``psislw`` to arviz-stats. On 0.x the export assembles the
``InferenceData`` directly (:mod:`structvi._idata`, the layout of ``az.from_dict`` at a fraction
of its cost); on 1.x :func:`_from_dict` calls ArviZ's own converter. :func:`pareto_khat` uses
``az.psislw`` where it exists and otherwise our own generalized-Pareto fit (:func:`gpd_khat`,
the same estimator; a test checks they agree).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from structvi.psis import _gpd_fit, khat_threshold

__all__ = ["gpd_khat", "khat_threshold", "pareto_khat", "pointwise_khat", "psis_khat",
           "to_inference_data"]


def _arviz():
    import arviz

    return arviz


def _arviz_major() -> int:
    return int(_arviz().__version__.split(".")[0])


# ---------------------------------------------------------------------- Pareto k-hat
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
    return _gpd_fit(x)[0]


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


# ---------------------------------------------------------------------- export
def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().double().cpu().numpy()


def _chains(group: dict[str, torch.Tensor], chains: int) -> dict[str, np.ndarray]:
    """``(S, ...)`` tensors as ``(chains, S / chains, ...)`` arrays (pseudo-chains)."""
    return {k: _numpy(v).reshape((chains, -1) + tuple(v.shape[1:])) for k, v in group.items()}


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


def _inference_data(groups: dict[str, dict[str, np.ndarray]], coords: dict[str, Any] | None,
                    dims: dict[str, list[str]] | None, attrs: dict[str, Any]):
    """The groups as ArviZ data: on ArviZ 0.x an ``InferenceData`` of directly built datasets
    (:mod:`structvi._idata`: ``az.from_dict``'s layout without its per-variable alignment
    work); on ArviZ 1.x its own ``from_dict`` (a ``DataTree``)."""
    from structvi import __version__ as version

    attrs = {**attrs, "inference_library_version": str(version)}
    if _arviz_major() >= 1:
        return _from_dict(groups, coords=coords, dims=dims, attrs=attrs)
    from structvi._idata import inference_data

    return inference_data(groups, coords, dims, attrs)


def to_inference_data(
    guide: Any,
    model: Callable[..., Any],
    num_samples: int = 1000,
    *,
    model_args: tuple = (),
    model_kwargs: dict[str, Any] | None = None,
    num_chains: int = 4,
    psis: str | None = "weights",
    posterior_predictive: bool = True,
    coords: dict[str, Any] | None = None,
    dims: dict[str, list[str]] | None = None,
    generator: torch.Generator | None = None,
    vectorize: str | None = None,
):
    """Draws from a fitted :class:`~structvi.pyro.AutoStructuredNormal` as ArviZ data.

    One vectorized model run at the draws gives everything (a particle plate, or
    :func:`torch.func.vmap` for models that do not broadcast, e.g. ``PyroModule`` networks; one
    run per draw only for models that support neither): each site's ``log_prob`` serves both
    the importance ratios and the per-observation log-likelihoods, and the predictive draws
    come from the same run. The ``S`` independent draws are split into ``num_chains``
    pseudo-chains, so ``az.summary`` reports finite r̂ and ESS (r̂ ≈ 1: the draws are i.i.d.).

    Args:
        guide: the fitted guide.
        model: the Pyro model, called with the full data (a subsampled plate is an error).
        num_samples: number of draws ``S`` (a multiple of ``num_chains``).
        model_args: model positional arguments.
        model_kwargs: model keyword arguments.
        num_chains: number of pseudo-chains.
        psis: ``"weights"`` — the posterior holds ``q``'s draws and ``sample_stats`` their
            Pareto-smoothed importance weights; ``"resample"`` — the posterior holds ``S``
            draws resampled by those weights (importance-corrected, :mod:`structvi.psis`; the
            predictive draws come from a second run at the resampled draws, so repeated draws
            get independent predictions); ``None`` — no importance weights.
        posterior_predictive: also draw the observed sites at each draw.
        coords: ArviZ coordinates.
        dims: ArviZ dimension names per variable.
        generator: source of the draws from ``q`` (and of the resampling).
        vectorize: how to run the model at the draws: ``None`` (detect once per model and
            argument shapes, cached on the guide), ``"plate"``, ``"vmap"`` or ``"loop"``.

    Returns:
        ``InferenceData`` (ArviZ 0.x) / ``DataTree`` (1.x) with ``posterior`` (latent and
        ``pyro.deterministic`` sites), ``log_likelihood``, ``observed_data``, if asked
        ``posterior_predictive``, and with ``psis`` a ``sample_stats`` group
        (``log_importance_ratio``: raw ``log p − log q``; ``log_weight``: smoothed, normalized).
        Attributes: ``inference_library="structvi"``, the guide class, ``structvi_structure``
        (the factor's JSON spec) and with ``psis`` ``pareto_k`` and ``pareto_k_threshold``.
        :func:`pointwise_khat` gives per-observation PSIS-LOO ``k̂``.

    Raises:
        ValueError: bad ``num_samples``/``num_chains``/``psis``/``vectorize``, or a subsampled
            plate.

    Warns:
        UserWarning: with ``psis``, when ``k̂`` is above the reliability threshold.
    """
    from structvi.psis import check_num_samples, draw, psis_from_ratios
    from structvi.pyro.psis import _detached, evaluate_draws, guide_log_joint

    check_num_samples(num_samples)
    check_num_samples(num_chains, name="num_chains")
    if num_samples % num_chains:
        raise ValueError(f"num_samples={num_samples} must be a multiple of num_chains="
                         f"{num_chains} (the draws are split into pseudo-chains)")
    if psis not in ("weights", "resample", None):
        raise ValueError(f"psis must be 'weights', 'resample' or None, got psis={psis!r}")
    if psis is not None:
        check_num_samples(num_samples, 25)
    kwargs = {} if model_kwargs is None else model_kwargs
    _, mode, nesting, trace = guide_log_joint(guide, model, model_args, kwargs,
                                              "to_inference_data", vectorize)
    U, log_q = draw(_detached(guide), num_samples, generator=generator)

    def run(points, predictive):
        return evaluate_draws(model, guide, points, model_args, kwargs, mode=mode,
                              nesting=nesting, predictive=predictive, trace=trace)

    ev = run(U, posterior_predictive and psis != "resample")
    attrs = {"inference_library": "structvi", "guide": type(guide).__name__,
             "structvi_structure": json.dumps(guide.factor_spec())}
    stats = None
    if psis is not None:
        result = psis_from_ratios(U, ev.log_joint.double() - log_q)
        stats = {"log_importance_ratio": result.log_ratios, "log_weight": result.log_weights}
        if psis == "resample":
            idx = result.resample(generator=generator)
            stats = {k: v[idx] for k, v in stats.items()}
            ev = run(U[idx], True) if posterior_predictive else ev._replace(
                **{g: {k: v[idx] for k, v in getattr(ev, g).items()}
                   for g in ("values", "loglik", "det")})
        attrs.update(pareto_k=result.khat, pareto_k_threshold=result.threshold, psis=psis)
    return _inference_data(_groups(ev, stats, trace, num_chains, posterior_predictive),
                           coords, dims, attrs)


def _groups(ev, stats, trace, chains, predictive) -> dict[str, dict[str, np.ndarray]]:
    """The ArviZ groups of an :class:`~structvi.pyro.psis.Evaluation` as arrays."""
    from structvi.pyro.psis import _observed

    observed = {n: s["value"] for n, s, kind in _observed(trace, set(ev.values))
                if kind == "observed"}
    groups = {"posterior": _chains({**ev.values, **ev.det}, chains),
              "log_likelihood": _chains(ev.loglik, chains),
              "observed_data": {k: _numpy(v) for k, v in observed.items()}}
    if predictive:
        groups["posterior_predictive"] = _chains(ev.pred, chains)
    if stats is not None:
        groups["sample_stats"] = _chains(stats, chains)
    return groups


def pointwise_khat(idata: Any) -> dict[str, np.ndarray]:
    """Per-observation PSIS-LOO ``k̂`` of data exported with ``psis="weights"``.

    The leave-one-out ratio of observation ``i`` at draw ``s`` is
    ``r_s / p(y_i | z_s)`` (``r_s`` the importance ratio of ``q``'s draw); a ``k̂`` above 0.7
    marks an observation whose LOO estimate is unreliable (influential).

    Returns:
        ``{observed site: k̂ of shape (observation shape)}``.

    Raises:
        ValueError: no ``sample_stats.log_importance_ratio`` (exported with ``psis=None`` or
            ``"resample"``).
    """
    from structvi.psis import smooth_log_weights

    stats = idata["sample_stats"] if "sample_stats" in _group_names(idata) else None
    if stats is None or "log_importance_ratio" not in stats or \
            stats.attrs.get("psis", "weights") != "weights":
        raise ValueError("pointwise_khat needs data from to_inference_data(..., psis='weights') "
                         "(sample_stats.log_importance_ratio of q's draws)")
    log_r = np.asarray(stats["log_importance_ratio"]).reshape(-1)
    out = {}
    for name, lik in idata["log_likelihood"].items():
        values = np.asarray(lik)
        values = values.reshape((log_r.size,) + values.shape[2:])
        ratios = log_r.reshape((-1,) + (1,) * (values.ndim - 1)) - values
        _, k = smooth_log_weights(np.moveaxis(ratios, 0, -1))
        out[name] = np.asarray(k)
    return out


def _group_names(idata: Any) -> list[str]:
    groups = getattr(idata, "groups", None)
    if callable(groups):
        return list(groups())
    return list(getattr(idata, "children", {}))


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

    ``u_s = μ + K ε_s`` with ``log q(u_s) = −½‖ε_s‖² − log|det K| − (d/2) log 2π`` (no solve);
    the model runs once, vectorized (:func:`to_inference_data`). Reading (module docstring):
    ``k̂ < 0.7`` — ``q`` is a reliable posterior approximation. For the corrected moments and
    resampled draws use :func:`structvi.pyro.psis.guide_psis` (or ``guide.psis(model, ...)``).

    Args:
        guide: the fitted :class:`~structvi.pyro.AutoStructuredNormal`.
        model: the Pyro model, called with the full data (a subsampled plate is an error).
        num_samples: number of draws ``S`` (an integer ``≥ 25``; 1000 or more recommended).
        model_args: model positional arguments.
        model_kwargs: model keyword arguments.
        generator: source of the draws.

    Returns:
        ``k̂``.

    Raises:
        ValueError: a bad ``num_samples`` or a subsampled plate.
    """
    from structvi.pyro.psis import guide_psis

    return guide_psis(guide, model, num_samples, model_args=model_args, model_kwargs=model_kwargs,
                      generator=generator, warn=False).khat
