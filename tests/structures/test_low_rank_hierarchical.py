"""Structure-specific tests for ``low_rank_diagonal`` and ``hierarchical``.

Option errors, edge sizes (empty blocks) through the conformance checks, closure and
invertibility under many large quadratic retractions in float32/bfloat16 (MATH §7.2, §7.12),
``expm`` against ``torch.linalg.matrix_exp`` and the structured optimum (MATH §7.13).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from structvi import engine
from structvi._forbid import ForbidDecompositions
from structvi.engine import NGDConfig, NGDStats, apply_retraction
from structvi.structures import make_structure
from structvi.testing import assert_close, pattern_case, tol
from tests.structures import test_conformance as conformance
from tests.structures.cases import hierarchical_mask, low_rank_diagonal_mask

F64 = torch.float64


def low_rank_case(d, k):
    return pattern_case("low_rank_diagonal", d, low_rank_diagonal_mask(d, k), rank=k)


def hier_case(d, k1, k2):
    return pattern_case("hierarchical", d, hierarchical_mask(d, k1, k2), k1=k1, k2=k2)


MAIN_CASES = [low_rank_case(7, 2), low_rank_case(2, 1), hier_case(8, 2, 3), hier_case(4, 1, 0)]

# Sizes the shared cases do not reach: empty A, B, c, D or E blocks.
EDGE_CASES = [
    low_rank_case(7, 6),          # one diagonal entry
    hier_case(5, 0, 2),           # no top rows
    hier_case(4, 2, 2),           # m = 0: no middle
    hier_case(3, 0, 0),           # diagonal
    hier_case(3, 3, 0),           # dense A only
    hier_case(3, 0, 3),           # dense E only
    hier_case(1, 0, 1),
    hier_case(6, 1, 1),
]

CONFORMANCE_CHECKS = sorted(
    name for name, fn in vars(conformance).items()
    if name.startswith("test_") and "structure_case" in inspect.signature(fn).parameters
)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "dim, options, error, match",
    [
        (7, {"rank": 7}, ValueError,
         r"rank must be in \[1, dim-1\] = \[1, 6\], got rank=7 for dim=7"),
        (7, {"rank": 0}, ValueError, r"rank must be >= 1, got rank=0"),
        (7, {"rank": -2}, ValueError, r"rank must be >= 1, got rank=-2"),
        (7, {"rank": 2.0}, ValueError, r"rank must be an integer, got rank=2.0"),
        (7, {"rank": True}, ValueError, r"rank must be an integer, got rank=True"),
        (1, {"rank": 1}, ValueError, r"got rank=1 for dim=1"),
        (7, {}, TypeError, r"requires the option rank"),
        (7, {"rank": 2, "k1": 1}, TypeError, r"only the option 'rank', got \['k1'\]"),
    ],
    ids=["rank=dim", "rank=0", "negative", "float", "bool", "dim=1", "missing", "unknown"],
)
def test_low_rank_diagonal_option_errors(dim, options, error, match):
    with pytest.raises(error, match=match):
        make_structure("low_rank_diagonal", dim, **options)


@pytest.mark.parametrize(
    "dim, options, error, match",
    [
        (8, {"k1": 5, "k2": 4}, ValueError,
         r"k1 \+ k2 must be <= dim, got k1=5, k2=4 \(k1 \+ k2 = 9\) for dim=8"),
        (8, {"k1": -1, "k2": 2}, ValueError, r"k1 must be >= 0, got k1=-1"),
        (8, {"k1": 2, "k2": -3}, ValueError, r"k2 must be >= 0, got k2=-3"),
        (8, {"k1": 1.5, "k2": 2}, ValueError, r"k1 must be an integer, got k1=1.5"),
        (8, {"k1": 2, "k2": "3"}, ValueError, r"k2 must be an integer, got k2='3'"),
        (8, {"k1": 2}, TypeError, r"requires the options k1 and k2.*missing \['k2'\]"),
        (8, {"k1": 2, "k2": 2, "rank": 1}, TypeError, r"got \['rank'\]"),
    ],
    ids=["k1+k2>dim", "k1<0", "k2<0", "k1 float", "k2 str", "missing", "unknown"],
)
def test_hierarchical_option_errors(dim, options, error, match):
    with pytest.raises(error, match=match):
        make_structure("hierarchical", dim, **options)


def test_hierarchical_k2_zero_is_low_rank_diagonal(gen):
    """Same dense matrix ⇒ same products, projections and log-determinant."""
    case = low_rank_case(7, 3)
    s, A = case.random_group(gen)
    h = make_structure("hierarchical", 7, dtype=F64, k1=3, k2=0).from_dense(A)
    X = torch.randn(7, 4, generator=gen, dtype=F64)
    assert_close(h.matmul(X), s.matmul(X), 1e-14, "K @ X")
    assert_close(h.inner_project(X).to_dense(), s.inner_project(X).to_dense(), 1e-14, "Π̂(KᵀXXᵀK)")
    assert_close(h.compose(h).to_dense(), s.compose(s).to_dense(), 1e-14, "K K")
    assert_close(h.logabsdet(), s.logabsdet(), 1e-14, "log|det K|")


# ---------------------------------------------------------------------- edge sizes
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.id)
def test_edge_sizes_conform(case, check, dtype, gen):
    """Every conformance check of test_conformance.py on sizes with empty blocks."""
    fn = getattr(conformance, check)
    available = {"structure_case": case, "dtype": dtype, "gen": gen, "ncols": 3}
    kwargs = {p: available.get(p) for p in inspect.signature(fn).parameters}
    if "forbid_decompositions" in kwargs:
        with ForbidDecompositions():
            fn(**kwargs)
    else:
        fn(**kwargs)


# ---------------------------------------------------------------------- closure
CLOSURE_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.lowprec)],
    ids=["float32", "bfloat16"],
)
CLOSURE_CASES = pytest.mark.parametrize("case", MAIN_CASES + EDGE_CASES[:3], ids=lambda c: c.id)


@CLOSURE_DTYPES
@CLOSURE_CASES
def test_closure_under_large_random_retractions(case, dtype, gen):
    """MATH §7.2, §7.12: 200 steps ``K ← K h(βM)`` along random directions with
    ``|β|·‖M‖∞`` up to 10 keep the pattern exactly, match the float64 dense product at every
    step, and every factor has ``det h(βM) ≥ 2^{-d}`` (eigenvalues ``½((1+λ)²+1) ≥ ½``).

    ``h(βM)`` grows like β²/2, so K is rescaled by an exact power of two after each step (which
    changes neither the pattern nor invertibility) to stay inside the dtype's range. The
    accumulated K is *not* required to stay numerically invertible here: the condition number of
    a product of random factors grows exponentially with the number of steps, and after ~60 such
    steps the k×k block rounds to an exactly singular bfloat16 matrix (k = 2; float32: k = 6).
    The next test checks invertibility along steps that do not drift.
    """
    K = case.make(dtype=dtype)
    rtol = 4 * tol(dtype, case.dim, "compose")
    for _ in range(200):
        m, _ = case.random_coord(gen)
        beta = 20.0 * float(torch.rand((), generator=gen, dtype=F64)) - 10.0
        M = m.scale(beta / float(m.inf_norm())).to(dtype)
        M64, K64 = M.to(F64).to_dense(), K.to(F64).to_dense()
        sign, logdet = torch.linalg.slogdet(apply_retraction(M, "quadratic").to(F64).to_dense())
        assert sign == 1 and logdet >= -case.dim * math.log(2.0)
        K = K.retract(M, "quadratic")
        Kd = K.to(F64).to_dense()
        h64 = torch.eye(case.dim, dtype=F64) + M64 + 0.5 * M64 @ M64
        assert_close(Kd, K64 @ h64, rtol, f"K h(βM), β={beta:.3g}")
        assert (Kd[~case.mask] == 0).all()
        assert all(t.isfinite().all() for t in K.tensors().values())
        K = K.scale(2.0 ** -math.floor(math.log2(float(K.inf_norm()))))
    assert K.dtype == dtype


@CLOSURE_DTYPES
@CLOSURE_CASES
def test_invertible_along_large_random_natural_gradient_steps(case, dtype, gen):
    """MATH §7.2, §7.12: 200 steps ``K ← K h(−β ν)`` with ``ν = ½(Π̂(KᵀH_tK) − Π̂(I))`` for a
    fresh random SPD ``H_t`` each step and ``β‖ν‖∞`` random in [0.5, 2] (first-order
    ``I − βν`` can be singular there) keep the pattern exactly, ``log|det K|`` finite and
    ``det K > 0``."""
    d = case.dim
    K = case.make(dtype=dtype)
    for _ in range(200):
        G = torch.randn(d, 2 * d, generator=gen, dtype=F64) / math.sqrt(2 * d)
        H_sqrt = torch.cat([G, 0.5 * torch.eye(d, dtype=F64)], dim=1).to(dtype)
        nu = K.inner_project(H_sqrt).add(K.coord_identity(), alpha=-1.0).scale(0.5)
        c = 0.5 + 1.5 * float(torch.rand((), generator=gen, dtype=F64))
        K = K.retract(nu.scale(-c / float(nu.inf_norm())), "quadratic")
        assert (K.to(F64).to_dense()[~case.mask] == 0).all()
        assert all(t.isfinite().all() for t in K.tensors().values())
        assert math.isfinite(float(K.logabsdet()))
        assert torch.linalg.slogdet(K.to(F64).to_dense())[0] == 1  # det h(βν) > 0
    assert K.dtype == dtype
    assert abs(float(K.to(F64).logabsdet())) < 2 * d


# ---------------------------------------------------------------------- expm
@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])
@pytest.mark.parametrize("case", MAIN_CASES + EDGE_CASES, ids=lambda c: c.id)
def test_expm_retraction_matches_matrix_exp(case, scale, gen):
    """``K.retract(M, "expm") = K exp(M)`` (float64), with and without squaring steps."""
    K, Kd = case.random_group(gen)
    m, M = case.random_coord(gen)
    M = M * (scale / float(m.inf_norm()))
    m = m.scale(scale / float(m.inf_norm()))
    expected = torch.linalg.matrix_exp(M)
    assert_close(apply_retraction(m, "expm").to_dense(), expected, 1e-10, "exp(M)")
    assert_close(K.retract(m, "expm").to_dense(), Kd @ expected, 1e-10, "K exp(M)")
    assert (K.retract(m, "expm").to_dense()[~case.mask] == 0).all()


# ---------------------------------------------------------------------- structured optimum
def _objective(Kd: torch.Tensor, H: torch.Tensor) -> float:
    """½ tr(KᵀHK) − log|det K| (the negative ELBO up to constants, MATH §7.13)."""
    return float(0.5 * (Kd.T @ H @ Kd).trace() - torch.linalg.slogdet(Kd)[1])


def _lbfgs_optimum(H: torch.Tensor, mask: torch.Tensor) -> float:
    """Minimize the objective over K's free entries (the pattern) with scipy L-BFGS-B."""
    d = H.shape[0]

    def fun(x):
        Kd = torch.zeros(d, d, dtype=F64)
        Kd[mask] = torch.from_numpy(x)
        sign, logdet = torch.linalg.slogdet(Kd)
        if sign == 0:
            return math.inf, np.zeros_like(x)
        grad = H @ Kd - torch.linalg.inv(Kd).T
        value = 0.5 * (Kd.T @ H @ Kd).trace() - logdet
        return float(value), grad[mask].numpy()

    x0 = torch.eye(d, dtype=F64)[mask].numpy()
    res = scipy.optimize.minimize(
        fun, x0, jac=True, method="L-BFGS-B",
        options={"maxiter": 20000, "maxcor": 50, "gtol": 1e-13, "ftol": 1e-16},
    )
    assert np.abs(res.jac).max() < 1e-5, res
    return float(res.fun)


