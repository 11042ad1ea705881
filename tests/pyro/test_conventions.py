"""Pyro conventions of ``AutoStructuredNormal`` / ``NaturalGradientSVI`` (issue 10, item 4) and
the vectorized default (item 2). Each case failed on the code before the issue."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from pyro.nn import PyroModule, PyroSample
from torch import nn

from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI, latent_log_joint
from structvi.pyro.log_joint import choose_vectorization
from structvi.pyro._specs import default_rank
from structvi.testing import assert_close

F64 = torch.float64
GEN = torch.Generator().manual_seed(3)
Y = torch.randn(20, dtype=F64, generator=GEN) - 0.7
X = torch.randn(30, 3, dtype=F64, generator=GEN)
Y_REG = X @ torch.tensor([1.0, -1.0, 0.5], dtype=F64) + 0.3 * torch.randn(30, dtype=F64,
                                                                           generator=GEN)


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def two_site_model(x, y):
    """A regression with a positive noise scale (for AutoDelta + structured parts)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(3, dtype=F64), 2.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * beta).sum(-1), sigma), obs=y)


def no_broadcast_model(y):
    """``mu.item()`` cannot broadcast over particles nor run under vmap: the loop fallback."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(float(mu.item()) + 0.0 * mu, 1.0), obs=y)


class TinyNet(PyroModule):
    """A ``PyroModule`` regression net: ``nn.Linear`` cannot take a particle dim of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = PyroModule[nn.Linear](3, 1).double()
        self.fc.weight = PyroSample(dist.Normal(torch.tensor(0.0, dtype=F64), 1.0)
                                    .expand([1, 3]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(torch.tensor(0.0, dtype=F64), 1.0)
                                  .expand([1]).to_event(1))

    def forward(self, x, y=None):
        _ = (self.fc.weight, self.fc.bias)  # draw the weights outside the data plate
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(self.fc(x).squeeze(-1), 0.3), obs=y)


def _svi(model, guide, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return NaturalGradientSVI(model, guide, **kwargs)


# ---------------------------------------------------------------------- param store
def test_param_store_holds_the_trained_guide(tmp_path):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(normal_model)
    svi = _svi(normal_model, guide, estimator="hessian")
    for _ in range(20):
        svi.step(Y)
    trained = guide.median(Y)["mu"]
    assert_close(pyro.param("AutoStructuredNormal.loc").detach(), guide.loc.detach(), 0.0,
                 "stored loc")
    path = tmp_path / "store.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    reloaded = AutoStructuredNormal(normal_model)
    reloaded.setup(Y)
    assert_close(reloaded.median(Y)["mu"], trained, 0.0, "reloaded median")
    exact = Y.sum() / (Y.numel() + 1.0)
    assert abs(float(trained) - float(exact)) < 1e-6


# ---------------------------------------------------------------------- AutoGuideList
def test_auto_guide_list_with_auto_delta_and_structured_parts():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoGuideList(two_site_model)
    guide.append(AutoDelta(pyro.poutine.block(two_site_model, expose=["sigma"])))
    guide.append(AutoStructuredNormal(pyro.poutine.block(two_site_model, hide=["sigma"])))
    svi = _svi(two_site_model, guide, estimator="hessian", optim=pyro.optim.Adam({"lr": 0.1}))
    for _ in range(120):
        svi.step(X, Y_REG)
    sigma = float(guide.median(X, Y_REG)["sigma"])
    beta = guide[1].median(X, Y_REG)["beta"]
    # MAP-ish noise scale (with β integrated against its posterior) near the generating 0.3
    assert 0.2 < sigma < 0.45, sigma
    # β's posterior given σ is Gaussian: its mean is the ridge solution at that σ
    precision = torch.eye(3, dtype=F64) / 4.0 + X.T @ X / sigma**2
    exact = torch.linalg.solve(precision, X.T @ Y_REG / sigma**2)
    assert_close(beta, exact, 2e-3, "beta | sigma")


def test_auto_guide_list_needs_optim():
    guide = AutoGuideList(two_site_model)
    guide.append(AutoDelta(pyro.poutine.block(two_site_model, expose=["sigma"])))
    guide.append(AutoStructuredNormal(pyro.poutine.block(two_site_model, hide=["sigma"])))
    with pytest.raises(ValueError, match="optim=pyro.optim.Adam"):
        NaturalGradientSVI(two_site_model, guide)


# ---------------------------------------------------------------------- argument names
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_particles": 8}, "did you mean num_samples"),
    ({"loss": object()}, "did you mean nothing"),
    ({"learning_rate": 0.1}, "did you mean lr"),
    ({"momentun": 0.1}, "did you mean momentum"),
])
def test_pyro_argument_names_are_answered(kwargs, match):
    with pytest.raises(TypeError, match=match):
        NaturalGradientSVI(normal_model, AutoStructuredNormal(normal_model), **kwargs)


