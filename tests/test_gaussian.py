"""StructuredGaussian against torch's dense MultivariateNormal built from K Kᵀ (float64 oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from structvi.gaussian import StructuredGaussian, whiten
from structvi.structures import make_structure
from structvi.testing import assert_close

F64 = torch.float64


def random_q(case, gen):
    """A random StructuredGaussian of the case's structure and its dense MVN oracle."""
    K, A = case.random_group(gen)
    loc = torch.randn(case.dim, generator=gen, dtype=F64)
    cov = A @ A.T
    mvn = MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov))
    return StructuredGaussian(loc, K), mvn


def test_log_prob_entropy_moments_match_mvn(structure_case, gen):
    q, mvn = random_q(structure_case, gen)
    x = torch.randn(6, structure_case.dim, generator=gen, dtype=F64)
    assert_close(q.log_prob(x), mvn.log_prob(x), 1e-10, "log_prob")
    assert_close(q.entropy(), mvn.entropy(), 1e-10, "entropy")
    assert_close(q.mean, mvn.mean, 0.0, "mean")
    assert_close(q.variance, mvn.variance, 1e-12, "variance")
    assert_close(q.covariance_matrix, mvn.covariance_matrix, 1e-12, "covariance_matrix")
    assert_close(q.precision_matrix, mvn.precision_matrix, 1e-8, "precision_matrix")
    assert_close(q.scale_tril, mvn.scale_tril, 1e-10, "scale_tril")


def test_variance_does_not_build_dense(structure_case, gen, monkeypatch):
    q, mvn = random_q(structure_case, gen)

    def boom(*args, **kwargs):
        raise AssertionError("variance must not call to_dense")

    monkeypatch.setattr(type(q.factor), "to_dense", boom)
    assert_close(q.variance, mvn.variance, 1e-12, "variance")


def test_log_prob_does_not_build_dense(structure_case, gen, monkeypatch):
    """``log_prob`` whitens with the structure's own ``solve``: no ``d×d`` matrix."""
    from structvi.structures import STRUCTURES

    q, mvn = random_q(structure_case, gen)
    x = torch.randn(3, structure_case.dim, generator=gen, dtype=F64)

    def boom(*args, **kwargs):
        raise AssertionError("log_prob must not call to_dense")

    for cls in STRUCTURES.values():
        monkeypatch.setattr(cls, "to_dense", boom)
    assert_close(q.log_prob(x), mvn.log_prob(x), 1e-10, "log_prob")


def test_triangular_zero_triangle_gets_no_gradient(gen):
    """Trained by autograd (the Pyro guide under a torch optimizer), a triangular factor's zero
    triangle must stay zero: ``rsample`` and ``log_prob`` read only the kept triangle."""
    for name, keep in (("lower_triangular", torch.tril), ("upper_triangular", torch.triu)):
        A = torch.eye(4, dtype=F64) + 0.3 * torch.randn(4, 4, generator=gen, dtype=F64)
        K = make_structure(name, 4, dtype=F64).from_dense(A)
        matrix = K.tensors()["matrix"].requires_grad_()
        q = StructuredGaussian(torch.zeros(4, dtype=F64), K._new({"matrix": matrix}))
        x = q.rsample((5,), generator=gen)
        (q.log_prob(x.detach()).sum() + x.square().sum()).backward()
        assert torch.equal(matrix.grad, keep(matrix.grad)), name


def test_sample_moments(structure_case):
    q, mvn = random_q(structure_case, torch.Generator().manual_seed(3))
    n = 40_000
    x = q.sample((n,), generator=torch.Generator().manual_seed(4))
    assert x.shape == (n, structure_case.dim) and x.dtype == F64
    sd = mvn.variance.sqrt()
    # 6-sigma bounds: mean error sd/√n; covariance error ≈ sd_i sd_j √(2/n)
    assert ((x.mean(0) - mvn.mean).abs() <= 6 * sd / math.sqrt(n)).all()
    err = (x.T.cov() - mvn.covariance_matrix).abs()
    assert (err <= 6 * math.sqrt(2 / n) * sd[:, None] * sd[None, :]).all()


