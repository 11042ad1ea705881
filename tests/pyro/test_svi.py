"""``NaturalGradientSVI``: exact posteriors of conjugate models through the Pyro path, the
log-joint it builds (Jacobians, plate scaling, vectorization), model params, state round trips,
and a Bayesian logistic regression against a cached NUTS reference."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from structvi.engine import NGDConfig
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI, latent_log_joint
from structvi.testing import assert_close
from tests.pyro import make_nuts_reference as logistic

F64 = torch.float64
GEN = torch.Generator().manual_seed(0)
X_LIN = torch.randn(40, 4, dtype=F64, generator=GEN)
Y_LIN = X_LIN @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64) + 0.5 * torch.randn(
    40, dtype=F64, generator=GEN)
NOISE, PRIOR = 0.5, 2.0
Y_LOG = torch.randn(10, dtype=F64, generator=GEN) + 1.0


def linear_model(x, y=None, subsample_size=None):
    """Bayesian linear regression with known noise: the posterior of β is Gaussian."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(4, dtype=F64), PRIOR).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Normal((x[idx] * beta).sum(-1), NOISE),
                    obs=None if y is None else y[idx])


def linear_posterior() -> tuple[torch.Tensor, torch.Tensor]:
    precision = torch.eye(4, dtype=F64) / PRIOR**2 + X_LIN.T @ X_LIN / NOISE**2
    cov = torch.linalg.inv(precision)
    return cov @ (X_LIN.T @ Y_LIN) / NOISE**2, cov


def lognormal_model(y):
    """σ ~ LogNormal(0.5, 1.5), y_i ~ N(log σ, 0.7): Gaussian in u = log σ *only* if the
    log-Jacobian of σ = exp(u) enters the objective."""
    sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(0.5, dtype=F64), 1.5))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(sigma.log(), 0.7), obs=y)


def lognormal_posterior() -> tuple[torch.Tensor, torch.Tensor]:
    precision = 1 / 1.5**2 + Y_LOG.numel() / 0.7**2
    mean = (0.5 / 1.5**2 + Y_LOG.sum() / 0.7**2) / precision
    return mean.reshape(1), torch.tensor([[1 / precision]], dtype=F64)


