"""Property tests (hypothesis) over random factors: group laws that every structure must obey."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structvi.structures import STRUCTURES
from structvi.testing import assert_close
from tests.structures.cases import STRUCTURE_CASES

F64 = torch.float64
CASES = [pytest.param(c, id=c.id) for c in STRUCTURE_CASES]


def _skip_unregistered(case):
    assert case.name in STRUCTURES, f"structure {case.name!r} has a case but is not registered"


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.floats(-3.0, 3.0))
def test_group_laws(case, seed, c):
    """I is neutral (exactly), composition is associative, scaling is linear."""
    _skip_unregistered(case)
    gen = torch.Generator().manual_seed(seed)
    (a, A), (b, B), (e, E) = (case.random_group(gen) for _ in range(3))
    eye = a.identity_like()
    assert torch.equal(a.compose(eye).to_dense(), A)
    assert torch.equal(eye.compose(a).to_dense(), A)
    assert_close(a.compose(b).compose(e).to_dense(), a.compose(b.compose(e)).to_dense(), 1e-12,
                 "associativity")
    m, M = case.random_coord(gen)
    assert_close(m.scale(c).to_dense(), c * M, 1e-15, "scale")


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_projection_is_linear_and_idempotent_on_coordinates(case, seed):
    """Π̂(αY + Z) = αΠ̂(Y) + Π̂(Z); Π̂ maps Sym onto the coordinates and fixes ½(M+Mᵀ)'s image."""
    _skip_unregistered(case)
    gen = torch.Generator().manual_seed(seed)
    d = case.dim
    Y, Z = (torch.randn(d, d, generator=gen, dtype=F64) for _ in range(2))
    Y, Z = Y + Y.T, Z + Z.T
    s = case.make()
    lhs = s.project(2.5 * Y + Z).to_dense()
    rhs = 2.5 * s.project(Y).to_dense() + s.project(Z).to_dense()
    assert_close(lhs, rhs, 1e-13, "linearity")
    if case.orthogonal:
        P = s.project(Y).to_dense()
        assert_close(s.project(0.5 * (P + P.T)).to_dense(), P, 1e-13, "Π̂∘sym∘Π̂ = Π̂")
