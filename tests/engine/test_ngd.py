"""The engine step: closed forms, dense references, closure, invariants (MATH §2.2, §2.5, §2.6)."""

from __future__ import annotations

import io

import pytest
import torch

from structvi import engine
from structvi.engine import NGDConfig, NGDState, NGDStats
from structvi.structures import make_structure
from structvi.testing import assert_close

F64 = torch.float64


def spd(d: int, gen: torch.Generator, lo: float = 0.5, hi: float = 5.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    ev = torch.linspace(lo, hi, d, dtype=F64)
    return Q @ torch.diag(ev) @ Q.T


def exact_stats(state: NGDState, H: torch.Tensor, b: torch.Tensor) -> NGDStats:
    """Exact statistics of the quadratic f(z) = ½ zᵀHz − bᵀz: E[∇f] = Hμ − b, Ē = H."""
    K = state.factor
    Kd = K.to(F64).to_dense()
    curv = K.project((Kd.T @ H @ Kd).to(K.dtype))
    return NGDStats((H @ state.loc.to(F64) - b).to(state.loc.dtype), curv)


def test_stationary_point_does_not_move_bit_for_bit(structure_case, float_dtype, gen):
    """Π̂(KᵀĒK) = τ Π̂(I) and g = 0 ⇒ K and μ unchanged exactly (MATH §2.2)."""
    K, _ = structure_case.random_group(gen)
    K = K.to(float_dtype)
    loc = torch.randn(structure_case.dim, generator=gen, dtype=F64).to(float_dtype)
    state = engine.init(loc, K)
    tau = 0.7
    stats = NGDStats(torch.zeros_like(loc), K.coord_identity().scale(tau))
    for retraction in ("quadratic", "first_order", "expm"):
        config = NGDConfig(lr=0.5, momentum=0.9, retraction=retraction, temperature=tau)
        new = engine.step(state, stats, config)
        assert torch.equal(new.loc, loc)
        for key, t in K.tensors().items():
            assert torch.equal(new.factor.tensors()[key], t), (retraction, key)


def test_structured_step_equals_dense_step_then_projection(structure_case, gen):
    """One structured step == the dense formula with the oracle projection (float64)."""
    if not structure_case.orthogonal:
        pytest.skip("Kronecker retracts factor-wise; its step is checked in test_kronecker.py")
    d = structure_case.dim
    K, Kd = structure_case.random_group(gen)
    m0, M0 = structure_case.random_coord(gen)
    H = spd(d, gen)
    b = torch.randn(d, generator=gen, dtype=F64)
    loc = torch.randn(d, generator=gen, dtype=F64)
    state = engine.init(loc, K)._replace(factor_momentum=m0)
    config = NGDConfig(lr=0.3, momentum=0.5, lr_mean=0.2, momentum_mean=0.1, trust_region=None,
                       temperature=0.9)
    stats = NGDStats(H @ loc - b, K.inner_project(torch.linalg.cholesky(H)))
    new = engine.step(state, stats, config)
    # dense reference
    nu = 0.5 * (structure_case.oracle_project(Kd.T @ H @ Kd)
                - 0.9 * structure_case.oracle_project(torch.eye(d, dtype=F64)))
    m = 0.5 * M0 + nu
    X = -0.3 * m
    K_ref = Kd @ (torch.eye(d, dtype=F64) + X + 0.5 * X @ X)
    loc_ref = loc - 0.2 * K_ref @ K_ref.T @ (H @ loc - b)
    assert_close(new.factor.to_dense(), K_ref, 1e-12, "K")
    assert_close(new.factor_momentum.to_dense(), m, 1e-12, "m_K")
    assert_close(new.loc, loc_ref, 1e-12, "μ")


@pytest.mark.parametrize("retraction", ["quadratic", "expm"])
def test_factor_form_agrees_with_natural_parameters_to_second_order(retraction, gen):
    """‖S_new − [(1−βτ)S + βĒ]‖ = O(β²) (MATH §2.2): error ratio ≈ 100 per 10× smaller β."""
    d = 5
    Kd = torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=gen, dtype=F64)
    H = spd(d, gen)
    errors = []
    for beta in (1e-2, 1e-3):
        K = make_structure("dense", d, dtype=F64).from_dense(Kd)
        state = engine.init(torch.zeros(d, dtype=F64), K)
        stats = NGDStats(torch.zeros(d, dtype=F64), K.project(Kd.T @ H @ Kd))
        new = engine.step(state, stats, NGDConfig(lr=beta, retraction=retraction,
                                                  trust_region=None))
        Kn = new.factor.to_dense()
        S_new = torch.linalg.inv(Kn @ Kn.T)
        S_nat = (1 - beta) * torch.linalg.inv(Kd @ Kd.T) + beta * H
        errors.append(float((S_new - S_nat).abs().max()))
    ratio = errors[0] / errors[1]
    assert 70 < ratio < 130, (errors, ratio)


