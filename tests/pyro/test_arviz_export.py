"""The vectorized ArviZ export: ``to_inference_data`` equals the reference built the slow way
(per-draw model runs, ``psis`` on the loop log-joint, ``az.from_dict``) under a seed, runs the
model once for everything, and its ``vmap`` path equals the loop on a model that needs it."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from structvi import arviz as sva
from structvi.psis import psis
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI
from structvi.pyro.log_joint import latent_log_joint
from structvi.pyro.psis import _detached, constrained_draws, evaluate_draws, guide_log_joint

pytestmark = pytest.mark.filterwarnings("ignore:Pareto k-hat")
F64 = torch.float64
GEN = torch.Generator().manual_seed(0)
X = torch.randn(30, 2, dtype=F64, generator=GEN)
Y = X @ torch.tensor([1.0, -1.0], dtype=F64) + 0.8 * torch.randn(30, dtype=F64, generator=GEN)
Y_AR = 0.3 * torch.randn(20, dtype=F64, generator=GEN)


def regression(x, y):
    """Broadcasts over a particle plate (the ``"plate"`` path)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=F64), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0, dtype=F64)))
    mean = pyro.deterministic("mean", (x * beta).sum(-1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def recursion(y):
    """A volatility recursion written for one draw (``y - mu`` needs a scalar ``mu``): no
    particle plate, but ``vmap`` works (the ``"vmap"`` path)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    a = pyro.sample("a", dist.Uniform(torch.tensor(0.0, dtype=F64), 1.0))
    e = y - mu
    s2 = [torch.ones_like(a) * 0.1]
    for t in range(1, y.shape[-1]):
        s2.append(0.05 + a * e[t - 1] ** 2 + 0.5 * s2[-1])
    sd = pyro.deterministic("sd", torch.stack(s2, -1).sqrt())
    pyro.sample("y", dist.Normal(mu, sd).to_event(1), obs=y)


def _fit(model, args, steps=30):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model, structure="dense")
    svi = NaturalGradientSVI(model, guide, estimator="hessian", num_samples=8, lr=0.5,
                             generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            svi.step(*args)
    return guide


@pytest.fixture(scope="module")
def reg_guide():
    return _fit(regression, (X, Y))


@pytest.fixture(scope="module")
def rec_guide():
    return _fit(recursion, (Y_AR,))


def _reference(guide, model, args, S, seed, psis_mode, coords=None, dims=None):
    """The export computed the slow way: PSIS of the per-draw log-joint, one model run per
    draw for the log-likelihoods and deterministic sites, ``az.from_dict``."""
    gen = torch.Generator().manual_seed(seed)
    log_joint = latent_log_joint(model, guide, args, {}, vectorize="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = psis(_detached(guide), log_joint, S, generator=gen)
    U = result.draws
    stats = {"log_importance_ratio": result.log_ratios, "log_weight": result.log_weights}
    if psis_mode == "resample":
        idx = result.resample(generator=gen)
        U, stats = U[idx], {k: v[idx] for k, v in stats.items()}
    draws = constrained_draws(guide, U)
    loglik, det, observed = {}, {}, {}
    with poutine.block():
        for s in range(S):
            trace = poutine.trace(poutine.condition(model, {k: v[s] for k, v in draws.items()})
                                  ).get_trace(*args)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or name in draws:
                    continue
                if site["infer"].get("_deterministic"):
                    det.setdefault(name, []).append(site["value"])
                elif site["is_observed"]:
                    loglik.setdefault(name, []).append(site["fn"].log_prob(site["value"]))
                    observed[name] = site["value"].numpy()

    def chains(group):
        return {k: torch.stack(v).numpy().reshape((4, -1) + tuple(v[0].shape))
                if isinstance(v, list) else v.double().numpy().reshape((4, -1) + v.shape[1:])
                for k, v in group.items()}

    groups = {"posterior": chains({**draws, **det}), "log_likelihood": chains(loglik),
              "observed_data": observed, "sample_stats": chains(stats)}
    return sva._from_dict(groups, coords=coords, dims=dims), result


def _assert_same_group(new, old, exact=True):
    assert list(new.data_vars) == list(old.data_vars)
    assert dict(new.sizes) == dict(old.sizes)
    for name in old.data_vars:
        assert new[name].dims == old[name].dims, name
        if exact:
            np.testing.assert_allclose(new[name].values, old[name].values, rtol=1e-12,
                                       atol=1e-12, err_msg=name)
    for name in old.coords:
        np.testing.assert_array_equal(new.coords[name].values, old.coords[name].values)
    assert set(new.coords) == set(old.coords)


@pytest.mark.parametrize("psis_mode", ["weights", "resample"])
def test_export_equals_the_slow_reference(reg_guide, psis_mode):
    """Same draws under a seed: posterior, deterministic sites, log-likelihoods, log importance
    ratios and weights, k̂ and the layout (dims, coordinates) of ``az.from_dict``."""
    new = sva.to_inference_data(reg_guide, regression, 200, model_args=(X, Y), psis=psis_mode,
                                generator=torch.Generator().manual_seed(4))
    old, result = _reference(reg_guide, regression, (X, Y), 200, 4, psis_mode)
    for group in ("posterior", "log_likelihood", "observed_data", "sample_stats"):
        _assert_same_group(new[group], old[group])
    assert new.posterior.attrs["pareto_k"] == result.khat
    assert new.posterior.attrs["pareto_k_threshold"] == result.threshold
    _assert_same_group(new.posterior_predictive, old.log_likelihood, exact=False)  # same layout
    for group in new.groups():
        assert new[group].attrs["inference_library"] == "structvi"
        assert new[group].attrs["arviz_version"] == az.__version__


def test_export_with_coords_and_dims_has_the_from_dict_layout(reg_guide):
    coords = {"obs": np.arange(100, 130), "coef": ["x1", "x2"]}
    dims = {"y": ["obs"], "mean": ["obs"], "beta": ["coef"]}
    new = sva.to_inference_data(reg_guide, regression, 100, model_args=(X, Y), coords=coords,
                                dims=dims, generator=torch.Generator().manual_seed(1))
    old, _ = _reference(reg_guide, regression, (X, Y), 100, 1, "weights", coords, dims)
    for group in ("posterior", "log_likelihood", "observed_data", "sample_stats"):
        _assert_same_group(new[group], old[group])
    assert list(new.posterior_predictive["y"].coords["obs"].values) == list(range(100, 130))
    with pytest.raises(ValueError, match=r"dims\['beta'\].*names 2 dimensions.*shape \(2,\)"):
        sva.to_inference_data(reg_guide, regression, 100, model_args=(X, Y),
                              dims={"beta": ["coef", "extra"]})


def test_event_dims_of_a_log_likelihood_are_skipped_as_arviz_does(rec_guide):
    """``y`` is one multivariate observation: its log-likelihood has no ``obs`` axis."""
    new = sva.to_inference_data(rec_guide, recursion, 100, model_args=(Y_AR,),
                                coords={"t": np.arange(20)}, dims={"y": ["t"]},
                                generator=torch.Generator().manual_seed(1))
    old, _ = _reference(rec_guide, recursion, (Y_AR,), 100, 1, "weights", {"t": np.arange(20)},
                        {"y": ["t"]})
    for group in ("posterior", "log_likelihood", "observed_data", "sample_stats"):
        _assert_same_group(new[group], old[group])
    assert new.posterior_predictive["y"].dims == ("chain", "draw", "t")


def test_the_vmap_export_equals_the_loop(rec_guide):
    _, mode, _, _ = guide_log_joint(rec_guide, recursion, (Y_AR,), {}, "test")
    assert mode == "vmap"  # detected: the particle plate does not broadcast
    a = sva.to_inference_data(rec_guide, recursion, 100, model_args=(Y_AR,),
                              generator=torch.Generator().manual_seed(2))
    b = sva.to_inference_data(rec_guide, recursion, 100, model_args=(Y_AR,), vectorize="loop",
                              generator=torch.Generator().manual_seed(2))
    for group in ("posterior", "log_likelihood", "observed_data", "sample_stats"):
        _assert_same_group(a[group], b[group])
    _assert_same_group(a.posterior_predictive, b.posterior_predictive, exact=False)
    assert a.posterior.attrs["pareto_k"] == pytest.approx(b.posterior.attrs["pareto_k"],
                                                          abs=1e-10)


def test_a_failing_plate_run_falls_back_to_vmap_with_a_warning(rec_guide):
    U = rec_guide.get_posterior().sample((5,)).detach()
    with pytest.warns(UserWarning, match="particle plate.*running the model under torch.func"):
        got = evaluate_draws(recursion, rec_guide, U, (Y_AR,), {}, mode="plate", nesting=0,
                             predictive=True)
    loop = evaluate_draws(recursion, rec_guide, U, (Y_AR,), {}, mode="loop", nesting=0,
                          predictive=True)
    assert got.mode == "vmap" and loop.mode == "loop"
    torch.testing.assert_close(got.log_joint, loop.log_joint, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loglik["y"], loop.loglik["y"], rtol=1e-12, atol=1e-12)
    assert got.pred["y"].shape == loop.pred["y"].shape == (5, 20)


@pytest.mark.parametrize("mode", ["plate", "vmap"])
def test_the_evaluation_log_joint_is_the_training_log_joint(reg_guide, mode):
    U = reg_guide.get_posterior().sample((7,)).detach()
    got = evaluate_draws(regression, reg_guide, U, (X, Y), {}, mode=mode, nesting=1,
                         predictive=False)
    ref = latent_log_joint(regression, reg_guide, (X, Y), {}, vectorize="loop")(U)
    assert got.mode == mode and got.pred == {}
    torch.testing.assert_close(got.log_joint, ref, rtol=1e-12, atol=1e-12)
    assert got.det["mean"].shape == (7, 30) and got.values["beta"].shape == (7, 2)


class _Counting:
    """A model wrapper counting its runs (a vmapped run counts once)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args):
        self.calls += 1
        return self.model(*args)


def test_the_export_runs_the_model_once_at_the_draws(reg_guide):
    """Log-densities, log-likelihoods and predictive draws come from one batched run (plus the
    single-draw prototype run that checks for subsampled plates); the earlier export ran the
    model five times."""
    model = _Counting(regression)
    guide = _fit(model, (X, Y), steps=2)
    sva.to_inference_data(guide, model, 100, model_args=(X, Y))  # detects the mode once
    model.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sva.to_inference_data(guide, model, 100, model_args=(X, Y))
    assert model.calls == 2


def test_resampled_duplicates_get_independent_predictions(reg_guide):
    idata = sva.to_inference_data(reg_guide, regression, 400, model_args=(X, Y),
                                  psis="resample", generator=torch.Generator().manual_seed(0))
    sigma = idata.posterior["sigma"].values.ravel()
    pred = idata.posterior_predictive["y"].values.reshape(400, 30)
    _, first, counts = np.unique(sigma, return_index=True, return_counts=True)
    dup = first[counts > 1][0]
    twins = np.flatnonzero(sigma == sigma[dup])
    assert len(twins) > 1 and not np.allclose(pred[twins[0]], pred[twins[1]])


def test_a_poor_q_warns_in_the_export(reg_guide):
    loc, factor = reg_guide.loc.detach().clone(), reg_guide.factor
    try:
        reg_guide.set_state(loc + 3 * factor.gram_diagonal().sqrt(), factor)
        with pytest.warns(UserWarning, match=r"Pareto k-hat = .* q misses part of the posterior"):
            idata = sva.to_inference_data(reg_guide, regression, 400, model_args=(X, Y),
                                          generator=torch.Generator().manual_seed(0))
    finally:
        reg_guide.set_state(loc, factor)
    assert idata.posterior.attrs["pareto_k"] > 0.7


def test_bad_vectorize_is_a_clear_error(reg_guide):
    with pytest.raises(ValueError, match=r"vectorize must be None \(detect\) or one of .*'fast'"):
        sva.to_inference_data(reg_guide, regression, 100, model_args=(X, Y), vectorize="fast")


def _groups():
    rng = np.random.default_rng(0)
    return {"posterior": {"a": rng.normal(size=(4, 25)), "b": rng.normal(size=(4, 25, 3, 2))},
            "log_likelihood": {"y": rng.normal(size=(4, 25, 7))},
            "posterior_predictive": {"y": rng.normal(size=(4, 25, 7))},
            "sample_stats": {"log_weight": rng.normal(size=(4, 25))},
            "observed_data": {"y": rng.normal(size=7)}}


@pytest.mark.parametrize("public_constructor", [False, True])
@pytest.mark.parametrize("layout", [{}, {"coords": {"obs": np.arange(7) + 10, "k": ["u", "v"]},
                                         "dims": {"y": ["obs"], "b": [None, "k"]}}])
def test_directly_built_data_is_identical_to_from_dict(monkeypatch, public_constructor, layout):
    from structvi import _idata
    from structvi._idata import inference_data

    if public_constructor:  # an xarray without the internal shortcut: the public constructor
        monkeypatch.setattr(_idata, "_construct", lambda *args: None)
    attrs = {"inference_library": "structvi", "pareto_k": 0.3}
    new = inference_data(_groups(), layout.get("coords"), layout.get("dims"), attrs)
    old = sva._from_dict(_groups(), **layout, attrs=attrs)  # the earlier export path
    assert new.groups() == old.groups()
    for group in old.groups():
        a, b = new[group], old[group]
        assert a.drop_attrs().identical(b.drop_attrs()), group
        assert {k: v for k, v in a.attrs.items() if k != "created_at"} == \
            {k: v for k, v in b.attrs.items() if k != "created_at"}
    pick = {"chain": 1, "draw": 3, **({"k": "v"} if layout else {"b_dim_1": 1})}
    assert float(new.posterior["b"].sel(pick).sum()) == float(old.posterior["b"].sel(pick).sum())


def test_coords_that_do_not_fit_are_clear_errors():
    from structvi._idata import inference_data

    with pytest.raises(ValueError, match=r"coords\['obs'\] has shape \(5,\) but dimension 'obs' "
                                         r"has length 7"):
        inference_data(_groups(), {"obs": np.arange(5)}, {"y": ["obs"]}, {})
    with pytest.raises(ValueError, match="dimension 'obs' has length 2 in 'b' but 7"):
        inference_data({"posterior": {"y": np.zeros((4, 5, 7)), "b": np.zeros((4, 5, 2))}},
                       None, {"y": ["obs"], "b": ["obs"]}, {})


def regression32(x, y):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)


def test_a_float32_model_exports_like_its_loop():
    args = (X.float(), Y.float())
    guide = _fit(regression32, args, steps=10)
    a = sva.to_inference_data(guide, regression32, 100, model_args=args,
                              generator=torch.Generator().manual_seed(0))
    b = sva.to_inference_data(guide, regression32, 100, model_args=args, vectorize="loop",
                              generator=torch.Generator().manual_seed(0))
    for group in ("posterior", "log_likelihood", "sample_stats"):
        for name in b[group].data_vars:
            np.testing.assert_allclose(a[group][name].values, b[group][name].values, rtol=1e-5,
                                       atol=1e-4, err_msg=name)
    assert a.posterior["beta"].dtype == np.float64 and np.isfinite(a.posterior.attrs["pareto_k"])
