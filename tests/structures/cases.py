"""Structure cases for the conformance suite: one line each, with independent dense oracles."""

from __future__ import annotations

import torch

from structvi.structures import make_structure
from structvi.testing import StructureCase, pattern_case


def full_mask(d: int) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool)


def diag_mask(d: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.bool)


def block_mask(d: int, b: int) -> torch.Tensor:
    idx = torch.arange(d) // b
    return idx[:, None] == idx[None, :]


def lower_mask(d: int) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool).tril()


def upper_mask(d: int) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool).triu()


def low_rank_diagonal_mask(d: int, k: int) -> torch.Tensor:
    """K = [[K_A, K_B], [0, diag]]: first k rows free, then the diagonal."""
    m = diag_mask(d)
    m[:k, :] = True
    return m


def hierarchical_mask(d: int, k1: int, k2: int) -> torch.Tensor:
    """K = [[A, B, C], [0, diag, 0], [0, D, E]] with A k1×k1 and E k2×k2."""
    m = diag_mask(d)
    m[:k1, :] = True
    m[d - k2 :, k1:] = True
    return m


def toeplitz_dense(t: torch.Tensor) -> torch.Tensor:
    """Lower-triangular Toeplitz matrix with first column ``t``."""
    d = t.shape[0]
    i = torch.arange(d)
    lag = i[:, None] - i[None, :]
    return torch.where(lag >= 0, t[lag.clamp(min=0)], torch.zeros((), dtype=t.dtype))


def toeplitz_project(Y: torch.Tensor) -> torch.Tensor:
    """Π̂ onto lower-triangular Toeplitz: t_0 = mean diag, t_j = 2·mean of the j-th subdiagonal."""
    d = Y.shape[0]
    t = torch.stack([(1.0 if j == 0 else 2.0) * Y.diagonal(-j).mean() for j in range(d)])
    return toeplitz_dense(t)


def toeplitz_case(d: int) -> StructureCase:
    def random_group(gen):
        t = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64) / (1 + torch.arange(d))
        t[0] = 1.0 + 0.1 * t[0]
        A = toeplitz_dense(t)
        return make_structure("triangular_toeplitz", d, dtype=torch.float64).from_dense(A), A

    def random_coord(gen):
        Y = torch.randn(d, d, generator=gen, dtype=torch.float64)
        M = toeplitz_project(0.15 * (Y + Y.T))
        return make_structure("triangular_toeplitz", d, dtype=torch.float64).from_dense(M), M

    return StructureCase(
        "triangular_toeplitz", d, {}, random_group, random_coord, toeplitz_project,
        lower_mask(d), d,
    )


PATTERN_CASES = [
    pattern_case("dense", 1, full_mask(1)),
    pattern_case("dense", 7, full_mask(7)),
    pattern_case("diagonal", 7, diag_mask(7)),
    pattern_case("block_diagonal", 7, block_mask(7, 3), block_size=3),
    pattern_case("block_diagonal", 8, block_mask(8, 4), block_size=4),
    pattern_case("lower_triangular", 7, lower_mask(7)),
    pattern_case("upper_triangular", 7, upper_mask(7)),
    pattern_case("low_rank_diagonal", 7, low_rank_diagonal_mask(7, 2), rank=2),
    pattern_case("low_rank_diagonal", 2, low_rank_diagonal_mask(2, 1), rank=1),
    pattern_case("hierarchical", 8, hierarchical_mask(8, 2, 3), k1=2, k2=3),
    pattern_case("hierarchical", 4, hierarchical_mask(4, 1, 0), k1=1, k2=0),
    toeplitz_case(7),
    toeplitz_case(1),
]

STRUCTURE_CASES: list[StructureCase] = list(PATTERN_CASES)
