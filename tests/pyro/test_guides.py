"""``AutoStructuredNormal`` behaves like Pyro's own autoguides, for every structure.

The reference for shapes is Pyro's ``AutoMultivariateNormal`` on the same model: ``median``,
``quantiles``, ``Predictive`` (sequential and parallel) must give the same keys and shapes, and
constrained sites must land in their supports.
"""

from __future__ import annotations

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_value

from structvi.pyro import AutoStructuredNormal, PyroStructuredGaussian
from structvi.structures.block_sites import BlockSites
from structvi.testing import assert_close

F64 = torch.float64


def constrained_model(y=None):
    """Unconstrained, positive, simplex and interval sites (6 unconstrained coordinates)."""
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=F64), 0.5))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3, dtype=F64)))
    frac = pyro.sample("frac", dist.Uniform(torch.tensor(-1.0, dtype=F64), 2.0))
    with pyro.plate("data", 4):
        pyro.sample("y", dist.Normal(loc[..., :1] + frac * probs[..., :1], scale), obs=y)


def plated_model(y=None):
    """A global latent, a latent in a plate and a nested observation plate."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("groups", 3):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("reps", 2, dim=-2):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def subsampled_model(x, y=None):
    """A global latent with a subsampled observation plate (size 10 of 30)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, 3, dtype=F64), 1.0).to_event(2))
    with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
        mean = (x[idx] @ w.mT).sum(-1)
        pyro.sample("y", dist.Normal(mean, 1.0), obs=None if y is None else y[idx])


Y_CONSTRAINED = torch.tensor([0.3, -0.2, 1.1, 0.5], dtype=F64)
Y_PLATED = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
X_SUB = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
CASES = {
    "constrained": (constrained_model, (Y_CONSTRAINED,)),
    "plated": (plated_model, (Y_PLATED,)),
    "subsampled": (subsampled_model, (X_SUB, X_SUB.sum(1))),
}
STRUCTURES = {  # id -> (structure, options); every one fits 4, 6 and 6 coordinates
    "dense": ("dense", {}),
    "diagonal": ("diagonal", {}),
    "block_diagonal": ("block_diagonal", {"block_size": 2}),
    "low_rank_diagonal": ("low_rank_diagonal", {"rank": 2}),
    "lower_triangular": ("lower_triangular", {}),
    "hierarchical": ("hierarchical", {"k1": 1, "k2": 1}),
    "triangular_toeplitz": ("triangular_toeplitz", {}),
}


@pytest.fixture(params=list(STRUCTURES), ids=str)
def structure(request):
    return STRUCTURES[request.param]


@pytest.fixture(params=list(CASES), ids=str)
def case(request):
    pyro.clear_param_store()
    return CASES[request.param]


def _pair(model, args, structure):
    """Our guide and Pyro's AutoMultivariateNormal, both set up on the model."""
    name, options = structure
    ours = AutoStructuredNormal(model, structure=name, **options)
    ref = AutoMultivariateNormal(model)
    pyro.set_rng_seed(0)
    ours(*args), ref(*args)
    return ours, ref


def _shapes(samples):
    return {k: tuple(v.shape) for k, v in samples.items()}


def test_median_and_quantiles_like_pyro(case, structure):
    model, args = case
    ours, ref = _pair(model, args, structure)
    assert _shapes(ours.median(*args)) == _shapes(ref.median(*args))
    q_ours, q_ref = ours.quantiles([0.1, 0.5, 0.9], *args), ref.quantiles([0.1, 0.5, 0.9], *args)
    assert _shapes(q_ours) == _shapes(q_ref)
    for name, med in ours.median(*args).items():
        assert_close(q_ours[name][1], med, 1e-12, f"median {name}")


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_predictive_shapes_like_pyro(case, structure, parallel):
    model, args = case
    ours, ref = _pair(model, args, structure)
    model_args = args[:1] if model is subsampled_model else ()
    got = Predictive(model, guide=ours, num_samples=5, parallel=parallel)(*model_args)
    want = Predictive(model, guide=ref, num_samples=5, parallel=parallel)(*model_args)
    assert _shapes(got) == _shapes(want)


def test_constrained_sites_respect_their_supports(structure):
    pyro.clear_param_store()
    name, options = structure
    guide = AutoStructuredNormal(constrained_model, structure=name, init_scale=2.0, **options)
    pyro.set_rng_seed(1)
    draws = [guide(Y_CONSTRAINED) for _ in range(20)] + [guide.median(Y_CONSTRAINED)]
    draws += [{k: v[i] for k, v in guide.quantiles([0.01, 0.99], Y_CONSTRAINED).items()}
              for i in range(2)]
    support = {"scale": dist.constraints.positive, "probs": dist.constraints.simplex,
               "frac": dist.constraints.interval(-1.0, 2.0)}
    for draw in draws:
        for site, constraint in support.items():
            assert bool(constraint.check(draw[site]).all()), (site, draw[site])


