"""``structvi.arviz``: ArviZ export of a fitted guide (``az.summary``, ``az.loo``) and the
Pareto-k̂ diagnostic of ``q``, on the installed ArviZ (0.x), with the 1.x dispatch mocked."""

from __future__ import annotations

import json
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from structvi import arviz as sva
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI

F64 = torch.float64
GEN = torch.Generator().manual_seed(0)
X = torch.randn(30, 2, dtype=F64, generator=GEN)
Y = X @ torch.tensor([1.0, -1.0], dtype=F64) + 0.8 * torch.randn(30, dtype=F64, generator=GEN)


def model(x, y=None):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=F64), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0, dtype=F64)))
    mean = pyro.deterministic("mean", (x * beta).sum(-1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoStructuredNormal(model, structure="lower_triangular")
    svi = NaturalGradientSVI(model, guide, estimator="hessian", num_samples=16,
                             config=lambda t: sva_config(t))
    for _ in range(25):
        svi.step(X, Y)
    return guide


def sva_config(t):
    from structvi.engine import NGDConfig

    return NGDConfig(lr=1.0 if t < 10 else 0.3)


@pytest.fixture(scope="module")
def idata(fitted):
    return sva.to_inference_data(fitted, model, 300, model_args=(X, Y),
                                 generator=torch.Generator().manual_seed(1))


def test_groups_shapes_and_attrs(idata, fitted):
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert group in idata.groups()
    assert idata.posterior["beta"].shape == (4, 75, 2)
    assert idata.posterior["sigma"].shape == (4, 75)
    assert idata.posterior["mean"].shape == (4, 75, 30)  # pyro.deterministic site
    assert idata.log_likelihood["y"].shape == (4, 75, 30)
    assert idata.posterior_predictive["y"].shape == (4, 75, 30)
    np.testing.assert_allclose(idata.observed_data["y"].values, Y.numpy())
    attrs = idata.posterior.attrs
    assert attrs["inference_library"] == "structvi"
    assert json.loads(attrs["structvi_structure"])["name"] == "lower_triangular"
    assert (idata.posterior["sigma"].values > 0).all()


def test_summary_agrees_with_the_guide(idata, fitted):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pseudo-chains: no r_hat / shape warnings
        summary = az.summary(idata, var_names=["beta", "sigma"])
    assert list(summary.index) == ["beta[0]", "beta[1]", "sigma"]
    assert np.isfinite(summary["r_hat"].values).all() and (summary["r_hat"].values < 1.05).all()
    median = fitted.median(X, Y)
    np.testing.assert_allclose(summary["mean"].values[:2], median["beta"].numpy(), atol=0.1)
    assert np.isfinite(summary["sd"].values).all() and (summary["sd"].values > 0).all()


def test_loo_runs_and_is_consistent(idata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    lppd = np.log(np.exp(idata.log_likelihood["y"].values.reshape(-1, 30)).mean(0)).sum()
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo <= lppd + 1e-9
    assert 0 < loo.p_loo < 10  # three parameters


def test_psis_khat_passes_a_good_q_and_flags_a_poor_one(fitted):
    """The fitted Gaussian is reliable (k̂ ≈ 0.5 here, below 0.7); the same q moved 2 marginal
    sds off the posterior is flagged (k̂ ≈ 1.0–1.4 over seeds)."""
    gen = torch.Generator().manual_seed(2)
    good = sva.psis_khat(fitted, model, 2000, model_args=(X, Y), generator=gen)
    assert good < 0.7
    loc, factor = fitted.loc.detach().clone(), fitted.factor
    try:
        fitted.set_state(loc + 2 * factor.gram_diagonal().sqrt(), factor)
        poor = sva.psis_khat(fitted, model, 2000, model_args=(X, Y), generator=gen)
    finally:
        fitted.set_state(loc, factor)
    assert poor > 0.7


def test_fallback_khat_equals_arviz_psislw():
    rng = np.random.default_rng(0)
    for df, n in [(1, 200), (3, 1000), (30, 4000)]:
        lw = np.log(np.abs(rng.standard_t(df, size=n)))
        assert sva._khat_numpy(lw) == pytest.approx(float(az.psislw(lw)[1]), abs=1e-10)


def test_khat_threshold():
    assert sva.khat_threshold(100) == pytest.approx(0.5)
    assert sva.khat_threshold(10_000) == 0.7


def test_pareto_khat_uses_the_fallback_without_psislw(monkeypatch):
    lw = np.log(np.abs(np.random.default_rng(1).standard_t(2, size=500)))
    expected = sva.pareto_khat(lw)
    monkeypatch.delattr(az, "psislw")
    assert sva.pareto_khat(lw) == pytest.approx(expected, abs=1e-10)


def test_from_dict_dispatches_on_the_major_version(monkeypatch):
    calls = []

    class Group(dict):
        attrs: dict

    def fake_from_dict(data, *, coords=None, dims=None):  # the 1.x signature (no attrs)
        calls.append(data)
        out = {}
        for name in data:
            out[name] = Group()
            out[name].attrs = {}
        return out

    monkeypatch.setattr(az, "__version__", "1.2.0")
    monkeypatch.setattr(az, "from_dict", fake_from_dict)
    data = sva._from_dict({"posterior": {"a": np.zeros((1, 5))}}, attrs={"k": "v"})
    assert len(calls) == 1 and list(calls[0]) == ["posterior"]  # one dict of groups
    assert data["posterior"].attrs == {"k": "v"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 25 values"):
        sva.pareto_khat(np.zeros(10))
    with pytest.raises(ValueError, match="non-finite"):
        sva.pareto_khat(np.r_[np.zeros(30), np.inf])
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        sva.to_inference_data(AutoStructuredNormal(model), model, 0, model_args=(X, Y))


def test_eight_schools_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "eight_schools.py"
    spec = importlib.util.spec_from_file_location("example_eight_schools", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(steps=40, draws=300, verbose=False)
    assert list(out["summary"].index[:2]) == ["mu", "tau"] and len(out["summary"]) == 10
    assert 0 < out["summary"].loc["mu", "mean"] < 9  # NUTS: 4.4 ± 3.3
    assert np.isfinite(out["khat"]) and np.isfinite(out["loo"].elpd_loo)