def _fit(model, args, structure, steps, *, estimator="hessian", **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    name, options = structure
    guide = AutoStructuredNormal(model, structure=name, **options)
    svi = NaturalGradientSVI(model, guide, estimator=estimator, **kwargs)
    losses = [svi.step(*args) for _ in range(steps)]
    return guide, svi, losses


@pytest.mark.parametrize(
    "structure",
    [("dense", {}), ("lower_triangular", {}), ("low_rank_diagonal", {"rank": 3}),
     ("hierarchical", {"k1": 1, "k2": 2})],
    ids=lambda s: s[0],
)
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorized"])
def test_linear_regression_exact_posterior(structure, vectorize):
    guide, _, _ = _fit(linear_model, (X_LIN, Y_LIN), structure, 15,
                       vectorize_particles=vectorize)
    mean, cov = linear_posterior()
    q = guide.get_posterior()
    assert_close(q.loc, mean, 1e-6, "posterior mean")
    assert_close(q.covariance_matrix, cov, 1e-6, "posterior covariance")


def test_mean_field_recovers_the_diagonal_of_the_precision():
    """Mean-field optimum of a Gaussian target: mean μ*, precision diag(S*) (MATH §2.1)."""
    guide, _, _ = _fit(linear_model, (X_LIN, Y_LIN), ("diagonal", {}), 15)
    mean, cov = linear_posterior()
    q = guide.get_posterior()
    assert_close(q.loc, mean, 1e-6, "mean")
    assert_close(1 / q.variance, torch.linalg.inv(cov).diagonal(), 1e-6, "diag precision")


def test_constrained_site_includes_the_log_jacobian():
    guide, svi, _ = _fit(lognormal_model, (Y_LOG,), ("dense", {}), 15)
    mean, cov = lognormal_posterior()
    q = guide.get_posterior()
    assert_close(q.loc, mean, 1e-6, "mean of log σ")
    assert_close(q.covariance_matrix, cov, 1e-6, "variance of log σ")
    assert_close(guide.median(Y_LOG)["sigma"], mean.exp()[0], 1e-6, "median of σ")


def test_loss_is_minus_log_evidence_at_the_exact_posterior():
    """With q = p(z | x), log p(x, z) − log q(z) = log p(x) for every z: the loss is exact."""
    _, svi, losses = _fit(linear_model, (X_LIN, Y_LIN), ("dense", {}), 15)
    marginal = dist.MultivariateNormal(
        torch.zeros(40, dtype=F64),
        PRIOR**2 * X_LIN @ X_LIN.T + NOISE**2 * torch.eye(40, dtype=F64))
    log_evidence = float(marginal.log_prob(Y_LIN))
    assert svi.evaluate_loss(X_LIN, Y_LIN) == pytest.approx(-log_evidence, abs=1e-6)
    # step() uses the analytic entropy: unbiased, with variance Var(log q)/n = (d/2)/2 = 1
    assert isinstance(losses[-1], float)
    assert losses[-1] == pytest.approx(-log_evidence, abs=3.0)
    assert losses[0] > losses[-1] + 10


def test_vectorized_and_looped_log_joint_agree():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(lognormal_model)
    guide.setup(Y_LOG)
    U = torch.randn(5, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    loop = latent_log_joint(lognormal_model, guide, (Y_LOG,))(U)
    vec = latent_log_joint(lognormal_model, guide, (Y_LOG,), vectorize=True, max_plate_nesting=1)
    assert_close(vec(U), loop, 1e-12, "vectorized log joint")
    expected = (dist.Normal(torch.tensor(0.5, dtype=F64), 1.5).log_prob(U[:, 0])
                + dist.Normal(U, 0.7).log_prob(Y_LOG).sum(-1))  # log-normal prior + Jacobian
    assert_close(loop, expected, 1e-12, "closed form")


def test_subsampled_plate_is_scaled_to_the_full_data():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(linear_model)
    guide.setup(X_LIN, Y_LIN, 10)
    trace = pyro.poutine.trace(linear_model).get_trace(X_LIN, Y_LIN, 10)
    sub = pyro.poutine.Trace()
    for name, site in trace.nodes.items():
        if site_is_subsample(site):
            sub.add_node(name, **site)
    idx = sub.nodes["data"]["value"]
    U = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    got = latent_log_joint(linear_model, guide, (X_LIN, Y_LIN, 10), subsample=sub)(U)
    prior = dist.Normal(torch.tensor(0.0, dtype=F64), PRIOR).log_prob(U).sum(-1)
    lik = dist.Normal(X_LIN[idx] @ U.T, NOISE).log_prob(Y_LIN[idx, None]).sum(0)
    assert_close(got, prior + 40 / 10 * lik, 1e-12, "prior + (N/B) Σ_B log p(y_i | β)")


def test_one_function_one_minibatch():
    """All evaluations of one log-joint (all samples of a step) share its first minibatch."""
    pyro.clear_param_store()
    guide = AutoStructuredNormal(linear_model)
    guide.setup(X_LIN, Y_LIN, 10)
    U = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    for vectorize in (False, True, "vmap"):
        f = latent_log_joint(linear_model, guide, (X_LIN, Y_LIN, 10), vectorize=vectorize,
                             max_plate_nesting=1)
        first = f(U)
        loop_same_batch = latent_log_joint(linear_model, guide, (X_LIN, Y_LIN, 10),
                                           subsample=f.subsample())
        assert_close(loop_same_batch(U), first, 1e-12, "rows share one minibatch")
        assert_close(f(U), first, 0.0, "same function, same minibatch")
        assert_close(f(U[:1]), first[:1], 1e-12, "subset of the points")
        g = latent_log_joint(linear_model, guide, (X_LIN, Y_LIN, 10), vectorize=vectorize,
                             max_plate_nesting=1)
        assert not torch.allclose(g(U), first), "a new function draws a new minibatch"


def test_minibatch_fit_matches_the_full_data_posterior():
    schedule = lambda t: NGDConfig(lr=0.1 if t < 100 else 0.02)  # noqa: E731
    guide, _, _ = _fit(linear_model, (X_LIN, Y_LIN, 10), ("dense", {}), 250, estimator="stein",
                       num_samples=16, config=schedule, vectorize_particles=True)
    mean, cov = linear_posterior()
    q = guide.get_posterior()
    sd = cov.diagonal().sqrt()
    assert ((q.loc.detach() - mean).abs() / sd).max() < 0.5
    # unscaled minibatches would give sd ratios near √(40/10) = 2
    assert_close(q.variance.sqrt() / sd, torch.ones(4, dtype=F64), 0.3, "sd ratio")


def test_model_params_are_trained_by_optim():
    """y_i ~ N(μ, σ) with σ a pyro.param: the ELBO-optimal σ² = mean((y − m)²) + v."""
    y = 3.0 * torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(3))

    def model(y):
        sigma = pyro.param("sigma", torch.tensor(1.0, dtype=F64),
                           constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    guide, _, _ = _fit(model, (y,), ("dense", {}), 200, num_samples=4, vectorize_particles=True,
                       optim=pyro.optim.Adam({"lr": 0.05}))
    sigma = float(pyro.param("sigma").detach())
    q = guide.get_posterior()
    optimum = math.sqrt(float((y - q.loc.detach()).square().mean() + q.variance.detach()))
    assert sigma == pytest.approx(optimum, rel=0.03)
    with pytest.warns(UserWarning, match="not trained"):
        _fit(model, (y,), ("dense", {}), 1)


def matrix_model(x, y):
    """A weight-matrix site and a bias site (for per-site structures)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, 4, dtype=F64), 1.0).to_event(2))
    b = pyro.sample("b", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w.mT + b, 0.5).to_event(1), obs=y)


@pytest.mark.parametrize(
    ("model", "args", "structure"),
    [(lognormal_model, (Y_LOG,), "dense"),
     (matrix_model, (X_LIN, Y_LIN[:, None].expand(40, 2)), {"w": "kronecker"})],
    ids=["dense", "per-site-kronecker"],
)
def test_state_dict_roundtrip_continues_in_lockstep(model, args, structure):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model, structure=structure)
    svi = NaturalGradientSVI(model, guide, estimator="stein", num_samples=8, lr=0.3,
                             generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        svi.step(*args)
    buf = io.BytesIO()
    torch.save(svi.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    pyro.clear_param_store()  # a guide of the same name would share the stored parameters
    fresh_guide = AutoStructuredNormal(model, structure=structure)
    fresh = NaturalGradientSVI(model, fresh_guide, estimator="stein", num_samples=8, lr=0.3)
    fresh.load_state_dict(state)  # before the first step: applied at set-up
    for _ in range(3):
        assert fresh.step(*args) == svi.step(*args)
    assert_close(fresh_guide.factor.to_dense(), guide.factor.to_dense(), 0.0, "factor")
    assert_close(fresh_guide.loc, guide.loc, 0.0, "loc")


def test_optim_state_saves_weights_only():
    def model(y):
        shift = pyro.param("shift", torch.tensor(0.0, dtype=F64))
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    _, svi, _ = _fit(model, (torch.tensor(1.0, dtype=F64),), ("dense", {}), 3, num_samples=2,
                     optim=pyro.optim.Adam({"lr": 0.1}))
    buf = io.BytesIO()
    torch.save(svi.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["optim"] and state["fitter"]["engine"]["factor_spec"]["name"] == "dense"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guide": "nope"}, TypeError, "guide must be an AutoStructuredNormal"),
        ({"optim": torch.optim.Adam}, TypeError, "optim must be a pyro.optim.PyroOptim"),
        ({"estimator": "newton"}, ValueError, "estimator must be one of"),
        ({"config": NGDConfig(), "lr": 0.1}, ValueError, "either config"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"num_samples": 3}, ValueError, "num_samples must be an even integer >= 2"),
        ({"num_samples": 0, "estimator": "reparam"}, ValueError, "an integer >= 1"),
    ],
    ids=["guide", "optim", "estimator", "config-and-lr", "negative-lr", "odd-stein", "zero"],
)
def test_constructor_errors(kwargs, error, match):
    kwargs = {"guide": AutoStructuredNormal(linear_model), **kwargs}
    with pytest.raises(error, match=match):
        NaturalGradientSVI(linear_model, **kwargs)


def test_logistic_regression_matches_nuts():
    """Breast-cancer logistic regression: posterior means and sds against the cached NUTS run.

    Tolerances. NUTS Monte-Carlo error (``tests/pyro/data/logistic_nuts.json``, 4000 draws,
    ESS ≥ 3900): MCSE ≈ 0.016 sd for the means and ≈ 1.1 % for the sds. The Gaussian family
    itself misses this (slightly skewed) posterior by a known amount: the Laplace approximation
    is off by up to 0.38 sd in the means and 6 % in the sds; Gaussian VI, which matches mass
    rather than the mode, is off by ≈ 0.06 sd and ≈ 6 % (KL(q‖p) under-disperses). We allow
    0.15 sd (4 MCSE + the VI gap, with room for the Stein noise of the last iterate) and 12 %.
    """
    ref = json.loads(logistic.DATA_FILE.read_text())
    X, y = logistic.load_data()
    schedule = lambda t: NGDConfig(lr=0.2 if t < 60 else 0.05 if t < 120 else 0.02)  # noqa: E731
    guide, _, _ = _fit(logistic.model, (X, y), ("dense", {}), 200, estimator="stein",
                       num_samples=64, config=schedule, vectorize_particles=True)
    q = guide.get_posterior()
    mean, sd = np.array(ref["mean"]), np.array(ref["std"])
    z = np.abs(q.loc.detach().numpy() - mean) / sd
    ratio = q.variance.sqrt().detach().numpy() / sd
    assert z.max() < 0.15, f"max |Δmean|/sd = {z.max():.3f}"
    assert np.abs(ratio - 1).max() < 0.12, f"sd ratios in [{ratio.min():.3f}, {ratio.max():.3f}]"


def test_kronecker_guide_recovers_a_matrix_normal_posterior():
    """Multi-output regression ``Y = X Wᵀ + noise``: the posterior of ``W`` (row-major) is
    ``N(M, I ⊗ A⁻¹)``, inside the Kronecker family; ``lr = 1`` (the Kronecker scale gauge is
    fixed in the first factor, structvi.structures.kronecker)."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(30, 4, dtype=F64, generator=gen)
    Y = X @ torch.randn(2, 4, dtype=F64, generator=gen).T + 0.5 * torch.randn(
        30, 2, dtype=F64, generator=gen)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, 4, dtype=F64), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w.mT, 0.5).to_event(1), obs=y)

    guide, _, _ = _fit(model, (X, Y), ("kronecker", {}), 30, lr=1.0)
    A = X.T @ X / 0.25 + torch.eye(4, dtype=F64)
    q = guide.get_posterior()
    assert q.factor.name == "kronecker" and q.factor.dims == (2, 4)
    assert_close(q.loc, torch.linalg.solve(A, X.T @ Y / 0.25).T.reshape(-1), 1e-6, "mean")
    cov = torch.kron(torch.eye(2, dtype=F64), torch.linalg.inv(A).contiguous())
    assert_close(q.covariance_matrix, cov, 1e-6, "I ⊗ A⁻¹")


def _load_example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bnn_example_runs_both_methods(capsys, tmp_path):
    plot = tmp_path / "calibration.png"
    results = _load_example("pyro_bnn").main(steps=20, eval_samples=10, plot=str(plot))
    assert plot.stat().st_size > 1000
    assert set(results) == {"structvi", "pyro"}
    for r in results.values():
        assert r["accuracy"] > 0.5 and 0 <= r["ece"] <= 1
        assert math.isfinite(r["nll"]) and math.isfinite(r["elbo"]) and r["seconds"] > 0
    assert "| structvi Kronecker NGD |" in capsys.readouterr().out
