"""Kronecker-specific tests: options, the product/sum kinds, factor-wise retractions, and the
engine on Kronecker-structured targets (MATH §2.6 last paragraph, §3.2). The generic operation
checks run in test_conformance.py through the cases in cases.py."""

from __future__ import annotations

import io

import pytest
import torch

from structvi.engine import NGDConfig, NGDState, NGDStats, init, step
from structvi.structures import make_structure, structure_from_spec
from structvi.structures.kronecker import Kronecker
from structvi.testing import assert_close, state_roundtrip
from tests.structures.cases import KRONECKER_CASES, kronecker_case, partial_traces

F64 = torch.float64
CASE_IDS = [c.id for c in KRONECKER_CASES]


def rand_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    B = torch.randn(n, n, generator=gen, dtype=F64)
    return B @ B.T / n + 0.5 * torch.eye(n, dtype=F64)


def dense_factors(K: Kronecker) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(f.to_dense().to(F64) for f in K.factors)


def h_dense(M: torch.Tensor, retraction: str) -> torch.Tensor:
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    return eye + M + (0.5 * M @ M if retraction == "quadratic" else 0.0)


# ------------------------------------------------------------------ options and specs
@pytest.mark.parametrize(
    ("dim", "options", "error", "match"),
    [
        (13, {"dims": (3, 4)}, ValueError, r"mismatched Kronecker shapes.*dims=\(3, 4\).*dim=13"),
        (12, {"dims": (3, 4), "factors": ("kronecker", "dense")}, ValueError,
         "cannot be 'kronecker'"),
        (12, {"dims": (3, 4), "factors": ("dense", "nope")}, ValueError,
         r"factors\[1\].*unknown structure 'nope'; expected one of .*'diagonal'"),
        (12, {"dims": (3, 4), "factors": ("dense", ("block_diagonal", {"block_size": 9}))},
         ValueError, r"factors\[1\] \(dim 4\).*block_size must be in \[1, 4\]"),
        (12, {"dims": (3, 4), "factors": (("dense", {"rank": 2}), "dense")}, TypeError,
         r"factors\[0\].*dense takes no options"),
        (12, {"dims": (3, 4), "factors": ("dense", ("diagonal", 2))}, ValueError,
         r"factors\[1\] must be a structure name or \(name, \{options\}\)"),
        (12, {"dims": (3, 4), "factors": ("dense",)}, ValueError, "factors must be a pair"),
        (12, {}, TypeError, r"dims=\(d1, d2\) is required"),
        (12, {"dims": (12,)}, ValueError, "dims must be a pair"),
        (12, {"dims": (0, 12)}, ValueError, r"dims\[0\] must be >= 1"),
        (12, {"dims": (3.0, 4)}, ValueError, r"dims\[0\] must be an integer"),
        (12, {"dims": (3, 4), "kind": "outer"}, ValueError, "kind must be one of"),
        (12, {"dims": (3, 4), "block_size": 2}, TypeError, r"unknown option\(s\) \['block_size'\]"),
    ],
    ids=["dims-product", "nested", "unknown-name", "factor-option-value", "factor-option-name",
         "factor-spec-shape", "one-factor", "no-dims", "dims-length", "dims-zero", "dims-float",
         "kind", "unknown-option"],
)
def test_option_errors(dim, options, error, match):
    with pytest.raises(error, match=match):
        make_structure("kronecker", dim, **options)


def test_constructor_errors():
    with pytest.raises(ValueError, match="identity.*product-kind|product-kind element"):
        make_structure("kronecker", 12, dims=(3, 4), kind="sum")
    with pytest.raises(ValueError, match="sum-kind element"):
        make_structure("kronecker", 12, dims=(3, 4), kind="product", init="zeros")
    K = make_structure("kronecker", 12, dims=(3, 4), dtype=F64)
    with pytest.raises(ValueError, match="non-Kronecker Structure"):
        Kronecker.from_factors(K, K)
    d3, d4 = make_structure("dense", 3, dtype=F64), make_structure("dense", 4)
    with pytest.raises(ValueError, match="share dtype"):
        Kronecker.from_factors(d3, d4)
    tensors = K.tensors()
    tensors["2.matrix"] = tensors.pop("1.matrix")
    with pytest.raises(ValueError, match=r"keys \['0.matrix', '1.matrix'\]"):
        Kronecker(12, tensors, **K.options)


