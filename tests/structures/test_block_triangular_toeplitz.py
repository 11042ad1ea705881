"""Structure-specific tests: block_diagonal, lower/upper_triangular, triangular_toeplitz.

The generic operation-by-operation checks are in ``test_conformance.py``; here: option errors,
the ragged last block, the Toeplitz tiling at dimensions above one tile, closure after many
retractions in low precision, the ``expm`` retraction against ``torch.linalg.matrix_exp``, and a
guard that no operation builds a ``d×d`` intermediate.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.overrides import TorchFunctionMode

from structvi.structures import make_structure
from structvi.testing import assert_close, pattern_case
from tests.structures import test_conformance as conformance
from tests.structures.cases import (
    block_mask,
    lower_mask,
    toeplitz_case,
    toeplitz_dense,
    upper_mask,
)

F64 = torch.float64


def block_case(d: int, b: int):
    return pattern_case("block_diagonal", d, block_mask(d, b), block_size=b)


def tri_case(name: str, d: int):
    return pattern_case(name, d, (lower_mask if name == "lower_triangular" else upper_mask)(d))


def _id(case) -> str:
    return case.id


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"block_size": 0}, r"block_size must be in \[1, 7\], got block_size=0"),
        ({"block_size": -2}, r"block_size=-2"),
        ({"block_size": 8}, r"block_size must be in \[1, 7\], got block_size=8"),
        ({"block_size": 2.5}, r"block_size must be an integer, got block_size=2.5"),
        ({"block_size": "3"}, r"block_size must be an integer, got block_size='3'"),
        ({"block_size": True}, r"block_size must be an integer"),
    ],
    ids=["zero", "negative", "above-dim", "float", "str", "bool"],
)
def test_block_size_errors(options, match):
    with pytest.raises(ValueError, match=match):
        make_structure("block_diagonal", 7, **options)


def test_block_diagonal_option_names():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\].*block_size"):
        make_structure("block_diagonal", 7, block_size=3, rank=2)
    with pytest.raises(TypeError, match="block_size is required"):
        make_structure("block_diagonal", 7)
    with pytest.raises(ValueError, match="dim=0"):
        make_structure("block_diagonal", 0, block_size=1)


@pytest.mark.parametrize("name", ["lower_triangular", "upper_triangular", "triangular_toeplitz"])
def test_optionless_structures_reject_options(name):
    with pytest.raises(TypeError, match="rank"):
        make_structure(name, 5, rank=2)
    with pytest.raises(ValueError, match="dim=-1"):
        make_structure(name, -1)


# ------------------------------------------------------------------------------ block layout
@pytest.mark.parametrize(
    ("d", "b", "nb", "r"),
    [(7, 3, 2, 1), (10, 4, 2, 2), (8, 4, 2, 0), (5, 5, 1, 0), (4, 1, 4, 0)],
    ids=["7/3", "10/4", "8/4", "b=d", "b=1"],
)
def test_block_storage_and_ragged_last_block(d, b, nb, r, gen):
    eye = make_structure("block_diagonal", d, dtype=F64, block_size=b)
    shapes = {k: tuple(t.shape) for k, t in eye.tensors().items()}
    assert shapes == {"blocks": (nb, b, b), "last": (r, r)}
    assert eye.num_params() == nb * b * b + r * r
    # Fill every block with distinct numbers and check where to_dense puts them.
    blocks = torch.randn(nb, b, b, generator=gen, dtype=F64)
    last = torch.randn(r, r, generator=gen, dtype=F64)
    K = type(eye)(d, {"blocks": blocks, "last": last}, block_size=b)
    expected = torch.block_diag(*blocks, last)
    assert torch.equal(K.to_dense(), expected)
    x = torch.randn(d, 3, generator=gen, dtype=F64)
    assert_close(K.matmul(x), expected @ x, 1e-12, "K x")
    assert_close(K.rmatmul(x), expected.T @ x, 1e-12, "Kᵀ x")
    assert_close(K.logabsdet(), torch.linalg.slogdet(expected)[1], 1e-12, "log|det K|")
    back = K.from_dense(expected)
    assert torch.equal(back.tensors()["blocks"], blocks) and torch.equal(back.last, last)


def test_block_size_one_is_diagonal_and_block_size_dim_is_dense(gen):
    d = 6
    Y = torch.randn(d, d, generator=gen, dtype=F64)
    Y = Y + Y.T
    one = make_structure("block_diagonal", d, dtype=F64, block_size=1)
    full = make_structure("block_diagonal", d, dtype=F64, block_size=d)
    assert torch.equal(one.project(Y).to_dense(), torch.diag(Y.diagonal()))
    assert torch.equal(full.project(Y).to_dense(), make_structure("dense", d, dtype=F64)
                       .project(Y).to_dense())


# ------------------------------------------------------------------------------ projections
@pytest.mark.parametrize(
    "case",
    [block_case(7, 3), tri_case("lower_triangular", 6), tri_case("upper_triangular", 6),
     toeplitz_case(6), toeplitz_case(37)],
    ids=_id,
)
def test_project_symmetrizes_its_input(case, gen):
    """Π̂(Y) = Π̂(sym Y) for a non-symmetric Y (a Stein estimate is not symmetric)."""
    d = case.dim
    Y = torch.randn(d, d, generator=gen, dtype=F64)
    out = case.make().project(Y).to_dense()
    assert_close(out, case.oracle_project(0.5 * (Y + Y.T)), 1e-12, "Π̂(Y)")


def test_triangular_projections_mirror(gen):
    d = 6
    Y = torch.randn(d, d, generator=gen, dtype=F64)
    Y = Y + Y.T
    low = make_structure("lower_triangular", d, dtype=F64).project(Y).to_dense()
    up = make_structure("upper_triangular", d, dtype=F64).project(Y).to_dense()
    assert torch.equal(low, up.T)
    assert torch.equal(low.diagonal(), Y.diagonal())
    assert torch.equal(low.tril(-1), 2 * Y.tril(-1))


def test_triangular_num_params_counts_free_entries():
    for name in ("lower_triangular", "upper_triangular"):
        assert make_structure(name, 9).num_params() == 45


# ------------------------------------------------------------------------------ larger dims
LARGE_CASES = [
    toeplitz_case(16),  # exactly one tile of 16 (tiles are max(16, ⌈√d⌉) wide)
    toeplitz_case(17),  # two tiles, the second with one row
    toeplitz_case(40),  # three tiles of 16, ragged last tile
    toeplitz_case(100),  # seven tiles of 16
    block_case(67, 8),
    tri_case("lower_triangular", 33),
    tri_case("upper_triangular", 33),
]
LARGE_CHECKS = [
    conformance.test_matmul_and_rmatmul,
    conformance.test_compose_group,
    conformance.test_compose_coordinates,
    conformance.test_project_matches_oracle,
    conformance.test_projection_identities,
    conformance.test_project_outer,
    conformance.test_inner_project_nonsymmetric_factor,
    conformance.test_inner_project_self,
    conformance.test_diagonals_norms_trace,
    conformance.test_logabsdet,
]


@pytest.mark.parametrize("check", LARGE_CHECKS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize("case", LARGE_CASES, ids=_id)
def test_conformance_at_larger_dims(case, check, dtype, gen):
    """The conformance checks where Toeplitz products span several tiles (d > 16)."""
    kwargs = {"structure_case": case, "dtype": dtype, "gen": gen, "ncols": 5}
    params = inspect.signature(check).parameters
    check(**{k: v for k, v in kwargs.items() if k in params})


# ------------------------------------------------------------------------------ closure
CLOSURE_CASES = [
    block_case(7, 3),
    block_case(10, 4),
    tri_case("lower_triangular", 7),
    tri_case("upper_triangular", 7),
    toeplitz_case(7),
    toeplitz_case(40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CLOSURE_CASES, ids=_id)
def test_closure_after_many_retractions(case, dtype, gen):
    """MATH §7.2 and §7.12: 200 quadratic retractions keep the exact pattern and det K ≠ 0."""
    d = case.dim
    K = case.make("identity", dtype)
    for _ in range(200):
        Y = torch.randn(d, d, generator=gen, dtype=F64)
        M = K.project((0.05 * (Y + Y.T)).to(dtype))
        assert (M.to_dense()[~case.mask] == 0).all()
        K = K.retract(M, "quadratic")
    assert type(K).__name__ == type(case.make()).__name__ and K.dtype == dtype
    assert all(torch.isfinite(t).all() for t in K.tensors().values())
    dense = K.to_dense()
    assert (dense[~case.mask] == 0).all()
    assert (dense != 0).any(dim=1).all()
    # K applied to the identity reproduces the stored pattern exactly (zeros exact, and for
    # Toeplitz every diagonal constant).
    KI = K.matmul(torch.eye(d, dtype=dtype))
    assert torch.equal(KI, dense)
    if case.name == "triangular_toeplitz":
        assert torch.equal(dense, toeplitz_dense(K.tensors()["column"]))
    logdet = K.logabsdet()
    assert torch.isfinite(logdet)
    assert_close(logdet, torch.linalg.slogdet(dense.to(F64))[1], 0.05, "log|det K|")


# ------------------------------------------------------------------------------ retractions
RETRACTION_CASES = [
    block_case(7, 3),
    tri_case("lower_triangular", 6),
    tri_case("upper_triangular", 6),
    toeplitz_case(7),
    toeplitz_case(23),
]


@pytest.mark.parametrize("norm", [0.3, 3.0], ids=["no-squaring", "squaring"])
@pytest.mark.parametrize("case", RETRACTION_CASES, ids=_id)
def test_expm_retraction_matches_matrix_exp(case, norm, gen):
    K, A = case.random_group(gen)
    M, _ = case.random_coord(gen)
    M = M.scale(norm / float(M.inf_norm()))
    expected = A @ torch.linalg.matrix_exp(M.to_dense())
    out = K.retract(M, "expm")
    assert type(out) is type(K)
    assert_close(out.to_dense(), expected, 1e-12, "K expm(M)")
    assert (out.to_dense()[~case.mask] == 0).all()


@pytest.mark.parametrize("case", RETRACTION_CASES, ids=_id)
def test_quadratic_retraction_formula(case, gen):
    K, A = case.random_group(gen)
    M, Md = case.random_coord(gen)
    expected = A @ (torch.eye(case.dim, dtype=F64) + Md + 0.5 * Md @ Md)
    assert_close(K.retract(M).to_dense(), expected, 1e-12, "K (I + M + M²/2)")


# ------------------------------------------------------------------------------ cost
class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor returned by any torch call inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("case", [toeplitz_case(400), block_case(400, 8)], ids=_id)
def test_no_dxd_intermediate(case, gen):
    """Every operation except the dense conversions stays far below ``d²`` numbers."""
    d = case.dim
    K, _ = case.random_group(gen)
    M, _ = case.random_coord(gen)
    X = torch.randn(d, 3, generator=gen, dtype=F64)
    with _LargestTensor() as probe:
        K.matmul(X), K.rmatmul(X), K.compose(K), K.project_outer(X), K.project_outer(X, 2 * X)
        K.inner_project(X), K.inner_project_self(), K.diagonal(), K.gram_diagonal()
        K.inf_norm(), K.logabsdet(), K.retract(M.scale(0.1)), K.retract(M, "expm")
    assert 0 < probe.largest <= d * d // 8, f"largest intermediate {probe.largest} vs d² = {d * d}"


@pytest.mark.parametrize("d", [1, 2, 7, 40, 129])
def test_toeplitz_inverse_is_toeplitz_and_exact(d):
    """K⁻¹ by Newton's iteration on the power series: K K⁻¹ = I (float64), no decomposition."""
    from structvi._forbid import ForbidDecompositions

    gen = torch.Generator().manual_seed(d)
    t = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64) / (1 + torch.arange(d))
    t[0] = 1.0 + 0.1 * t[0]
    K = make_structure("triangular_toeplitz", d, dtype=torch.float64)
    K = K._new({"column": t})
    with ForbidDecompositions():
        inv = K.inverse()
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(K.to_dense() @ inv.to_dense(), eye, atol=1e-12)