@pytest.mark.parametrize(
    "case", [low_rank_case(8, 3), low_rank_case(8, 1), hier_case(8, 2, 2)], ids=lambda c: c.id
)
def test_engine_reaches_structured_optimum(case, gen):
    """MATH §7.13: the engine's stationary point minimizes ½ tr(KᵀHK) − log|det K| over the
    pattern (= scipy L-BFGS), between the dense and the diagonal optima."""
    d = case.dim
    row_scales = torch.logspace(0, 1, d, dtype=F64)[:, None]
    X = torch.randn(d, 2 * d, generator=gen, dtype=F64) * row_scales
    H_sqrt = torch.cat([X / math.sqrt(2 * d), math.sqrt(0.5) * torch.eye(d, dtype=F64)], dim=1)
    H = H_sqrt @ H_sqrt.T
    state = engine.init(torch.zeros(d, dtype=F64), case.make(dtype=F64))
    config = NGDConfig(lr=1.0, trust_region=1.0)
    for _ in range(3000):
        stats = NGDStats(torch.zeros(d, dtype=F64), state.factor.inner_project(H_sqrt))
        residual = stats.curvature.add(state.factor.coord_identity(), alpha=-1.0).max_abs()
        if residual < 1e-13:
            break
        state = engine.step(state, stats, config)
    assert residual < 1e-13, f"engine did not converge: max|Π̂(KᵀHK − I)| = {float(residual):.3g}"

    K = state.factor
    value = _objective(K.to_dense(), H)
    assert value == pytest.approx(
        float(0.5 * (K.rmatmul(H_sqrt).square().sum()) - K.logabsdet()), abs=1e-12
    )
    assert value == pytest.approx(_lbfgs_optimum(H, case.mask), abs=1e-6)
    dense_opt = 0.5 * d + 0.5 * float(torch.linalg.slogdet(H)[1])
    diag_opt = 0.5 * d + 0.5 * float(H.diagonal().log().sum())
    assert dense_opt + 1e-3 < value < diag_opt - 1e-3, (dense_opt, value, diag_opt)