def test_spec_is_normalized_and_round_trips_both_kinds(gen):
    s, _ = KRONECKER_CASES[1].random_group(gen)
    m, _ = KRONECKER_CASES[1].random_coord(gen)
    assert s.spec() == {"name": "kronecker", "dim": 6, "options": {
        "dims": [2, 3], "kind": "product",
        "factors": [{"name": "lower_triangular", "options": {}},
                    {"name": "block_diagonal", "options": {"block_size": 2}}]}}
    assert sorted(s.tensors()) == ["0.matrix", "1.blocks", "1.last"]
    for x in (s, m):
        loaded = state_roundtrip(x)
        assert loaded.kind == x.kind and loaded.spec() == x.spec()
        assert_close(loaded.to_dense(), x.to_dense(), 0.0, f"{x.kind} round trip")
    spec = s.spec()
    spec["options"]["dims"][0] = 99  # spec() is a copy
    assert s.dims == (2, 3)


def test_engine_state_dict_round_trip(gen):
    s, _ = KRONECKER_CASES[0].random_group(gen)
    state = init(torch.randn(12, generator=gen, dtype=F64), s)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = NGDState.from_state_dict(torch.load(buf, weights_only=True))
    assert (loaded.factor.kind, loaded.factor_momentum.kind) == ("product", "sum")
    assert_close(loaded.factor.to_dense(), s.to_dense(), 0.0, "factor")


# ------------------------------------------------------------------ kinds
def test_row_major_convention(gen):
    s, A = KRONECKER_CASES[0].random_group(gen)
    K1, K2 = dense_factors(s)
    X = torch.randn(3, 4, generator=gen, dtype=F64)
    assert_close(s.matmul(X.reshape(-1)), (K1 @ X @ K2.T).reshape(-1), 1e-14, "K vec(X)")
    assert_close(A, torch.kron(K1, K2), 0.0, "torch.kron order")


def test_solve_is_factor_wise_and_rejects_sums(gen):
    """``(K₁ ⊗ K₂)⁻¹ vec(X) = vec(K₁⁻¹ X K₂⁻ᵀ)``; a sum-kind coordinate element is never inverted."""
    s, _ = KRONECKER_CASES[0].random_group(gen)
    m, _ = KRONECKER_CASES[0].random_coord(gen)
    K1, K2 = dense_factors(s)
    X = torch.randn(3, 4, generator=gen, dtype=F64)
    expected = torch.linalg.solve(K1, torch.linalg.solve(K2, X.T).T)
    assert_close(s.solve(X.reshape(-1)), expected.reshape(-1), 1e-12, "K⁻¹ vec(X)")
    with pytest.raises(ValueError, match=r"solve is defined for a product-kind .* got a sum-kind"):
        m.solve(X.reshape(-1))


def test_kind_rules(gen):
    s, A = KRONECKER_CASES[0].random_group(gen)
    m, M = KRONECKER_CASES[0].random_coord(gen)
    with pytest.raises(ValueError, match="not a Kronecker product"):
        s.add(s)
    with pytest.raises(ValueError, match="not a Kronecker sum"):
        m.compose(m)
    with pytest.raises(ValueError, match="spec"):
        s.compose(m)
    with pytest.raises(ValueError, match="sum-kind coordinate element"):
        s.retract(s)
    with pytest.raises(ValueError, match="product-kind group element"):
        m.retract(m)
    with pytest.raises(ValueError, match="product-kind"):
        m.logabsdet()
    with pytest.raises(ValueError, match="product-kind"):
        m.inner_project_self()
    scaled = s.scale(-2.0)
    assert_close(scaled.to_dense(), -2.0 * A, 1e-15, "scale product")
    assert torch.equal(scaled.factors[1].to_dense(), s.factors[1].to_dense())
    assert (s.identity_like().kind, s.zeros_like().kind, s.coord_identity().kind) == \
        ("product", "sum", "sum")
    assert_close(s.coord_identity().to_dense(), torch.eye(12, dtype=F64), 0.0, "Π̂(I) = I")
    assert_close(s.max_abs(), A.abs().max(), 1e-15, "max|K₁ ⊗ K₂|")


@pytest.mark.parametrize("case", KRONECKER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["group", "coord"])
def test_from_dense_round_trip(case, kind, gen):
    s, A = (case.random_group if kind == "group" else case.random_coord)(gen)
    assert_close(s.from_dense(A).to_dense(), A, 1e-14, f"from_dense({kind})")


