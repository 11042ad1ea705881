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
    toeplitz_case(40),  # spans several tiles of the tiled Toeplitz products
]

STRUCTURE_CASES: list[StructureCase] = list(PATTERN_CASES)


# ------------------------------------------------------------------ Kronecker
# A Kronecker case is built from two factor cases above: their random elements and dense
# oracles. Factors may be structures still being written, so nothing is built at import and
# every entry point skips (pytest.skip) while a factor is unregistered.

from structvi.structures.kronecker import Kronecker  # noqa: E402
from structvi.testing import _short  # noqa: E402


def factor_case(name: str, d: int, options: dict) -> StructureCase:
    """The case of a Kronecker factor, reusing the pattern masks and Toeplitz oracles above."""
    if name == "triangular_toeplitz":
        return toeplitz_case(d)
    masks = {
        "dense": lambda: full_mask(d),
        "diagonal": lambda: diag_mask(d),
        "block_diagonal": lambda: block_mask(d, options["block_size"]),
        "lower_triangular": lambda: lower_mask(d),
        "upper_triangular": lambda: upper_mask(d),
        "low_rank_diagonal": lambda: low_rank_diagonal_mask(d, options["rank"]),
        "hierarchical": lambda: hierarchical_mask(d, options["k1"], options["k2"]),
    }
    return pattern_case(name, d, masks[name](), **options)


def require_registered(names) -> None:
    """``pytest.skip`` unless every structure in ``names`` is registered."""
    import pytest

    from structvi.structures import STRUCTURES

    missing = [n for n in names if n not in STRUCTURES]
    if missing:
        pytest.skip(f"Kronecker factor structure(s) {missing} not registered")


def partial_traces(Y: torch.Tensor, d1: int, d2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tr₂(Y)/d₂, tr₁(Y)/d₁)`` of a ``(d₁d₂)×(d₁d₂)`` matrix, row-major ``(i, j)`` indices."""
    Y4 = Y.reshape(d1, d2, d1, d2)
    tr2 = Y4.diagonal(dim1=1, dim2=3).sum(-1)  # [i, k] = Σ_j Y[i, j, k, j]
    tr1 = Y4.diagonal(dim1=0, dim2=2).sum(-1)  # [j, l] = Σ_i Y[i, j, i, l]
    return tr2 / d2, tr1 / d1


class KroneckerCase(StructureCase):
    """A :class:`StructureCase` whose :meth:`make` also skips while a factor is unregistered."""

    def make(self, init: str = "identity", dtype: torch.dtype = torch.float64):
        require_registered(self.extra["requires"])
        return super().make(init, dtype)

    @property
    def id(self) -> str:
        (f1, f2), (d1, d2) = self.extra["requires"], self.options["dims"]
        o1, o2 = (_short(o) for o in self.extra["factor_options"])
        return f"kronecker({f1}{o1 and '(' + o1 + ')'}{d1}x{f2}{o2 and '(' + o2 + ')'}{d2})"


def kronecker_case(f1: str, d1: int, opts1: dict, f2: str, d2: int, opts2: dict) -> StructureCase:
    """``kronecker`` with factors ``f1`` (size ``d1``, options ``opts1``) and ``f2``."""
    c1, c2 = factor_case(f1, d1, opts1), factor_case(f2, d2, opts2)
    d, f64 = d1 * d2, torch.float64
    eye1, eye2 = torch.eye(d1, dtype=f64), torch.eye(d2, dtype=f64)

    def random_group(gen):
        require_registered([f1, f2])
        (s1, A1), (s2, A2) = c1.random_group(gen), c2.random_group(gen)
        return Kronecker.from_factors(s1, s2), torch.kron(A1, A2)

    def random_coord(gen):
        require_registered([f1, f2])
        (m1, M1), (m2, M2) = c1.random_coord(gen), c2.random_coord(gen)
        return Kronecker.from_factors(m1, m2, "sum"), torch.kron(M1, eye2) + torch.kron(eye1, M2)

    def oracle_project(Y):
        """Partial traces, the common scale kept in the first factor (``tr M₂ = 0``)."""
        T2, T1 = partial_traces(Y, d1, d2)
        P2 = c2.oracle_project(T1)
        P2 = P2 - P2.trace() / d2 * eye2
        return torch.kron(c1.oracle_project(T2), eye2) + torch.kron(eye1, P2)

    mask = (c1.mask[:, None, :, None] & c2.mask[None, :, None, :]).reshape(d, d)
    spec1, spec2 = (f if not o else (f, o) for f, o in ((f1, opts1), (f2, opts2)))
    return KroneckerCase(
        "kronecker", d, {"dims": (d1, d2), "factors": (spec1, spec2)}, random_group,
        random_coord, oracle_project, mask, c1.storage + c2.storage, orthogonal=False,
        extra={"requires": [f1, f2], "factor_options": [opts1, opts2],
               "entries_are_products": True},
    )


KRONECKER_CASES = [
    kronecker_case("dense", 3, {}, "diagonal", 4, {}),
    kronecker_case("lower_triangular", 2, {}, "block_diagonal", 3, {"block_size": 2}),
    kronecker_case("diagonal", 1, {}, "dense", 3, {}),
    kronecker_case("low_rank_diagonal", 3, {"rank": 1}, "triangular_toeplitz", 3, {}),
]

STRUCTURE_CASES.extend(KRONECKER_CASES)


# ---------------------------------------------------------------- block_sites (per-site blocks)
def _block_diag_mask(*masks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*(m.to(torch.int64) for m in masks)).to(torch.bool)


def _block(name: str, dim: int, **options) -> dict:
    return {"name": name, "dim": dim, "options": options}


BLOCK_SITES_CASES = [
    pattern_case("block_sites", 5, _block_diag_mask(torch.ones(3, 3), diag_mask(2)),
                 blocks=[_block("dense", 3), _block("diagonal", 2)]),
    pattern_case(
        "block_sites", 9,
        _block_diag_mask(low_rank_diagonal_mask(4, 1), torch.ones(1, 1), block_mask(4, 2)),
        blocks=[_block("low_rank_diagonal", 4, rank=1), _block("dense", 1),
                _block("block_diagonal", 4, block_size=2)],
    ),
]
STRUCTURE_CASES.extend(BLOCK_SITES_CASES)