def test_equal_generators_equal_samples(structure_case, gen):
    q, _ = random_q(structure_case, gen)
    a = q.rsample((5,), generator=torch.Generator().manual_seed(7))
    b = q.rsample((5,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_rsample_is_differentiable():
    K = make_structure("dense", 3, dtype=F64)
    loc = torch.zeros(3, dtype=F64, requires_grad=True)
    z = StructuredGaussian(loc, K).rsample((4,), generator=torch.Generator().manual_seed(0))
    z.sum().backward()
    assert torch.equal(loc.grad, torch.full((3,), 4.0, dtype=F64))


def test_kl_closed_form_vs_mvn(structure_case, gen):
    (p, mp), (q, mq) = random_q(structure_case, gen), random_q(structure_case, gen)
    expected = kl_divergence(mp, mq)
    assert_close(kl_divergence(p, q), expected, 1e-9, "KL(struct‖struct)")
    assert_close(kl_divergence(p, mq), expected, 1e-9, "KL(struct‖MVN)")
    assert_close(kl_divergence(mp, q), expected, 1e-9, "KL(MVN‖struct)")
    assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-10)


def test_kl_between_structures():
    gen = torch.Generator().manual_seed(0)
    d = 5
    A = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=gen, dtype=F64)
    p = StructuredGaussian(torch.randn(d, generator=gen, dtype=F64),
                           make_structure("dense", d, dtype=F64).from_dense(A))
    q = StructuredGaussian.standard(d, "diagonal", 2.0, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    expected = kl_divergence(MultivariateNormal(p.loc, covariance_matrix=A @ A.T),
                             MultivariateNormal(q.loc, covariance_matrix=4 * eye))
    assert_close(kl_divergence(p, q), expected, 1e-10, "KL(dense‖diagonal)")


def test_expand_and_batched_loc():
    gen = torch.Generator().manual_seed(1)
    A = torch.eye(4, dtype=F64) + 0.2 * torch.randn(4, 4, generator=gen, dtype=F64)
    K = make_structure("dense", 4, dtype=F64).from_dense(A)
    q = StructuredGaussian(torch.randn(4, dtype=F64, generator=gen), K)
    qb = q.expand((3, 2))
    assert qb.batch_shape == (3, 2) and qb.event_shape == (4,)
    assert qb.sample((5,), generator=gen).shape == (5, 3, 2, 4)
    assert qb.entropy().shape == (3, 2) and qb.variance.shape == (3, 2, 4)
    x = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    mvn = MultivariateNormal(q.loc, covariance_matrix=A @ A.T)
    assert_close(qb.log_prob(x), mvn.log_prob(x), 1e-10, "batched log_prob")
    locs = torch.randn(2, 4, generator=gen, dtype=F64)
    assert_close(StructuredGaussian(locs, K).log_prob(x),
                 MultivariateNormal(locs, covariance_matrix=A @ A.T).log_prob(x), 1e-10,
                 "batched loc")


def test_standard():
    q = StructuredGaussian.standard(6, "diagonal", init_scale=0.5, dtype=F64)
    assert torch.equal(q.loc, torch.zeros(6, dtype=F64))
    assert_close(q.covariance_matrix, 0.25 * torch.eye(6, dtype=F64), 0.0, "cov")
    assert q.factor.name == "diagonal" and q.factor.dtype == F64


@pytest.mark.parametrize("init_scale", [0.0, -1.0, float("nan"), True])
def test_standard_rejects_bad_init_scale(init_scale):
    with pytest.raises(ValueError, match=f"init_scale must be .* got init_scale={init_scale!r}"):
        StructuredGaussian.standard(3, init_scale=init_scale)


def test_constructor_errors_name_the_argument():
    K = make_structure("dense", 3)
    with pytest.raises(ValueError, match=r"loc must have shape .*\(3,\).*got loc of shape \(4,\)"):
        StructuredGaussian(torch.zeros(4), K)
    with pytest.raises(TypeError, match="factor must be a structvi Structure, got factor=Tensor"):
        StructuredGaussian(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="unknown structure 'nope'"):
        StructuredGaussian.standard(3, "nope")


def test_whitening_needs_no_decomposition_for_triangular_types(structure_case, gen, monkeypatch):
    """``log_prob``'s ``K⁻¹(x − μ)`` is a substitution for triangular-type factors (no inverse,
    no LU/Cholesky/QR); ``log|det K|`` is the structure's own (tested with the structures)."""
    mask = structure_case.mask
    if not (torch.equal(mask, mask.tril()) or torch.equal(mask, mask.triu())):
        pytest.skip(f"{structure_case.name} is not triangular")
    K, A = structure_case.random_group(gen)
    r = torch.randn(structure_case.dim, 3, generator=gen, dtype=F64)
    expected = torch.linalg.solve(A, r)
    for fn in ["solve", "inv", "cholesky", "lu_factor", "qr", "eigh", "svd", "slogdet", "det"]:
        monkeypatch.setattr(torch.linalg, fn, _raiser(fn))
    monkeypatch.setattr(torch, "inverse", _raiser("inverse"))
    assert_close(whiten(K, r), expected, 1e-10, "K⁻¹ r")
    StructuredGaussian(torch.zeros(structure_case.dim, dtype=F64), K).rsample((2,), generator=gen)


def _raiser(fn):
    def raise_(*args, **kwargs):
        raise AssertionError(f"torch.linalg.{fn} called")

    return raise_


def test_whiten_matches_solve(structure_case, gen):
    K, A = structure_case.random_group(gen)
    r = torch.randn(structure_case.dim, 3, generator=gen, dtype=F64)
    assert_close(whiten(K, r), torch.linalg.solve(A, r), 1e-10, "K⁻¹ r")


@pytest.fixture(autouse=True)
def _single_thread():
    """These problems are tiny: one intra-op thread avoids thread-pool overhead on small CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