def test_sum_inf_norm_with_cancelling_diagonals():
    M1 = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=F64)
    M2 = torch.tensor([[-1.0, 0.0, 0.125], [0.0, -2.0, 0.0], [3.0, 0.0, -1.0]], dtype=F64)
    m = Kronecker.from_factors(make_structure("dense", 2, dtype=F64).from_dense(M1),
                               make_structure("dense", 3, dtype=F64).from_dense(M2), "sum")
    dense = torch.kron(M1, torch.eye(3, dtype=F64)) + torch.kron(torch.eye(2, dtype=F64), M2)
    assert_close(m.inf_norm(), dense.abs().sum(-1).max(), 0.0, "‖M₁⊗I + I⊗M₂‖∞")
    assert_close(m.diagonal(), dense.diagonal(), 0.0, "diag")


def test_projection_is_partial_traces(gen):
    """Π̂(A ⊗ G) for dense factors: (tr̄(G)·A) ⊗ I + I ⊗ tr̄(A)·(G − tr̄(G) I)."""
    A, G = rand_spd(3, gen), rand_spd(4, gen)
    P = make_structure("kronecker", 12, dims=(3, 4), dtype=F64).project(torch.kron(A, G))
    P1, P2 = dense_factors(P)
    assert_close(P1, G.diagonal().mean() * A, 1e-14, "M₁")
    eye4 = torch.eye(4, dtype=F64)
    assert_close(P2, A.diagonal().mean() * (G - G.diagonal().mean() * eye4), 1e-14, "M₂")
    assert abs(float(P.to_dense().trace() - torch.kron(A, G).trace())) < 1e-12  # trace kept
    T2, T1 = partial_traces(torch.kron(A, G), 3, 4)
    assert_close(T2, P1, 1e-14, "oracle tr₂")


# ------------------------------------------------------------------ retractions
@pytest.mark.parametrize("case", KRONECKER_CASES, ids=CASE_IDS)
def test_expm_retraction_is_exact(case, gen):
    """exp(M₁ ⊗ I + I ⊗ M₂) = exp(M₁) ⊗ exp(M₂): the factor-wise retraction is exact."""
    s, A = case.random_group(gen)
    m, M = case.random_coord(gen)
    m, M = m.scale(3.0), 3.0 * M  # ‖M‖∞ > ½, so scaling and squaring is exercised
    expected = A @ torch.linalg.matrix_exp(M)
    assert_close(s.retract(m, "expm").to_dense(), expected, 1e-12, "K exp(M)")


