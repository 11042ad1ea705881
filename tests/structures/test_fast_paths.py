"""The step's fast paths equal the validated / generic / dense ones.

Operations build their results without re-validating options (``Structure._trusted``,
``Kronecker._pair``, ``BlockSites._of_parts``); the log-det series takes ``tr(M^k)`` from
``power_traces``; Kronecker products go through the factors' ``apply_along``. Each is checked
against the path it replaced: a validated rebuild, the compose/trace loop, the generic unfolding
and the dense matrices (float64, exact or 1e-12)."""

from __future__ import annotations

import math

import pytest
import torch

from structvi._fit_rules import (
    _LOGDET_TOL, _MAX_TERMS, _RADIUS, _log_series, logdet_retraction, series_terms,
)
from structvi.structures import Structure, make_structure, structure_from_spec
from structvi.structures.block_sites import BlockSites, block_spec
from structvi.testing import assert_close

F64 = torch.float64
LEAVES = [("dense", {}), ("diagonal", {}), ("block_diagonal", {"block_size": 3}),
          ("lower_triangular", {}), ("low_rank_diagonal", {"rank": 2}),
          ("hierarchical", {"k1": 2, "k2": 2}), ("triangular_toeplitz", {})]


def _random(s: Structure, gen: torch.Generator, scale: float = 0.3) -> Structure:
    return structure_from_spec({k: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                                for k, t in s.tensors().items()}, s.spec())


def _sites(dtype=F64) -> BlockSites:
    blocks = [block_spec("kronecker", 12, dims=(3, 4), factors=("dense", "diagonal")),
              block_spec("diagonal", 3), block_spec("kronecker", 6, dims=(2, 3)),
              block_spec("low_rank_diagonal", 5, rank=2)]
    return BlockSites.identity(26, blocks=blocks, dtype=dtype)


def _same_as_validated(s: Structure) -> None:
    """``s`` equals its rebuild through the validating constructor, and its parts share its
    storage (the trusted constructors keep composite structures consistent)."""
    back = structure_from_spec(s.tensors(), s.spec())
    assert back.spec() == s.spec()
    assert list(back.tensors()) == list(s.tensors())
    assert_close(back.to_dense(), s.to_dense(), 0.0, f"{s!r} rebuilt")
    if isinstance(s, BlockSites):
        for i, b in enumerate(s.blocks):
            assert all(t is s._t[f"{i}:{k}"] for k, t in b._t.items())
            _same_as_validated(b)
    for i, f in enumerate(getattr(s, "factors", ())):
        assert all(t is s._t[f"{i}.{k}"] for k, t in f._t.items())


def test_op_results_equal_validated_rebuilds_and_dense(gen):
    K = _random(_sites(), gen)
    x = torch.randn(26, 5, generator=gen, dtype=F64)
    M = K.project_outer(x, torch.randn(26, 5, generator=gen, dtype=F64)).scale(0.05)
    eye = K.coord_identity()
    results = {"M": M, "eye": eye, "M + 2 eye": M.add(eye, alpha=2.0), "M + eye": M.add(eye),
               "K h(M)": K.retract(M), "K h(M) h(M)": K.retract(M).retract(M),
               "zeros": K.zeros_like(), "identity": K.identity_like(), "K·K": K.compose(K),
               "inner": K.inner_project(x), "expm": K.retract(M, "expm")}
    for name, r in results.items():
        _same_as_validated(r)
    dense = K.to_dense()
    assert_close(results["K·K"].to_dense(), dense @ dense, 1e-12, "compose")
    assert_close(results["M + 2 eye"].to_dense(), M.to_dense() + 2 * eye.to_dense(), 1e-14,
                 "add")
    for b, m, r in zip(K.blocks, M.blocks, results["K h(M)"].blocks):  # each block its own
        assert_close(r.to_dense(), b.retract(m).to_dense(), 0.0, "retract per block")
    assert_close(K.matmul(x), dense @ x, 1e-12, "K x")
    assert_close(K.rmatmul(x), dense.T @ x, 1e-12, "Kᵀ x")


def test_spec_is_a_copy_shared_options_stay_intact(gen):
    K = _random(_sites(), gen)
    M = K.coord_identity().scale(2.0)  # shares K's normalized options
    spec = M.spec()
    spec["options"]["blocks"][0]["options"]["dims"][0] = 99
    spec["options"]["blocks"][1]["dim"] = 99
    assert M.spec() != spec and K.blocks[0].dims == (3, 4) and M.blocks[1].dim == 3
    assert M.same_spec(K.coord_identity()) and not M.same_spec(K.blocks[0])


def test_to_same_place_is_self_other_dtype_converts(gen):
    K = _random(_sites(), gen)
    assert K.to(F64) is K and K.to() is K and K.blocks[0].to(F64) is K.blocks[0]
    K32 = K.to(torch.float32)
    assert K32.dtype == torch.float32 and K32 is not K
    _same_as_validated(K32)
    assert_close(K32.to_dense().double(), K.to_dense(), 1e-6, "to float32")