def test_posterior_is_a_structured_gaussian_with_init_scale(structure):
    pyro.clear_param_store()
    name, options = structure
    init = {"loc": torch.tensor([0.5, -1.0], dtype=F64), "scale": torch.tensor(2.0, dtype=F64)}
    guide = AutoStructuredNormal(constrained_model, structure=name, init_scale=0.3,
                                 init_loc_fn=init_to_value(values=init), **options)
    guide.setup(Y_CONSTRAINED)
    q = guide.get_posterior()
    assert isinstance(q, PyroStructuredGaussian) and q.factor.name == name
    assert_close(q.variance, torch.full((6,), 0.09, dtype=F64), 1e-12, "init_scale²")
    median = guide.median(Y_CONSTRAINED)
    assert_close(median["loc"], init["loc"], 1e-12, "init loc")
    z90 = 1.2815515655446004  # Φ⁻¹(0.9): marginal quantiles of the unconstrained "loc" site
    q = guide.quantiles([0.1, 0.9], Y_CONSTRAINED)["loc"]
    assert_close(q, torch.stack([init["loc"] - 0.3 * z90, init["loc"] + 0.3 * z90]), 1e-10, "q")
    assert_close(median["scale"], init["scale"], 1e-12, "init scale")


def test_per_site_structures_compose_block_diagonally():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(
        subsampled_model, structure={"w": ("kronecker", {"factors": ("dense", "diagonal")})})
    guide.setup(X_SUB, X_SUB.sum(1))
    K = guide.factor
    assert isinstance(K, BlockSites) and K.blocks[0].dims == (2, 3)
    assert K.blocks[0].factors[1].name == "diagonal"
    mixed = AutoStructuredNormal(constrained_model, structure={"loc": "dense", "probs": (
        "low_rank_diagonal", {"rank": 1})})
    mixed.setup(Y_CONSTRAINED)
    assert [b.name for b in mixed.factor.blocks] == ["dense", "diagonal", "low_rank_diagonal",
                                                     "diagonal"]
    assert mixed.site_sizes() == {"loc": 2, "scale": 1, "probs": 2, "frac": 1}


def test_whole_vector_kronecker_takes_dims_from_the_single_site():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(subsampled_model, structure="kronecker")
    guide.setup(X_SUB, X_SUB.sum(1))
    assert guide.factor.dims == (2, 3)


def test_log_prob_matches_the_dense_gaussian():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(constrained_model, structure={"loc": "dense", "probs": (
        "low_rank_diagonal", {"rank": 1})})
    guide.setup(Y_CONSTRAINED)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    q = guide.get_posterior()
    z = q.sample((4,))
    assert_close(q.log_prob(z), q.to_multivariate_normal().log_prob(z), 1e-10, "log q")


def test_trains_with_pyro_svi_and_adam():
    """The parameters are ordinary nn.Parameters: Pyro's own SVI can train the guide too."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoStructuredNormal(plated_model, structure="lower_triangular")
    svi = SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    losses = [svi.step(Y_PLATED) for _ in range(150)]
    assert sum(losses[-50:]) / 50 < sum(losses[:5]) / 5 - 3.0
    # exact: mu | y ~ N(2/3 · mean(y), 1/3) (each group mean ~ N(mu, 1 + 1/2))
    assert_close(guide.median()["mu"], Y_PLATED.mean() * 2 / 3, 0.15, "posterior mean of mu")


def test_guide_state_dict_roundtrip_weights_only():
    pyro.clear_param_store()
    guide = AutoStructuredNormal(constrained_model, structure="hierarchical", k1=1, k2=2)
    guide.setup(Y_CONSTRAINED)
    with torch.no_grad():
        guide.loc.add_(1.0)
    buf = io.BytesIO()
    torch.save(guide.state_dict(), buf)
    buf.seek(0)
    pyro.clear_param_store()
    fresh = AutoStructuredNormal(constrained_model, structure="hierarchical", k1=1, k2=2)
    fresh.setup(Y_CONSTRAINED)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert_close(fresh.get_posterior().loc, guide.get_posterior().loc, 0.0, "loc")
    assert_close(fresh.factor.to_dense(), guide.factor.to_dense(), 0.0, "factor")


def test_model_without_latent_sites_raises():
    def model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    with pytest.raises(RuntimeError, match="found no latent variables"):
        AutoStructuredNormal(model)()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_scale": 0.0}, "init_scale > 0"),
        ({"init_scale": float("nan")}, "init_scale > 0"),
        ({"structure": 3}, "structure must be a structure name or a mapping"),
        ({"structure": {"loc": "dense"}, "rank": 2}, "per-site mapping"),
    ],
    ids=["zero-scale", "nan-scale", "bad-structure", "options-with-mapping"],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoStructuredNormal(constrained_model, **kwargs)


@pytest.mark.parametrize(
    ("structure", "match"),
    [
        ({"nope": "dense"}, r"not latent sites of the model; the latent sites are"),
        ({"loc": 5}, r"structure\['loc'\] must be a structure name"),
        ({"loc": "no_such_structure"}, "unknown structure"),
    ],
    ids=["unknown-site", "bad-spec", "unknown-structure"],
)
def test_setup_errors_name_the_site(structure, match):
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=match):
        AutoStructuredNormal(constrained_model, structure=structure).setup(Y_CONSTRAINED)


def test_state_access_before_setup_explains():
    guide = AutoStructuredNormal(constrained_model)
    with pytest.raises(RuntimeError, match="guide.setup"):
        guide.factor