def test_run_with_progress_bar(capsys):
    pyro.clear_param_store()
    svi = _svi(normal_model, AutoStructuredNormal(normal_model), estimator="hessian")
    losses = svi.run(5, Y, progress=True)
    assert len(losses) == 5 and all(isinstance(v, float) for v in losses)
    assert "NaturalGradientSVI" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        svi.run(0, Y)


# ---------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name", ["dense", "diagonal", "low_rank_diagonal", "lower_triangular",
                                  "triangular_toeplitz", "kronecker"])
def test_every_structure_on_a_one_dimensional_model(name):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(normal_model, structure=name)
    svi = _svi(normal_model, guide, estimator="hessian")
    for _ in range(10):
        svi.step(Y)
    exact_mean, exact_var = Y.sum() / (Y.numel() + 1.0), 1.0 / (Y.numel() + 1.0)
    assert_close(guide.loc, exact_mean.reshape(1), 1e-6, "mean")
    assert_close(guide.factor.gram_diagonal(), torch.tensor([exact_var], dtype=F64), 1e-6, "var")


def test_too_large_options_are_clamped_with_a_warning():
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="rank=5 does not fit .* using rank=3"):
        AutoStructuredNormal(two_site_model, structure="low_rank_diagonal", rank=5).setup(X, Y_REG)
    guide = AutoStructuredNormal(two_site_model, structure="low_rank_diagonal")
    guide.setup(X, Y_REG)
    assert guide.factor_spec()["options"]["rank"] == 3  # d = 4: at least min(3, d - 1)


@pytest.mark.parametrize("dim, rank", [(2, 1), (3, 2), (4, 3), (5, 3), (6, 3), (12, 3), (13, 4),
                                       (26, 5), (100, 10)])
def test_default_low_rank_is_pyros_but_at_least_three(dim, rank):
    # Regression (GARCH(1,1), d = 4): Pyro's round(sqrt(d)) = 2 gave a precision family whose
    # optimum lies below Pyro's rank-2 covariance family; rank d - 1 is the dense family.
    assert default_rank(dim) == rank


@pytest.mark.parametrize("dim", [1, 0, 2.0, True])
def test_default_rank_rejects_bad_sizes(dim):
    with pytest.raises(ValueError, match=rf"dim must be an integer >= 2, got dim={dim!r}"):
        default_rank(dim)


def test_stale_param_store_of_another_model_is_refused_clearly():
    # Regression: a guide set up while the store held a same-named guide of a 4-dimensional
    # model kept that loc of shape (4,) and failed later with "expected an unconstrained latent
    # of shape batch + (1,), got (4,)".
    pyro.clear_param_store()
    AutoStructuredNormal(two_site_model).setup(X, Y_REG)
    with pytest.raises(ValueError, match=r"param store holds 'AutoStructuredNormal.loc' of "
                                         r"shape \(4,\).* needs shape \(1,\); call "
                                         r"pyro.clear_param_store\(\)"):
        AutoStructuredNormal(normal_model).setup(Y)
    pyro.clear_param_store()
    AutoStructuredNormal(normal_model).setup(Y)  # after clearing: fine


# ---------------------------------------------------------------------- before set-up
@pytest.mark.parametrize("method", ["get_posterior", "median", "sample_latent"])
def test_methods_before_setup_set_up_or_explain(method):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(normal_model)
    shown = "get_posterior" if method == "sample_latent" else method
    with pytest.raises(RuntimeError, match=rf"{shown} needs .*guide.setup\(\*model_args\)"):
        getattr(guide, method)()  # the model needs y: set-up fails, with an explanation
    getattr(guide, method)(Y)  # with the model's arguments it sets itself up
    assert guide.prototype_trace is not None


