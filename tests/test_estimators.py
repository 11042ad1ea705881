"""Estimators of E[∇f] and Π̂(Kᵀ Ē K) against dense float64 oracles (MATH §2.3, §2.6)."""

from __future__ import annotations

import pytest
import torch

from structvi.estimators import estimate, hessian, reparam, stein
from structvi.structures import make_structure
from structvi.testing import assert_close

F64 = torch.float64


def quadratic(d, gen):
    """f(z) = ½ zᵀHz − bᵀz as log_joint = −f, with its H and b."""
    R = torch.randn(d, d, generator=gen, dtype=F64)
    H = R @ R.T / d + torch.eye(d, dtype=F64)
    b = torch.randn(d, generator=gen, dtype=F64)

    def log_joint(Z):
        return -0.5 * ((Z @ H) * Z).sum(-1) + Z @ b

    return log_joint, H, b


def quartic_log_joint(Z):
    """A non-quadratic, torch.func-friendly log density (softplus + quartic terms)."""
    w = torch.linspace(-1.0, 1.0, Z.shape[-1], dtype=Z.dtype)
    return -torch.nn.functional.softplus(Z @ w) - 0.1 * (Z**4).sum(-1) - 0.5 * (Z**2).sum(-1)


def test_hessian_estimator_is_exact_on_quadratics(structure_case, gen):
    log_joint, H, b = quadratic(structure_case.dim, gen)
    K, A = structure_case.random_group(gen)
    mu = torch.randn(structure_case.dim, generator=gen, dtype=F64)
    est = hessian(log_joint, mu, K, 2, torch.Generator().manual_seed(0))
    assert_close(est.stats.grad, H @ mu - b, 1e-12, "E[∇f]")
    expected = structure_case.oracle_project(A.T @ H @ A)
    assert_close(est.stats.curvature.to_dense(), expected, 1e-12, "Π̂(KᵀHK)")
    u = torch.randn(structure_case.dim, generator=gen, dtype=F64)
    assert float(est.quad_form(u)) == pytest.approx(float(u @ A.T @ H @ A @ u), rel=1e-12)


def test_hessian_estimator_matches_autograd_hessian_off_quadratics(gen):
    d = 5
    A = torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=gen, dtype=F64)
    K = make_structure("dense", d, dtype=F64).from_dense(A)
    mu = torch.randn(d, generator=gen, dtype=F64)
    est = hessian(quartic_log_joint, mu, K, 4, torch.Generator().manual_seed(5))
    eps = torch.randn(2, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    Z = mu + torch.cat([eps, -eps]) @ A.T

    def f(z):
        return -quartic_log_joint(z[None])[0]

    Hbar = torch.stack([torch.autograd.functional.hessian(f, z) for z in Z]).mean(0)
    gbar = torch.stack([torch.autograd.functional.jacobian(f, z) for z in Z]).mean(0)
    assert_close(est.stats.curvature.to_dense(), A.T @ Hbar @ A, 1e-12, "KᵀH̄K")
    assert_close(est.stats.grad, gbar, 1e-12, "mean ∇f")
    assert_close(est.log_joint, quartic_log_joint(Z), 1e-12, "log_joint values")


def z_test(estimates, expected, *, alpha=1e-3, detect=None):
    """Bonferroni z-test of unbiasedness over the entries of ``R`` independent estimates.

    ``estimates``: ``(R, m)``; ``expected``: ``(m,)``. Entries with zero spread must match
    exactly. Fails with probability ≤ ``alpha`` when the estimator is unbiased. ``detect``: a
    bias size (absolute) the test must be able to see — asserts ``(z_crit + 2)·se ≤ detect`` on
    every entry, so a bias of ``detect`` fails the test with probability ≥ 97.7 %.
    """
    R, m = estimates.shape
    mean = estimates.mean(0)
    se = estimates.std(0) / R**0.5
    z_crit = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha / (2 * m))))
    fixed = se == 0
    assert torch.allclose(mean[fixed], expected[fixed], atol=1e-12), "zero-spread entries"
    z = ((mean - expected) / se)[~fixed]
    assert z.abs().max() < z_crit, f"max |z| = {float(z.abs().max()):.2f} ≥ {z_crit:.2f}"
    if detect is not None:
        assert float((z_crit + 2) * se.max()) <= detect, "too few replications to see the bias"