@pytest.mark.parametrize("case", KRONECKER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("retraction", ["quadratic", "first_order"])
def test_truncated_retraction_is_factor_wise(case, retraction, gen):
    """K h(M) := (K₁ h(M₁)) ⊗ (K₂ h(M₂)) — the INGD convention, not h(M₁ ⊗ I + I ⊗ M₂)."""
    s, _ = case.random_group(gen)
    m, M = case.random_coord(gen)
    (K1, K2), (M1, M2) = dense_factors(s), dense_factors(m)
    expected = torch.kron(K1 @ h_dense(M1, retraction), K2 @ h_dense(M2, retraction))
    out = s.retract(m, retraction)
    assert out.kind == "product"
    assert_close(out.to_dense(), expected, 1e-13, f"K h(M), {retraction}")


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("second", ["dense", "diagonal"])
def test_engine_step_is_ingd_per_factor_with_the_gauge_fixed(second, gen):
    """Ē = A ⊗ G: ν₁ = ½[tr̄(K₂ᵀGK₂)·K₁ᵀAK₁ − τI] (INGD), ν₂ = ½[B − tr̄(B) I] with
    B = tr̄(K₁ᵀAK₁)·Π̂₂(K₂ᵀGK₂): the scale is moved by the first factor only."""
    case = kronecker_case("dense", 3, {}, second, 4, {})
    s, Kd = case.random_group(gen)
    K1, K2 = dense_factors(s)
    A, G = rand_spd(3, gen), rand_spd(4, gen)
    X = torch.kron(torch.linalg.cholesky(A), torch.linalg.cholesky(G))  # Ē = X Xᵀ = A ⊗ G
    curvature = s.inner_project(X)
    assert_close(curvature.to_dense(), case.oracle_project(Kd.T @ torch.kron(A, G) @ Kd), 1e-13,
                 "Π̂(KᵀĒK)")
    loc, grad = torch.randn(12, generator=gen, dtype=F64), torch.randn(12, generator=gen, dtype=F64)
    tau, beta = 0.7, 0.05
    config = NGDConfig(lr=beta, momentum=0.0, trust_region=None, temperature=tau)
    new = step(init(loc, s), NGDStats(grad, curvature), config)

    a, b = K1.T @ A @ K1, K2.T @ G @ K2
    b = b if second == "dense" else torch.diag(b.diagonal())
    nu1 = 0.5 * (b.diagonal().mean() * a - tau * torch.eye(3, dtype=F64))
    B = a.diagonal().mean() * b
    nu2 = 0.5 * (B - B.diagonal().mean() * torch.eye(4, dtype=F64))
    got1, got2 = dense_factors(new.factor_momentum)
    assert_close(got1, nu1, 1e-13, "ν₁")
    assert_close(got2, nu2, 1e-13, "ν₂")
    K_new = torch.kron(K1 @ h_dense(-beta * nu1, "quadratic"),
                       K2 @ h_dense(-beta * nu2, "quadratic"))
    assert_close(new.factor.to_dense(), K_new, 1e-13, "K h(−βν)")
    assert_close(new.loc, loc - beta * K_new @ K_new.T @ grad, 1e-13, "μ − β K Kᵀ g")


@pytest.mark.parametrize("case", KRONECKER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("retraction", ["quadratic", "first_order", "expm"])
def test_stationary_point_does_not_move(case, retraction, gen):
    """Π̂(KᵀĒK) = τΠ̂(I) and g = 0 ⇒ ν = 0, h(0) = I: K and μ unchanged bit for bit."""
    s, _ = case.random_group(gen)
    loc = torch.randn(case.dim, generator=gen, dtype=F64)
    tau = 0.7
    stats = NGDStats(torch.zeros_like(loc), s.coord_identity().scale(tau))
    config = NGDConfig(lr=0.5, momentum=0.9, retraction=retraction, temperature=tau)
    state = init(loc, s)
    for _ in range(3):
        state = step(state, stats, config)
    assert torch.equal(state.loc, loc)
    for key, t in s.tensors().items():
        assert torch.equal(state.factor.tensors()[key], t), key


@pytest.mark.parametrize(
    ("factors", "block_second"),
    [(("dense", "dense"), False), (("dense", "diagonal"), False),
     (("lower_triangular", ("block_diagonal", {"block_size": 2})), True)],
    ids=["dense-dense", "dense-diagonal", "lower_triangular-block_diagonal"],
)
def test_engine_recovers_kronecker_gaussian(factors, block_second, gen):
    """Target N(μ*, (H₁ ⊗ H₂)⁻¹) inside the family, exact statistics: K Kᵀ → H⁻¹, μ → μ*."""
    d1, d2 = 3, 4
    H1, H2 = rand_spd(d1, gen), rand_spd(d2, gen)
    if factors[1] == "diagonal":
        H2 = torch.diag(H2.diagonal())
    if block_second:
        H2 = H2 * torch.block_diag(torch.ones(2, 2), torch.ones(2, 2)).to(F64)
    H = torch.kron(H1, H2)
    X = torch.kron(torch.linalg.cholesky(H1), torch.linalg.cholesky(H2))
    target = torch.randn(d1 * d2, generator=gen, dtype=F64)
    K = make_structure("kronecker", d1 * d2, dims=(d1, d2), factors=factors, dtype=F64)
    state = init(torch.zeros_like(target), K)
    config = NGDConfig(lr=1.0)  # the gauge is fixed: β = 1 is the Newton-like step
    for _ in range(40):
        stats = NGDStats(H @ (state.loc - target), state.factor.inner_project(X))
        state = step(state, stats, config)
    Kd = state.factor.to_dense()
    assert_close(Kd @ Kd.T @ H, torch.eye(d1 * d2, dtype=F64), 1e-10, "Σ H = I")
    assert_close(state.loc, target, 1e-10, "μ = μ*")


def test_structure_from_spec_builds_kronecker():
    K = make_structure("kronecker", 6, dims=(2, 3), factors=("diagonal", "dense"), dtype=F64)
    again = structure_from_spec(K.tensors(), K.spec())
    assert isinstance(again, Kronecker) and again.spec() == K.spec()
