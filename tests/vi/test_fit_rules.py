"""Units of the step rule: the matmul-only log-determinant, sample dropping, StepRule, Pyro."""

from __future__ import annotations

import pytest
import torch

from structvi._forbid import ForbidDecompositions
from structvi._fit_rules import StepRule, logdet_retraction
from structvi.engine.retraction import apply_retraction
from structvi.estimators import estimate
from structvi.structures import make_structure

F64 = torch.float64


@pytest.mark.parametrize("retraction", ["quadratic", "first_order", "expm"])
def test_logdet_retraction_matches_slogdet(structure_case, retraction, gen):
    """log|det h(M)| by matrix products equals slogdet of the dense h(M), ‖M‖_∞ = 0.8."""
    K, _ = structure_case.random_group(gen)
    eye = K.coord_identity()
    M = eye.project_outer(torch.randn(K.dim, 3, generator=gen, dtype=F64))
    M = M.scale(0.8 / float(M.inf_norm()))
    with ForbidDecompositions():
        value = logdet_retraction(M, retraction)
    exact = float(torch.linalg.slogdet(K.retract(M, retraction).to_dense())[1]
                  - torch.linalg.slogdet(K.to_dense())[1])
    assert value == pytest.approx(exact, abs=1e-9)


_COORDS = [("dense", 6, {}), ("diagonal", 9, {}), ("low_rank_diagonal", 7, {"rank": 2}),
           ("kronecker", 12, {"dims": (3, 4)}),
           ("kronecker", 12, {"dims": (4, 3), "factors": ("diagonal", "dense")})]


@pytest.mark.parametrize("name,dim,opts", _COORDS, ids=[f"{c[0]}{c[1]}" for c in _COORDS])
@pytest.mark.parametrize("retraction", ["quadratic", "first_order"])
@pytest.mark.parametrize("tol", [1e-6, 1e-9, 1e-12])
def test_logdet_retraction_error_is_within_the_tail_bound(name, dim, opts, retraction, tol, gen):
    """Float64: |series − slogdet(h(M))| ≤ tol (the stated tail bound) at spectral scales from
    1e-3 to near the radius, for dense, diagonal, low-rank and Kronecker coordinates."""
    eye = make_structure(name, dim, dtype=F64, **opts).coord_identity()
    U = torch.randn(dim, 4, generator=gen, dtype=F64)
    V = torch.randn(dim, 4, generator=gen, dtype=F64)
    M0 = eye.project_outer(U, V)
    radius = 2 ** 0.5 if retraction == "quadratic" else 1.0
    for scale in (1e-3, 0.05, 0.3, 0.7 * radius):
        M = M0.scale(scale / float(M0.inf_norm()))
        value = logdet_retraction(M, retraction, tol=tol)
        assert value is not None
        h = apply_retraction(M, retraction) if name != "kronecker" else None
        if h is None:  # factor-wise: log|det h(M₁) ⊗ h(M₂)|
            K = make_structure(name, dim, dtype=F64, **opts)
            exact = float(torch.linalg.slogdet(K.retract(M, retraction).to_dense())[1])
        else:
            exact = float(torch.linalg.slogdet(h.to_dense())[1])
        assert abs(value - exact) <= tol + 1e-13 * (1 + abs(exact)), (scale, value, exact)


def test_series_terms_bound_holds_and_is_short():
    """The tail bound dominates the true tail on a worst case (all eigenvalues at ρ) and needs
    few terms at a typical step size (the old ∞-norm bound took ~90)."""
    from structvi._fit_rules import _MAX_TERMS, _log_series, series_terms

    for retraction, R in (("quadratic", 2 ** 0.5), ("first_order", 1.0)):
        c = _log_series(retraction, _MAX_TERMS)
        for rho in (0.01, 0.3, 0.8 * R):
            for K in (1, 3, 10):
                tail = abs(sum(c[k - 1] * 5 * rho ** k for k in range(K + 1, _MAX_TERMS)))
                a = 2.0 if retraction == "quadratic" else 1.0
                bound = a * 5 * rho ** 2 / R ** 2 * (rho / R) ** (K - 1) / ((K + 1) * (1 - rho / R))
                assert tail <= bound * (1 + 1e-12)
        assert series_terms(0.1, 0.02, retraction, 1e-12) <= 12
        assert series_terms(0.95 * R, 1.0, retraction, 1e-9) is None


def test_logdet_retraction_outside_the_radius_is_none():
    M = make_structure("dense", 3, dtype=F64).from_dense(torch.eye(3, dtype=F64) * 0.95)
    assert logdet_retraction(M, "first_order") is None
    assert logdet_retraction(M, "quadratic") == pytest.approx(
        float(torch.linalg.slogdet(apply_retraction(M).to_dense())[1]), abs=1e-9)


@pytest.mark.parametrize("name", ["stein", "hessian", "reparam"])
def test_non_finite_samples_are_dropped_with_their_partners(name):
    """log p is NaN where z₀ > 1: those samples (and, antithetic, their partners) are dropped
    and the statistics equal the estimate over the kept draws."""

    def log_joint(Z):
        value = -0.5 * Z.square().sum(-1)
        return torch.where(Z[:, 0] > 1.0, torch.full_like(value, float("nan")), value)

    K = make_structure("dense", 2, dtype=F64)
    est = estimate(log_joint, torch.zeros(2, dtype=F64), K, estimator=name, num_samples=32,
                   generator=torch.Generator().manual_seed(0))
    assert 0 < est.num_dropped < 32 and est.eps.shape[0] == 32 - est.num_dropped
    if name != "reparam":
        assert est.num_dropped % 2 == 0
    assert torch.isfinite(est.log_joint).all() and torch.isfinite(est.stats.grad).all()
    Z = est.eps  # K = I, μ = 0: z = ε
    assert torch.allclose(est.stats.grad, Z.mean(0))  # ∇f = z for f = ½‖z‖²


def test_all_samples_non_finite_gives_no_stats():
    K = make_structure("dense", 2, dtype=F64)
    est = estimate(lambda Z: Z.sum(-1) * float("nan"), torch.zeros(2, dtype=F64), K,
                   num_samples=4, generator=torch.Generator().manual_seed(0))
    assert est.stats is None and est.num_dropped == 4 and est.bad_value != est.bad_value


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tolerance": 0.0}, "tolerance must be a finite number > 0"),
    ({"max_backtracks": -1}, "max_backtracks must be an integer >= 0"),
])
def test_step_rule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepRule(**kwargs)


def test_natural_gradient_svi_stops_instead_of_returning_nan_forever():
    """Old code: max_consecutive_skips=2**31, so a model that is NaN everywhere returned NaN
    forever. Now the 10th failed step raises FitStopped naming the value; the guide keeps the
    last accepted state."""
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist

    from structvi.fit import FitStopped
    from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("broken", z.sum() * float("nan"))

    guide = AutoStructuredNormal(model, structure="dense")
    svi = NaturalGradientSVI(model, guide, num_samples=4,
                             generator=torch.Generator().manual_seed(0))
    # without validation: else Pyro itself rejects the NaN factor
    with pyro.validation_enabled(False), pytest.warns(RuntimeWarning, match="non-finite"), \
            pytest.raises(FitStopped, match="10 failed steps in a row .*non-finite") as info:
        for _ in range(50):
            svi.step()
    assert info.value.reason == "non_finite"
    assert torch.isfinite(guide.loc).all()