def test_stein_is_unbiased_and_pattern_only(structure_case, gen):
    """z-test over R = 200 independent 192-sample estimates, Bonferroni over the d² entries,
    α = 1e-3; power: a bias of 8 % of max|Π̂(KᵀHK)| is seen (the old test let it through)."""
    log_joint, H, b = quadratic(structure_case.dim, gen)
    K, A = structure_case.random_group(gen)
    mu = torch.randn(structure_case.dim, generator=gen, dtype=F64)
    expected = structure_case.oracle_project(A.T @ H @ A)
    rng = torch.Generator().manual_seed(1)
    R = 200
    ests = [stein(log_joint, mu, K, 192, rng) for _ in range(R)]
    assert ests[0].stats.curvature.spec() == K.coord_identity().spec()
    dense = torch.stack([e.stats.curvature.to_dense().reshape(-1) for e in ests])
    z_test(dense, expected.reshape(-1), detect=0.08 * float(expected.abs().max()))
    assert_close(ests[0].stats.grad, H @ mu - b, 1e-12, "antithetic E[∇f] on a quadratic")


def test_antithetic_pairs_cancel_the_mean_term(gen):
    """On a quadratic, the Stein estimate does not depend on μ (MATH §2.3); reparam's does."""
    d = 4
    log_joint, _, _ = quadratic(d, gen)
    K = make_structure("dense", d, dtype=F64)
    far, near = 50 * torch.ones(d, dtype=F64), torch.zeros(d, dtype=F64)
    a, b = (stein(log_joint, m, K, 8, torch.Generator().manual_seed(2)) for m in (far, near))
    assert_close(a.stats.curvature.to_dense(), b.stats.curvature.to_dense(), 1e-10, "stein")
    c, e = (reparam(log_joint, m, K, 8, torch.Generator().manual_seed(2)) for m in (far, near))
    assert not torch.allclose(c.stats.curvature.to_dense(), e.stats.curvature.to_dense())


def test_control_variate_makes_stein_exact_at_the_fixed_point(gen):
    """With KᵀHK = I the control variate cancels all noise of the Stein estimate (c = 1)."""
    d = 6
    log_joint, H, _ = quadratic(d, gen)
    A = torch.linalg.cholesky(torch.linalg.inv(H))  # K Kᵀ = H⁻¹ ⇒ KᵀHK = I
    K = make_structure("dense", d, dtype=F64).from_dense(A)
    mu = torch.randn(d, generator=gen, dtype=F64)
    with_cv = stein(log_joint, mu, K, 4, torch.Generator().manual_seed(0))
    plain = stein(log_joint, mu, K, 4, torch.Generator().manual_seed(0), control=0.0)
    eye = torch.eye(d, dtype=F64)
    assert_close(with_cv.stats.curvature.to_dense(), eye, 1e-10, "Stein with control variate")
    assert (plain.stats.curvature.to_dense() - eye).abs().max() > 0.1


def test_reparam_is_unbiased(gen):
    """z-test over R = 2000 independent 64-sample estimates of diag(KᵀHK) and E[∇f],
    Bonferroni over the 6 entries, α = 1e-3; power: a 10 % bias is seen (the old test let 15 %
    through)."""
    d = 3
    log_joint, H, b = quadratic(d, gen)
    K = make_structure("diagonal", d, dtype=F64).scale(0.5)
    mu = torch.randn(d, generator=gen, dtype=F64)
    rng = torch.Generator().manual_seed(3)
    ests = [reparam(log_joint, mu, K, 64, rng) for _ in range(2000)]
    values = torch.stack([torch.cat([e.stats.curvature.diagonal(), e.stats.grad]) for e in ests])
    expected = torch.cat([0.25 * H.diagonal(), H @ mu - b])
    z_test(values[:, :d], expected[:d], detect=0.10 * float(expected[:d].abs().min()))
    z_test(values, expected)