def test_first_order_step_is_only_first_order_accurate(gen):
    """The quadratic term matters: first_order differs from quadratic at O(β²)."""
    d = 4
    K = make_structure("dense", d, dtype=F64)
    H = spd(d, gen)
    stats = NGDStats(torch.zeros(d, dtype=F64), K.project(H))
    state = engine.init(torch.zeros(d, dtype=F64), K)
    outs = {r: engine.step(state, stats, NGDConfig(lr=0.1, retraction=r, trust_region=None))
            for r in ("quadratic", "first_order")}
    diff = (outs["quadratic"].factor.to_dense() - outs["first_order"].factor.to_dense())
    nu = 0.5 * (H - torch.eye(d, dtype=F64))
    assert_close(diff, 0.5 * 0.01 * nu @ nu, 1e-12, "½β²ν²")


def test_exact_gaussian_target_dense_converges(gen):
    """Dense K with exact curvature: Σ → H⁻¹, μ → H⁻¹b (MATH §2.6, stationary point)."""
    d = 6
    H, b = spd(d, gen, 1.0, 50.0), torch.randn(d, generator=gen, dtype=F64)
    state = engine.init(torch.zeros(d, dtype=F64), make_structure("dense", d, dtype=F64))
    for _ in range(30):
        state = engine.step(state, exact_stats(state, H, b), NGDConfig(lr=1.0))
    Kd = state.factor.to_dense()
    assert_close(Kd @ Kd.T, torch.linalg.inv(H), 1e-10, "Σ")
    assert_close(state.loc, torch.linalg.solve(H, b), 1e-10, "μ")


def test_trust_region_is_required_on_a_stiff_target(gen):
    """Without the cap the quadratic retraction blows up from K = I (MATH §2.6); with it, it converges."""
    d = 8
    H, b = spd(d, gen, 5.0, 4000.0), torch.randn(d, generator=gen, dtype=F64)

    def run(trust_region):
        state = engine.init(torch.zeros(d, dtype=F64), make_structure("dense", d, dtype=F64))
        for _ in range(25):
            state = engine.step(state, exact_stats(state, H, b),
                                NGDConfig(lr=1.0, trust_region=trust_region))
        Kd = state.factor.to_dense()
        return float((Kd @ Kd.T @ H - torch.eye(d, dtype=F64)).abs().max())

    assert run(1.0) < 1e-8
    bad = run(None)
    assert not (bad < 1e-2)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_closure_over_many_random_steps(structure_case, factor_dtype, gen):
    """1,000 random steps: entries outside the pattern stay exactly zero; log|det K| finite."""
    d = structure_case.dim
    K = structure_case.make(dtype=factor_dtype)
    state = engine.init(torch.zeros(d, dtype=factor_dtype), K)
    config = NGDConfig(lr=2.0, momentum=0.5)
    for _ in range(1000):
        X = (0.5 * torch.randn(d, 2, generator=gen)).to(factor_dtype)
        stats = NGDStats(torch.zeros(d, dtype=factor_dtype), state.factor.inner_project(X))
        state = engine.step(state, stats, config)
    dense = state.factor.to(F64).to_dense()
    assert (dense[~structure_case.mask] == 0).all()
    assert state.factor.dtype == factor_dtype
    assert torch.isfinite(state.factor.to(F64).logabsdet())


def test_quadratic_retraction_keeps_factor_invertible_for_huge_steps(structure_case, gen):
    m, _ = structure_case.random_coord(gen)
    K, _ = structure_case.random_group(gen)
    for scale in (10.0, 1e3):
        out = K.retract(m.scale(scale), "quadratic")
        assert torch.isfinite(out.logabsdet())


def test_engine_step_is_inverse_free(structure_case, gen, forbid_decompositions):
    d = structure_case.dim
    K, _ = structure_case.random_group(gen)
    X = torch.randn(d, 3, generator=gen, dtype=F64)
    stats = NGDStats(torch.randn(d, generator=gen, dtype=F64), K.inner_project(X))
    for retraction in ("quadratic", "first_order", "expm"):
        engine.step(engine.init(torch.zeros(d, dtype=F64), K), stats,
                    NGDConfig(lr=0.5, momentum=0.9, retraction=retraction))