def _series_reference(M: Structure, retraction: str) -> float:
    """The series by the generic compose/trace loop (one sync a term), as many terms as the
    tail bound asks for."""
    norm, fro2 = float(M.inf_norm()), float(M.gram_diagonal().sum())
    terms = series_terms(min(norm, math.sqrt(fro2)), fro2, retraction, _LOGDET_TOL)
    coeffs = _log_series(retraction, _MAX_TERMS)
    total, P = 0.0, M
    for k in range(terms):
        total += coeffs[k] * float(P.trace())
        P = P.compose(M)
    return total


@pytest.mark.parametrize("name,opts", LEAVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_traces_and_series_equal_the_compose_loop(name, opts, dtype, gen):
    Z = make_structure(name, 7, dtype=dtype, init="zeros", **opts)
    Y = torch.randn(7, 7, generator=gen, dtype=dtype)
    M = Z.project(Y + Y.T)
    loop = Structure.power_traces(M, 6)  # the generic compose/trace loop
    tol = 1e-12 if dtype == F64 else 1e-5
    assert all(math.isclose(a, b, rel_tol=tol, abs_tol=tol) for a, b in
               zip(M.power_traces(6), loop)) and M.power_traces(0) == []
    for scale in (0.01, 0.1, 0.5, 1.2):
        S = M.scale(scale / float(M.inf_norm()))
        for retraction in ("quadratic", "first_order"):
            got = logdet_retraction(S, retraction)
            if got is None:  # outside the series' radius: both refuse
                assert scale >= 0.9 * _RADIUS[retraction]
                continue
            tol = 1e-12 if dtype == F64 else 1e-5
            assert math.isclose(got, _series_reference(S, retraction), rel_tol=tol, abs_tol=tol)
            if dtype == F64:
                h = torch.eye(7, dtype=F64) + S.to_dense()
                if retraction == "quadratic":
                    h = h + 0.5 * S.to_dense() @ S.to_dense()
                assert math.isclose(got, float(torch.linalg.slogdet(h)[1]), rel_tol=0.0,
                                    abs_tol=_LOGDET_TOL + 1e-13)  # the tail bound


@pytest.mark.parametrize("name", ["dense", "diagonal"])
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_along_equals_the_generic_unfolding(name, transpose, gen):
    f = _random(make_structure(name, 4, dtype=F64), gen)
    for axis, shape in ((0, (4, 3, 2)), (1, (3, 4, 2))):
        X = torch.randn(shape, generator=gen, dtype=F64)
        got = f.apply_along(X, axis, transpose)
        assert torch.equal(got, Structure.apply_along(f, X, axis, transpose))
        A = f.to_dense().T if transpose else f.to_dense()
        want = torch.einsum("ab,bjs->ajs", A, X) if axis == 0 else torch.einsum(
            "ab,ibs->ias", A, X)
        assert_close(got, want, 1e-13, "apply_along vs dense")


def test_inf_norm_is_kept_while_the_tensors_are_unmodified(gen):
    """``BlockSites.inf_norm`` is computed once per instance (the engine and the step rule
    both ask for ``‖m‖_∞``) and again after an in-place change of a tensor."""
    M = _random(_sites(), gen).coord_identity().scale(0.5)
    first = M.inf_norm()
    assert M.inf_norm() is first
    assert_close(first, M.to_dense().abs().sum(-1).max(), 1e-12, "‖M‖_∞")
    with torch.no_grad():
        next(iter(M.blocks[1]._t.values())).mul_(4.0)  # the diagonal block, in place
    assert_close(M.inf_norm(), M.to_dense().abs().sum(-1).max(), 1e-12, "after a change")
    assert float(M.inf_norm()) > float(first)


@pytest.mark.parametrize("name,opts", LEAVES + [("kronecker", {"dims": (3, 4)})])
def test_add_identity_equals_adding_the_coordinate_identity(name, opts, gen):
    dim = 12 if name == "kronecker" else 7
    eye = make_structure(name, dim, dtype=F64, **opts).coord_identity()
    M = eye.project_outer(torch.randn(dim, 3, generator=gen, dtype=F64))
    for alpha in (1.0, -0.7):
        got, want = M.add_identity(alpha), M.add(M.coord_identity(), alpha=alpha)
        _same_as_validated(got)
        assert_close(got.to_dense(), want.to_dense(), 0.0, f"{name} + {alpha}·Π̂(I)")
    S = _random(_sites(), gen).coord_identity().scale(0.3)
    assert_close(S.add_identity(-1.0).to_dense(), S.add(S.coord_identity(), alpha=-1.0).to_dense(),
                 0.0, "block sites")