def test_stein_quad_form_matches_curvature_on_average(gen):
    d = 3
    log_joint, H, _ = quadratic(d, gen)
    K = make_structure("dense", d, dtype=F64)
    est = stein(log_joint, torch.zeros(d, dtype=F64), K, 40_000, torch.Generator().manual_seed(4))
    u = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    assert float(est.quad_form(u)) == pytest.approx(float(u @ H @ u), rel=0.05)


@pytest.mark.parametrize("name", ["stein", "hessian", "reparam"])
def test_equal_generators_give_equal_estimates(name, gen):
    d = 4
    K = make_structure("dense", d, dtype=F64)
    mu = torch.randn(d, generator=gen, dtype=F64)
    a, b = (estimate(quartic_log_joint, mu, K, estimator=name, num_samples=4,
                     generator=torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(a.stats.grad, b.stats.grad)
    assert torch.equal(a.stats.curvature.to_dense(), b.stats.curvature.to_dense())


def test_estimates_in_factor_and_loc_dtypes():
    K = make_structure("diagonal", 3, dtype=torch.bfloat16)
    mu = torch.zeros(3, dtype=torch.float32)
    est = stein(quartic_log_joint, mu, K, 4, torch.Generator().manual_seed(0))
    assert est.stats.grad.dtype == torch.float32
    assert torch.isfinite(est.stats.curvature.diagonal()).all()


@pytest.mark.parametrize(("name", "n"), [("stein", 3), ("stein", 0), ("hessian", 1),
                                         ("reparam", 0)])
def test_bad_num_samples(name, n):
    K = make_structure("dense", 2, dtype=F64)
    with pytest.raises(ValueError, match=f"num_samples must be .*{name}.*got num_samples={n}"):
        estimate(quartic_log_joint, torch.zeros(2, dtype=F64), K, estimator=name, num_samples=n)


@pytest.mark.parametrize("name", ["stein", "hessian", "reparam"])
def test_log_joint_output_shape_is_checked(name):
    K = make_structure("dense", 2, dtype=F64)
    with pytest.raises(ValueError, match=r"log_joint must map .* \(4, 2\) to shape \(4,\), got "
                                         r"output \(4, 1\)"):
        estimate(lambda Z: Z[:, :1], torch.zeros(2, dtype=F64), K, estimator=name,
                 num_samples=4)


def test_unknown_estimator():
    K = make_structure("dense", 2, dtype=F64)
    with pytest.raises(ValueError, match="estimator must be one of .* got estimator='ggn'"):
        estimate(quartic_log_joint, torch.zeros(2, dtype=F64), K, estimator="ggn")



def test_hessian_curvature_is_whitened_with_a_bf16_factor():
    """bf16 factor, float32 mean (float32 points): Kᵀ Ē K at the optimum of a condition-1e4
    Gaussian is I to 1e-3 (measured 4e-5): the products are accumulated in float32 along K's
    columns, never as a rounded Ē K."""
    from tests.vi.models import stiff_gaussian

    log_joint, m, Lam = stiff_gaussian(d=6, cond=1e4)
    L = torch.linalg.cholesky(torch.linalg.inv(Lam))
    K = make_structure("dense", 6, dtype=F64).from_dense(L).to(torch.bfloat16)
    est = hessian(log_joint, m.float(), K, 2, torch.Generator().manual_seed(0))
    exact = K.to(F64).to_dense().T @ Lam @ K.to(F64).to_dense()  # I up to K's bf16 rounding
    err = (est.stats.curvature.to_dense().double() - exact).abs().max()
    assert err < 1e-3, f"curvature error {err:.3g}"
