"""The CG mean step (structvi.engine.mean_solver), the mean trust region and the per-structure
default step sizes, against dense float64 closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from structvi import engine
from structvi.engine import NGDConfig, plain_direction, target_hvp, trust_region_cg
from structvi.estimators import Estimate
from structvi.engine.mean_solver import mean_line_search as _mean_line_search
from structvi.schedules import StructureDefault, TwoStage, default_config
from structvi.structures import make_structure

F64 = torch.float64
D = 8


def spd(d, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    H = Q @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=F64)) @ Q.T
    return 0.5 * (H + H.T)


def random_factor(name, seed=0, **options):
    K = make_structure(name, D, dtype=F64, **options)
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(D, D, generator=g, dtype=F64)
    return K.retract(K.project(0.2 * (Y + Y.T)), "expm")


@pytest.mark.parametrize("name, options", [("diagonal", {}), ("low_rank_diagonal", {"rank": 2}),
                                           ("dense", {}), ("triangular_toeplitz", {})])
def test_cg_with_d_iterations_is_the_newton_step(name, options):
    """Enough iterations solve ``Ē v = g`` whatever the preconditioner ``K Kᵀ``."""
    H = spd(D, 1e3)
    K = random_factor(name, **options)
    g = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=F64)
    v = trust_region_cg(lambda x: H @ x, g, K, iters=4 * D, rtol=1e-13)
    torch.testing.assert_close(v, torch.linalg.solve(H, g), rtol=1e-8, atol=1e-10)


def test_one_cg_iteration_is_the_line_searched_plain_step():
    H = spd(D, 1e3)
    K = random_factor("diagonal")
    g = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=F64)
    v0 = K.matmul(K.rmatmul(g))
    beta = (g @ v0) / (v0 @ H @ v0)
    torch.testing.assert_close(trust_region_cg(lambda x: H @ x, g, K, iters=1), beta * v0)


def test_trust_region_bounds_the_step_in_q_metric():
    """``‖K⁻¹ v‖ = Δ`` when the region is active (norm tracked without a solve)."""
    H = spd(D, 1e4)
    K = random_factor("low_rank_diagonal", rank=2)
    g = 100 * torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=F64)
    free = trust_region_cg(lambda x: H @ x, g, K, iters=3 * D, rtol=1e-12)
    Kd = K.to_dense()
    assert float(torch.linalg.solve(Kd, free).norm()) > 2.0
    for radius in (0.5, 2.0):
        v = trust_region_cg(lambda x: H @ x, g, K, iters=3 * D, radius=radius, rtol=1e-12)
        assert float(torch.linalg.solve(Kd, v).norm()) == pytest.approx(radius, rel=1e-9)
        p = plain_direction(g, K, radius)
        assert float(torch.linalg.solve(Kd, p).norm()) == pytest.approx(radius, rel=1e-9)


def test_non_positive_curvature_stops_at_the_last_iterate_or_the_plain_step():
    H = torch.diag(torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=F64))
    K = make_structure("diagonal", 4, dtype=F64).scale(0.5)
    g = torch.ones(4, dtype=F64)
    one = trust_region_cg(lambda x: H @ x, g, K, iters=1, radius=3.0)
    v = trust_region_cg(lambda x: H @ x, g, K, iters=10, radius=3.0)
    torch.testing.assert_close(v, one)  # the second direction has negative curvature: stop
    for zero_hessian in (lambda x: 0 * x, lambda x: -x):  # piecewise-linear / concave target
        v = trust_region_cg(zero_hessian, g, K, iters=10, radius=3.0)
        torch.testing.assert_close(v, plain_direction(g, K, 3.0))
        torch.testing.assert_close(v, 0.25 * g)


def test_target_hvp_matches_the_dense_hessian():
    H = spd(D, 1e2)
    b = torch.randn(D, dtype=F64)

    def log_joint(Z):
        return -0.5 * ((Z @ H) * Z).sum(-1) + Z @ b - 0.1 * Z.pow(4).sum(-1)

    z = torch.randn(D, dtype=F64)
    hvp = target_hvp(log_joint, z[None])
    exact = H + torch.diag(1.2 * z.square())
    v = torch.randn(D, dtype=F64)
    torch.testing.assert_close(hvp(v), exact @ v)
    affine = target_hvp(lambda Z: Z @ b, z[None])
    assert torch.equal(affine(v), torch.zeros_like(v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cg_direction_accumulates_in_float32(dtype):
    H = spd(D, 10.0).float()
    K = random_factor("diagonal").to(dtype)
    g = (1e4 * torch.randn(D, generator=torch.Generator().manual_seed(0))).to(dtype)
    v = trust_region_cg(lambda x: H @ x, g, K, iters=2 * D, rtol=1e-5)  # gᵀKKᵀg ≈ 1e9: overflows
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    ref = torch.linalg.solve(H.double(), g.double())
    torch.testing.assert_close(v.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_mean_line_search_is_float32_safe_for_a_float16_factor():
    """Old code: ``slope`` overflowed to inf in float16 and the step went uncapped."""
    H = spd(D, 1e2)
    K64 = random_factor("diagonal").scale(30.0)
    g64 = 300 * torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=F64)

    def estimate(K, g):
        A = K.to_dense().double()
        C = A.T @ H @ A
        wide = torch.promote_types(g.dtype, torch.float32)  # the estimator's statistics
        return Estimate(engine.NGDStats(g, K.project(C.to(K.dtype))), g.new_zeros(2),
                        lambda u: u.to(wide) @ C.to(wide) @ u.to(wide))

    cfg = NGDConfig(lr=1.0)
    ref = _mean_line_search(engine.init(torch.zeros(D, dtype=F64), K64),
                            estimate(K64, g64), cfg).beta_mean
    assert ref < 1e-2  # the cap is active
    K16, g16 = K64.to(torch.float16), g64.to(torch.float16)
    state = engine.init(torch.zeros(D, dtype=torch.float16), K16)
    got = _mean_line_search(state, estimate(K16, g16), cfg).beta_mean
    assert got == pytest.approx(ref, rel=2e-2)


def test_engine_step_uses_cg_only_with_hvp():
    H = spd(D, 1e4)
    K = make_structure("diagonal", D, dtype=F64).from_dense(torch.diag(H.diagonal().rsqrt()))
    state = engine.init(torch.zeros(D, dtype=F64), K)
    g = -H @ torch.ones(D, dtype=F64)
    curv = K.project(K.to_dense() @ H @ K.to_dense())
    cfg = NGDConfig(lr=1.0, lr_mean=1.0, mean_cg_iters=4 * D, mean_cg_tol=1e-13)
    newton = engine.step(state, engine.NGDStats(g, curv, lambda v: H @ v), cfg)
    torch.testing.assert_close(newton.loc, torch.ones(D, dtype=F64), rtol=1e-8, atol=1e-8)
    plain = engine.step(state, engine.NGDStats(g, curv), cfg)
    torch.testing.assert_close(plain.loc, -(K.to_dense() ** 2) @ g)


def test_config_validates_mean_step_fields():
    for bad in ({"mean_cg_iters": -1}, {"mean_cg_iters": 1.5}, {"mean_cg_tol": 1.0},
                {"mean_trust_region": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NGDConfig(**bad)


def test_default_step_sizes_per_structure():
    assert make_structure("diagonal", 4).default_step_size() == 1.0
    toeplitz = make_structure("triangular_toeplitz", 4)
    assert toeplitz.default_step_size() == 0.5 and not toeplitz.is_newton()
    kron = make_structure("kronecker", 6, dims=(2, 3), factors=("dense", "triangular_toeplitz"))
    assert kron.default_step_size() == 0.5 and not kron.is_newton()
    sites = make_structure("block_sites", 5, blocks=[
        {"name": "dense", "dim": 2, "options": {}},
        {"name": "kronecker", "dim": 3, "options": {"dims": (1, 3)}}])
    assert sites.default_step_size() == 0.9 and not sites.is_newton()
    assert make_structure("low_rank_diagonal", 4, rank=1).is_newton()
    for estimator in ("hessian", "stein"):
        cfg = default_config(estimator, toeplitz)
        cfg = cfg if isinstance(cfg, NGDConfig) else cfg(0)
        assert cfg.lr == 0.5 and cfg.beta_mean == 1.0 and cfg.mean_cg_iters > 0
    assert isinstance(default_config("stein"), StructureDefault)
    with pytest.raises(TypeError, match="structure"):
        default_config("stein", "diagonal")


def test_two_stage_decouples_the_mean_schedule():
    sched = TwoStage(1.0, 10, 1.0, 10, lr_mean=1.0, mean_decay_steps=100)
    assert sched(5).lr == 1.0 and sched(5).beta_mean == 1.0
    assert sched(100).lr == pytest.approx(0.1) and sched(110).beta_mean == pytest.approx(0.5)
    assert TwoStage(1.0, 10, 1.0, 10)(100).beta_mean == pytest.approx(0.1)  # follows the factor
    with pytest.raises(ValueError, match="mean_decay_steps"):
        TwoStage(mean_decay_steps=0)


def test_toeplitz_default_is_stable_where_a_newton_step_oscillates():
    """The linearized factor map at the optimum (exact curvature, condition-1e4 target): step 1
    has spectral radius > 1 for Toeplitz; the default step size is a contraction."""
    H = spd(D, 1e4, seed=1)
    K = make_structure("triangular_toeplitz", D, dtype=F64)
    cfg = NGDConfig(lr=0.3, lr_mean=0.0)
    state = engine.init(torch.zeros(D, dtype=F64), K)
    for _ in range(400):  # converge with a small step
        A = state.factor.to_dense()
        state = engine.step(state, engine.NGDStats(torch.zeros(D, dtype=F64),
                                                   K.project(A.T @ H @ A)), cfg)
    key = next(iter(state.factor.tensors()))
    t_opt = state.factor.tensors()[key]

    def radius(lr):
        def F(t):
            Kt = K.from_tensors({key: t}, K.spec())
            A = Kt.to_dense()
            nu = Kt.project(0.5 * (A.T @ H @ A + A.T @ H.T @ A)).add(
                Kt.coord_identity(), alpha=-1).scale(0.5)
            new, _ = engine.factor_step(Kt, Kt.zeros_like(), nu, lr=lr, alpha=0.0,
                                        trust_region=None)
            return new.tensors()[key]
        J = torch.autograd.functional.jacobian(F, t_opt)
        return float(torch.linalg.eigvals(J).abs().max())

    assert radius(1.0) > 1.0
    assert radius(K.default_step_size()) < 0.95


def test_structure_default_keeps_user_hyper_parameters():
    """The Pyro path replaces the default's ``base`` (momentum, options): resolution keeps it."""
    import dataclasses

    default = default_config("stein")
    custom = dataclasses.replace(default, base=default.base.replace(momentum=0.3, lr_mean=0.5))
    cfg = custom.resolve(make_structure("triangular_toeplitz", 3))(50)
    assert (cfg.lr, cfg.momentum, cfg.beta_mean) == (pytest.approx(0.1), 0.3, 0.5)
    assert cfg.mean_cg_iters == default.base.mean_cg_iters
    assert TwoStage(1.0, 10, 1.0, 10, NGDConfig(lr_mean=1.0))(100).beta_mean == 1.0
    with pytest.raises(TypeError, match="base"):
        StructureDefault("stein", base="fast")
