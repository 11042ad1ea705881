"""PSIS-corrected posteriors and the vectorized ArviZ export (issue 10, item 3)."""

from __future__ import annotations

import math
import sys
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from structvi import arviz as sva
from structvi.gaussian import StructuredGaussian
from structvi.psis import psis, smooth_log_weights
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI
from structvi.pyro.psis import constrained_draws, guide_psis, replay
from structvi.structures import make_structure

F64 = torch.float64
SHAPE, RATE = 3.0, 2.0  # σ ~ Gamma(3, 2): mean 1.5, sd √3/2; log σ is skewed (log-gamma)
GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 2, dtype=F64, generator=GEN)
Y = X @ torch.tensor([1.0, -1.0], dtype=F64) + 0.5 * torch.randn(40, dtype=F64, generator=GEN)


def gamma_model():
    pyro.sample("sigma", dist.Gamma(torch.tensor(SHAPE, dtype=F64), RATE))


def regression(x, y=None, subsample_size=None):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=F64), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0, dtype=F64)))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal((x[idx] * beta).sum(-1), sigma),
                    obs=None if y is None else y[idx])


def _fit(model, args, steps=30):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model, structure="dense")
    svi = NaturalGradientSVI(model, guide, estimator="hessian", num_samples=8, lr=0.5,
                             generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        svi.step(*args)
    return guide


@pytest.fixture(scope="module")
def gamma_guide():
    return _fit(gamma_model, ())


@pytest.fixture(scope="module")
def reg_guide():
    return _fit(regression, (X, Y))


def test_psis_corrects_the_moments_of_a_skewed_posterior(gamma_guide):
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k̂ below the threshold: no warning
        result = gamma_guide.psis(gamma_model, num_samples=4000, generator=gen)
    assert result.khat < 0.7 and result.reliable
    sigma = constrained_draws(gamma_guide, result.draws)["sigma"]
    exact_mean, exact_sd = SHAPE / RATE, math.sqrt(SHAPE) / RATE
    raw_sd, psis_sd = float(sigma.std()), float(result.std(sigma))
    raw_mean, psis_mean = float(sigma.mean()), float(result.mean(sigma))
    assert abs(psis_sd - exact_sd) < 0.5 * abs(raw_sd - exact_sd), (raw_sd, psis_sd, exact_sd)
    assert abs(psis_mean - exact_mean) < abs(raw_mean - exact_mean) + 0.01
    resampled = sigma[result.resample(generator=gen)]
    assert abs(float(resampled.mean()) - exact_mean) < 0.1


def test_psis_on_a_fit_result_style_q_and_log_joint():
    """Generic ``psis(q, log_joint)``: log-gamma target in u, q its Laplace approximation."""
    def log_joint(U):
        u = U[:, 0]
        return SHAPE * u - RATE * u.exp()

    mode = math.log(SHAPE / RATE)
    q = StructuredGaussian(torch.tensor([mode], dtype=F64),
                           make_structure("dense", 1, dtype=F64).scale(1 / math.sqrt(SHAPE)))
    result = psis(q, log_joint, 4000, generator=torch.Generator().manual_seed(0))
    exact = float(torch.special.digamma(torch.tensor(SHAPE, dtype=F64))) - math.log(RATE)
    assert result.khat < 0.7
    assert abs(float(result.mean()[0]) - exact) < 0.5 * abs(mode - exact)


def test_a_poor_q_warns_and_reports_a_large_khat(reg_guide):
    loc, factor = reg_guide.loc.detach().clone(), reg_guide.factor
    try:
        reg_guide.set_state(loc + 3 * factor.gram_diagonal().sqrt(), factor)
        with pytest.warns(UserWarning, match=r"Pareto k-hat = .* q misses part of the posterior"):
            result = reg_guide.psis(regression, X, Y, num_samples=1000,
                                    generator=torch.Generator().manual_seed(0))
    finally:
        reg_guide.set_state(loc, factor)
    assert result.khat > 0.7 and not result.reliable


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_num_samples_are_clear_errors(reg_guide, bad):
    with pytest.raises(ValueError, match=rf"num_samples must be an integer >= \d+.*{bad!r}"):
        sva.psis_khat(reg_guide, regression, bad, model_args=(X, Y))
    with pytest.raises(ValueError, match="num_samples must be an integer"):
        sva.to_inference_data(reg_guide, regression, bad, model_args=(X, Y))
    with pytest.raises(ValueError, match="num_samples must be an integer"):
        reg_guide.psis(regression, X, Y, num_samples=bad)


def test_subsampled_plates_are_refused(reg_guide):
    for call in (lambda: sva.psis_khat(reg_guide, regression, 100, model_args=(X, Y, 10)),
                 lambda: sva.to_inference_data(reg_guide, regression, 100,
                                               model_args=(X, Y, 10))):
        with pytest.raises(ValueError, match="needs the full data set, but plate 'data' draws"):
            call()


def test_export_has_sample_stats_pseudo_chains_and_pointwise_khat(reg_guide):
    idata = sva.to_inference_data(reg_guide, regression, 400, model_args=(X, Y),
                                  generator=torch.Generator().manual_seed(0))
    stats = idata.sample_stats
    assert stats["log_importance_ratio"].shape == (4, 100)
    np.testing.assert_allclose(np.logaddexp.reduce(stats["log_weight"].values.ravel()), 0.0,
                               atol=1e-9)
    assert 0 <= idata.posterior.attrs["pareto_k"] < 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = az.summary(idata, var_names=["beta", "sigma"])
    assert np.isfinite(summary["r_hat"]).all()
    k = sva.pointwise_khat(idata)["y"]
    assert k.shape == (40,) and np.isfinite(k).all()
    resampled = sva.to_inference_data(reg_guide, regression, 400, model_args=(X, Y),
                                      psis="resample", generator=torch.Generator().manual_seed(0))
    assert resampled.posterior["beta"].shape == (4, 100, 2)
    with pytest.raises(ValueError, match="psis='weights'"):
        sva.pointwise_khat(resampled)


@pytest.mark.parametrize("mode", ["plate", "vmap"])
def test_vectorized_replay_equals_the_loop(reg_guide, mode):
    U = reg_guide.get_posterior().sample((6,)).detach()
    loop = replay(regression, reg_guide, U, (X, Y), {}, mode="loop", nesting=1, predictive=False)
    fast = replay(regression, reg_guide, U, (X, Y), {}, mode=mode, nesting=1, predictive=True)
    assert fast[0]["y"].shape == (6, 40) and fast[1]["y"].shape == (6, 40)
    torch.testing.assert_close(fast[0]["y"], loop[0]["y"], rtol=1e-12, atol=1e-12)


def test_guide_psis_uses_the_vectorized_log_joint(reg_guide):
    a = guide_psis(reg_guide, regression, 200, model_args=(X, Y),
                   generator=torch.Generator().manual_seed(3))
    b = guide_psis(reg_guide, regression, 200, model_args=(X, Y),
                   generator=torch.Generator().manual_seed(3))
    assert a.khat == b.khat and a.draws.shape == (200, 3)


def test_smoother_without_arviz_psislw_agrees(monkeypatch):
    """ArviZ 1.x has no ``az.psislw`` (it lives in arviz_stats): our smoother stands in."""
    lr = np.random.default_rng(0).standard_t(4, size=2000)
    lw_ref, k_ref = smooth_log_weights(lr)
    monkeypatch.delattr(az, "psislw")
    monkeypatch.setitem(sys.modules, "arviz_stats", None)  # not installed
    lw, k = smooth_log_weights(lr)
    assert k == pytest.approx(k_ref, abs=1e-10)
    np.testing.assert_allclose(lw, lw_ref, atol=1e-8)
