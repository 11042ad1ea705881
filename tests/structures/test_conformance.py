"""Every structure operation against an independent float64 dense oracle, all cases × dtypes.

The oracle is evaluated on the inputs *after* rounding to the test dtype, so only the
operation's own error is measured (STYLE §4.5).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from structvi.structures import NaiveFallbackWarning, make_structure
from structvi.testing import assert_close, state_roundtrip, tol

F64 = torch.float64


def rounded(case, gen, dtype, kind="group"):
    """A random structure in ``dtype`` and the float64 dense matrix of its rounded values."""
    s64, _ = (case.random_group if kind == "group" else case.random_coord)(gen)
    s = s64.to(dtype)
    return s, s.to(F64).to_dense()


def randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def test_to_dense_matches_oracle(structure_case, gen):
    s, A = structure_case.random_group(gen)
    assert_close(s.to_dense(), A, 0.0, "to_dense(from_dense(A))")
    outside = s.to_dense()[~structure_case.mask]
    assert (outside == 0).all()


def test_identity_and_zeros(structure_case, dtype):
    eye = structure_case.make("identity", dtype)
    zero = structure_case.make("zeros", dtype)
    assert eye.dtype == dtype and zero.dtype == dtype
    assert_close(eye.to_dense(), torch.eye(structure_case.dim, dtype=F64), 0.0, "identity")
    assert_close(zero.to_dense(), torch.zeros(structure_case.dim, structure_case.dim), 0.0, "zeros")


def test_num_params(structure_case):
    assert structure_case.make().num_params() == structure_case.storage


@pytest.mark.parametrize("ncols", [None, 1, 5], ids=["vec", "n=1", "n=5"])
def test_matmul_and_rmatmul(structure_case, dtype, gen, ncols):
    s, A = rounded(structure_case, gen, dtype)
    shape = (structure_case.dim,) if ncols is None else (structure_case.dim, ncols)
    x = randn(gen, *shape, dtype=dtype)
    x64 = x.to(F64)
    out, rout = s.matmul(x), s.rmatmul(x)
    assert out.dtype == dtype and out.shape == x.shape and rout.shape == x.shape
    assert_close(out, A @ x64, tol(dtype, structure_case.dim), "K @ x")
    assert_close(rout, A.T @ x64, tol(dtype, structure_case.dim), "Kᵀ @ x")


def test_compose_group(structure_case, dtype, gen):
    s1, A1 = rounded(structure_case, gen, dtype)
    s2, A2 = rounded(structure_case, gen, dtype)
    out = s1.compose(s2)
    assert type(out) is type(s1) and out.dtype == dtype
    assert_close(out.to_dense(), A1 @ A2, tol(dtype, structure_case.dim, "compose"), "K1 K2")
    assert (out.to_dense()[~structure_case.mask] == 0).all()


def test_compose_coordinates(structure_case, dtype, gen):
    if structure_case.name == "kronecker":
        pytest.skip("a product of Kronecker sums is not a Kronecker sum (retraction is factor-wise)")
    m1, M1 = rounded(structure_case, gen, dtype, "coord")
    m2, M2 = rounded(structure_case, gen, dtype, "coord")
    out = m1.compose(m2)
    assert_close(out.to_dense(), M1 @ M2, tol(dtype, structure_case.dim, "compose"), "M1 M2")


def test_add_and_scale(structure_case, dtype, gen):
    m1, M1 = rounded(structure_case, gen, dtype, "coord")
    m2, M2 = rounded(structure_case, gen, dtype, "coord")
    t = tol(dtype, structure_case.dim)
    assert_close(m1.add(m2, alpha=-0.5).to_dense(), M1 - 0.5 * M2, t, "add")
    assert_close(m1.scale(3.0).to_dense(), 3.0 * M1, t, "scale")


def test_add_rejects_other_structure_or_dtype(structure_case):
    s = structure_case.make()
    with pytest.raises(ValueError, match="dtype"):
        s.add(s.to(torch.float32))
    other = make_structure("dense", structure_case.dim + 1, dtype=F64)
    with pytest.raises(ValueError, match="spec"):
        s.add(other)


def test_matmul_rejects_bad_input(structure_case):
    s = structure_case.make()
    with pytest.raises(ValueError, match="shape"):
        s.matmul(torch.zeros(structure_case.dim + 1, dtype=F64))
    with pytest.raises(ValueError, match="dtype"):
        s.matmul(torch.zeros(structure_case.dim, dtype=torch.float32))


def test_project_matches_oracle(structure_case, dtype, gen):
    Y = randn(gen, structure_case.dim, structure_case.dim, dtype=dtype)
    Y = (Y + Y.T).to(dtype)
    s = structure_case.make(dtype=dtype)
    out = s.project(Y)
    assert out.dtype == dtype
    expected = structure_case.oracle_project(Y.to(F64))
    assert_close(out.to_dense(), expected, tol(dtype, structure_case.dim, "reduce"), "Π̂(Y)")


def test_projection_identities(structure_case, gen):
    """MATH §7.1: P idempotent, Y − P(Y) ⟂ {Z + Zᵀ}, tr Π̂(Y) = tr Y, Π̂ lands in the pattern."""
    if not structure_case.orthogonal:
        pytest.skip("Kronecker: group elements (K₁ ⊗ K₂) are not coordinates (M₁ ⊗ I + I ⊗ M₂)")
    d = structure_case.dim
    Y = torch.randn(d, d, generator=gen, dtype=F64)
    Y = Y + Y.T
    s = structure_case.make()
    Pi = s.project(Y).to_dense()
    P = 0.5 * (Pi + Pi.T)
    assert_close(0.5 * (s.project(P).to_dense() + s.project(P).to_dense().T), P, 1e-12, "P∘P")
    assert_close(Pi.trace(), Y.trace(), 1e-12, "trace")
    assert (Pi[~structure_case.mask] == 0).all()
    _, Z = structure_case.random_group(gen)
    assert abs(float(((Y - P) * (Z + Z.T)).sum())) < 1e-10 * float(Y.abs().sum())


def test_dense_projection_is_identity():
    Y = torch.randn(5, 5, dtype=F64)
    Y = Y + Y.T
    assert_close(make_structure("dense", 5, dtype=F64).project(Y).to_dense(), Y, 0.0, "Π̂ dense")


def test_coord_identity(structure_case, dtype):
    s = structure_case.make(dtype=dtype)
    expected = structure_case.oracle_project(torch.eye(structure_case.dim, dtype=F64))
    assert_close(s.coord_identity().to_dense(), expected, 0.0, "Π̂(I)")


def test_project_outer(structure_case, dtype, gen):
    d = structure_case.dim
    U, V = randn(gen, d, 4, dtype=dtype), randn(gen, d, 4, dtype=dtype)
    s = structure_case.make(dtype=dtype)
    U64, V64 = U.to(F64), V.to(F64)
    expected = structure_case.oracle_project(0.5 * (U64 @ V64.T + V64 @ U64.T))
    t = tol(dtype, d, "inner") * 4
    assert_close(s.project_outer(U, V).to_dense(), expected, t, "Π̂(sym(U Vᵀ))")
    expected_uu = structure_case.oracle_project(U64 @ U64.T)
    assert_close(s.project_outer(U).to_dense(), expected_uu, t, "Π̂(U Uᵀ)")


def test_inner_project_nonsymmetric_factor(structure_case, dtype, gen):
    """MATH §7.3 (the singd block-diagonal bug): Π̂(Kᵀ X Xᵀ K) with a non-symmetric K."""
    s, A = rounded(structure_case, gen, dtype)
    X = randn(gen, structure_case.dim, 3, dtype=dtype)
    X64 = X.to(F64)
    expected = structure_case.oracle_project(A.T @ X64 @ X64.T @ A)
    t = tol(dtype, structure_case.dim, "inner") * 4
    assert_close(s.inner_project(X).to_dense(), expected, t, "Π̂(Kᵀ X Xᵀ K)")


def test_inner_project_self(structure_case, dtype, gen):
    s, A = rounded(structure_case, gen, dtype)
    expected = structure_case.oracle_project(A.T @ A)
    t = tol(dtype, structure_case.dim, "inner")
    assert_close(s.inner_project_self().to_dense(), expected, t, "Π̂(Kᵀ K)")


def test_diagonals_norms_trace(structure_case, dtype, gen):
    s, A = rounded(structure_case, gen, dtype)
    t = tol(dtype, structure_case.dim)
    exact = t if structure_case.extra.get("entries_are_products") else 0.0
    assert_close(s.diagonal(), A.diagonal(), exact, "diag(K)")
    assert_close(s.gram_diagonal(), (A @ A.T).diagonal(), t, "diag(K Kᵀ)")
    assert_close(s.inf_norm(), A.abs().sum(-1).max(), t, "‖K‖∞")
    assert_close(s.trace(), A.trace(), t, "tr K")
    m, M = rounded(structure_case, gen, dtype, "coord")
    assert_close(m.inf_norm(), M.abs().sum(-1).max(), t, "‖M‖∞")


def test_matmul_rows(structure_case, dtype, gen):
    s, A = rounded(structure_case, gen, dtype)
    X = randn(gen, 3, structure_case.dim, dtype=dtype)
    t = tol(dtype, structure_case.dim, "matmul")
    assert_close(s.matmul_rows(X).to(F64), X.to(F64) @ A.T, t, "X Kᵀ")
    with pytest.raises(ValueError, match=rf"X must have shape \(n, {structure_case.dim}\)"):
        s.matmul_rows(X.T if structure_case.dim != 3 else X[:, :1])


def test_abs_row_sums(structure_case, dtype, gen):
    """Row sums of |K|: exact for entrywise-stored structures, an upper bound otherwise."""
    s, A = rounded(structure_case, gen, dtype)
    got, want = s.abs_row_sums().to(F64), A.abs().sum(-1)
    t = tol(dtype, structure_case.dim)
    if structure_case.extra.get("entries_are_products"):
        assert bool((got >= want * (1 - t) - t).all()), (got, want)
    else:
        assert_close(got, want, t, "row sums of |K|")


def test_logabsdet(structure_case, dtype, gen):
    s, A = rounded(structure_case, gen, dtype)
    expected = torch.linalg.slogdet(A)[1]
    assert_close(s.logabsdet(), expected, tol(dtype, structure_case.dim, "compose"), "log|det K|")


@pytest.mark.parametrize("ncols", [None, 3], ids=["vec", "n=3"])
def test_solve(structure_case, dtype, gen, ncols):
    """``K⁻¹ x`` against an LU solve of the rounded float64 dense factor (well conditioned)."""
    s, A = rounded(structure_case, gen, dtype)
    shape = (structure_case.dim,) if ncols is None else (structure_case.dim, ncols)
    x = randn(gen, *shape, dtype=dtype)
    out = s.solve(x)
    assert out.dtype == dtype and out.shape == x.shape
    expected = torch.linalg.solve(A, x.to(F64))
    assert_close(out, expected, tol(dtype, structure_case.dim, "inner"), "K⁻¹ x")


def test_state_roundtrip_weights_only(structure_case, dtype, gen):
    s, A = rounded(structure_case, gen, dtype)
    json.dumps(s.spec())
    loaded = state_roundtrip(s)
    assert type(loaded) is type(s) and loaded.dtype == dtype
    products = structure_case.extra.get("entries_are_products")  # Kronecker: rounded products
    exact = tol(dtype, structure_case.dim) if products else 0.0
    assert_close(loaded.to_dense(), A, exact, "roundtrip")


def test_dtype_roundtrip(structure_case, gen):
    s, A = structure_case.random_group(gen)
    back = s.to(torch.float32).to(F64)
    assert back.dtype == F64
    assert_close(back.to_dense(), A, 1e-6, "float64 → float32 → float64")


def test_no_dense_fallbacks(structure_case, gen):
    """Every op is specialized: none may fall back to a dense d×d computation."""
    s, _ = structure_case.random_group(gen)
    m, _ = structure_case.random_coord(gen)
    X = torch.randn(structure_case.dim, 3, dtype=F64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaiveFallbackWarning)
        s.matmul(X), s.rmatmul(X), s.compose(s), s.inner_project(X)
        if structure_case.name != "kronecker":  # a product of Kronecker sums is not one
            m.compose(m)
        s.project_outer(X), s.inner_project_self(), s.diagonal(), s.gram_diagonal()
        s.inf_norm(), m.inf_norm(), s.logabsdet(), s.retract(m.scale(0.1))
        s.solve(X)


def test_update_ops_are_inverse_free(structure_case, gen, forbid_decompositions):
    s, _ = structure_case.random_group(gen)
    m, _ = structure_case.random_coord(gen)
    X = torch.randn(structure_case.dim, 3, dtype=F64, generator=gen)
    s.matmul(X), s.rmatmul(X), s.compose(s), s.inner_project(X), s.project_outer(X, X)
    s.inner_project_self(), s.gram_diagonal(), m.inf_norm(), s.coord_identity()
    for retraction in ("quadratic", "first_order", "expm"):
        s.retract(m.scale(0.1), retraction)


def test_gram_rows(structure_case, gen):
    """Where a structure declares ``J``, ``K Kᵀ`` is diagonal outside the rows/columns ``J``."""
    s, A = structure_case.random_group(gen)
    J = s.gram_rows()
    if J is None:
        pytest.skip(f"{structure_case.name} has no sparse Gram form")
    G = A @ A.T
    outside = torch.ones(structure_case.dim, dtype=torch.bool)
    outside[J] = False
    block = G[outside][:, outside]
    assert torch.equal(block - torch.diag(block.diagonal()), torch.zeros_like(block))
    assert J.dtype == torch.long and len(set(J.tolist())) == J.numel()