def test_quantiles_before_setup_sets_up():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(normal_model)
    q = guide.quantiles([0.25, 0.75], Y)["mu"]
    assert q.shape == (2,) and q[0] < q[1]


# ---------------------------------------------------------------------- local latents
def test_local_latents_in_a_subsampled_plate_are_refused():
    def local_model(y):
        with pyro.plate("data", y.shape[0], subsample_size=5) as idx:
            z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="latent site 'z' is inside the subsampled plate 'data'"):
        _svi(local_model, AutoStructuredNormal(local_model)).step(Y)


# ---------------------------------------------------------------------- late sites
def test_a_latent_site_added_after_setup_warns_once():
    state = {"extra": False}

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        if state["extra"]:
            pyro.sample("tau", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    pyro.clear_param_store()
    svi = _svi(model, AutoStructuredNormal(model), estimator="hessian")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(Y)
    state["extra"] = True
    with pytest.warns(UserWarning, match=r"latent site\(s\) \['tau'\] in the model but not in"):
        svi.step(Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(Y)  # once


# ---------------------------------------------------------------------- sample counts
def test_few_samples_for_a_large_dense_guide_warn():
    def wide(y):
        pyro.sample("w", dist.Normal(torch.zeros(200, dtype=F64), 1.0).to_event(1))

    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="num_samples=16 is far below the 200 coordinates"):
        _svi(wide, AutoStructuredNormal(wide, structure="dense")).step(Y)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _svi(wide, AutoStructuredNormal(wide, structure="diagonal")).step(Y)


# ---------------------------------------------------------------------- vectorization
@pytest.mark.parametrize(("model", "args", "mode"), [
    (two_site_model, (X, Y_REG), "plate"),
    (TinyNet(), (X, Y_REG), "vmap"),
    (no_broadcast_model, (Y,), "loop"),
], ids=["broadcasting", "pyro-module", "no-broadcast"])
def test_vectorization_is_detected_and_equals_per_sample(model, args, mode):
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model)
    guide.setup(*args)
    U = guide.get_posterior().sample((5,)).detach() + 0.3 * torch.randn(
        5, guide.latent_dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, reasons = choose_vectorization(model, guide, args, {}, U, max_plate_nesting=1)
    assert got == mode
    assert (len([w for w in caught if "once per sample" in str(w.message)]) == 1) == (
        mode == "loop")
    loop = latent_log_joint(model, guide, args, vectorize="loop")
    fast = latent_log_joint(model, guide, args, vectorize=mode, max_plate_nesting=1)
    assert_close(fast(U), loop(U), 1e-12, f"{mode} vs loop")


def test_svi_uses_the_detected_mode_by_default():
    pyro.clear_param_store()
    net = TinyNet()
    svi = _svi(net, AutoStructuredNormal(net, structure="diagonal"))
    svi.step(X, Y_REG)
    assert svi.vectorization == "vmap"
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="evaluated once per sample"):
        svi = _svi(no_broadcast_model, AutoStructuredNormal(no_broadcast_model))
        svi.step(Y)
    assert svi.vectorization == "loop"


def test_detection_compares_non_finite_values_as_equal_entries():
    from structvi.pyro.log_joint import _agree

    inf, nan = math.inf, math.nan
    a = torch.tensor([1.0, -inf, nan], dtype=F64)
    assert _agree(a, a.clone())
    assert not _agree(a, torch.tensor([1.0, inf, nan], dtype=F64))
    assert not _agree(a, torch.tensor([1.0 + 1e-6, -inf, nan], dtype=F64))
    assert not _agree(a[:2], a)


def test_a_sample_outside_the_support_is_a_skipped_step_not_an_error():
    """A step whose samples underflow a scale to 0 is skipped (nan loss), as for any
    non-finite value, instead of raising Pyro's constraint-validation error."""
    pyro.clear_param_store()
    guide = AutoStructuredNormal(two_site_model, structure="diagonal")
    svi = _svi(two_site_model, guide, estimator="hessian")
    svi.step(X, Y_REG)
    loc = guide.loc.detach().clone()
    loc[-1] = -800.0  # log σ far below float64's range: σ = 0
    guide.set_state(loc, guide.factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(svi.step(X, Y_REG))