def test_bf16_step_contract(structure_case, gen):
    """bf16 factor and mean: dtype kept, and the *step* (new − old) close to the float64 step
    from the same bf16 start (no trust-region cap, which would hide ``lr``): within 10 % of the
    step and within 40 % of its distance to the float64 step at ``lr/2``, so the test tells
    ``lr`` from ``lr/2`` (the old test allowed 0.05 absolute on ``K``: it could not)."""
    d = structure_case.dim
    K, _ = structure_case.random_group(gen)
    Kb = K.to(torch.bfloat16)
    X = torch.randn(d, 3, generator=gen, dtype=F64)
    g = torch.randn(d, generator=gen, dtype=F64)
    K64 = Kb.to(F64)
    stats64 = NGDStats(g, K64.inner_project(X))

    def ref_step(lr):
        new = engine.step(engine.init(torch.zeros(d, dtype=F64), K64), stats64,
                          NGDConfig(lr=lr, trust_region=None))
        return new.factor.to_dense() - K64.to_dense(), new.loc

    low = engine.step(engine.init(torch.zeros(d, dtype=torch.bfloat16), Kb),
                      NGDStats(g.to(torch.bfloat16), Kb.inner_project(X.to(torch.bfloat16))),
                      NGDConfig(lr=0.5, trust_region=None))
    assert low.factor.dtype == torch.bfloat16 and low.loc.dtype == torch.bfloat16
    dK_low = low.factor.to(F64).to_dense() - K64.to_dense()
    (dK, dmu), (dK_half, dmu_half) = ref_step(0.5), ref_step(0.25)
    # tolerance: 10 % of the step, and at most 40 % of the distance to the lr/2 step, so a
    # bf16 step that passes is closer to the lr step than to the lr/2 step
    tol_K = min(0.1 * float(dK.abs().max()), 0.4 * float((dK - dK_half).abs().max()))
    tol_mu = min(0.1 * float(dmu.abs().max()), 0.4 * float((dmu - dmu_half).abs().max()))
    err_K = float((dK_low - dK).abs().max())
    err_mu = float((low.loc.double() - dmu).abs().max())
    assert err_K <= tol_K, f"bf16 factor step off by {err_K:.3g} (tolerance {tol_K:.3g})"
    assert err_mu <= tol_mu, f"bf16 mean step off by {err_mu:.3g} (tolerance {tol_mu:.3g})"


def test_momentum_dtype_is_independent(gen):
    K = make_structure("diagonal", 5, dtype=torch.bfloat16)
    state = engine.init(torch.zeros(5, dtype=torch.bfloat16), K, momentum_dtype=torch.float32)
    stats = NGDStats(torch.ones(5, dtype=torch.bfloat16), K.coord_identity().scale(2.0))
    new = engine.step(state, stats, NGDConfig(lr=0.1, momentum=0.9))
    assert new.factor.dtype == torch.bfloat16
    assert new.factor_momentum.dtype == torch.float32 and new.loc_momentum.dtype == torch.float32


def test_state_dict_roundtrip_weights_only(structure_case, gen):
    K, _ = structure_case.random_group(gen)
    state = engine.init(torch.randn(structure_case.dim, generator=gen, dtype=F64), K)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = NGDState.from_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(loaded.loc, state.loc) and loaded.step == state.step
    assert torch.equal(loaded.factor.to_dense(), K.to_dense())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"momentum": 1.0}, "momentum must be"),
        ({"momentum": -0.1}, "momentum must be"),
        ({"retraction": "cayley"}, "retraction must be one of"),
        ({"trust_region": 0.0}, "trust_region must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"lr_mean": -1.0}, "lr_mean must be"),
    ],
)
def test_config_errors_name_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NGDConfig(**kwargs)


def test_step_rejects_mismatched_statistics():
    K = make_structure("diagonal", 3, dtype=F64)
    state = engine.init(torch.zeros(3, dtype=F64), K)
    with pytest.raises(ValueError, match="stats.grad must have shape"):
        engine.step(state, NGDStats(torch.zeros(4, dtype=F64), K.coord_identity()), NGDConfig())
    other = make_structure("dense", 3, dtype=F64)
    with pytest.raises(ValueError, match="stats.curvature"):
        engine.step(state, NGDStats(torch.zeros(3, dtype=F64), other), NGDConfig())
    with pytest.raises(ValueError, match="loc must have shape"):
        engine.init(torch.zeros(2, dtype=F64), K)
