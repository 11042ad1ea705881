"""Retractions against torch.linalg.matrix_exp (float64) and their invertibility (MATH §1.2, §7.12)."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from structvi.engine import apply_retraction
from structvi.engine.retraction import check_retraction
from structvi.structures import make_structure
from structvi.testing import assert_close

F64 = torch.float64


def sym_coord(d, gen, scale):
    Y = torch.randn(d, d, generator=gen, dtype=F64)
    return make_structure("dense", d, dtype=F64).project(scale * (Y + Y.T) / 2)


@pytest.mark.parametrize("retraction, order", [("first_order", 2), ("quadratic", 3)])
def test_truncations_match_expm_to_their_order(retraction, order, gen):
    """‖h(εM) − exp(εM)‖ ∝ ε^order: 10× smaller ε gives 10^order smaller error."""
    M = sym_coord(6, gen, 1.0)
    errs = []
    for eps in (1e-2, 1e-3):
        h = apply_retraction(M.scale(eps), retraction).to_dense()
        errs.append(float((h - torch.linalg.matrix_exp(eps * M.to_dense())).abs().max()))
    ratio = errs[0] / errs[1]
    assert 10 ** order / 2 < ratio < 10 ** order * 2, (errs, ratio)


@pytest.mark.parametrize("scale", [0.01, 0.4, 3.0, 40.0])
def test_expm_matches_scipy_expm(scale, gen):
    """Oracle: scipy's expm (torch.linalg.matrix_exp is off by ~3e-11 at ‖M‖ ≈ 0.05 in float64)."""
    M = sym_coord(7, gen, scale)
    expected = torch.from_numpy(scipy.linalg.expm(M.to_dense().numpy()))
    assert_close(apply_retraction(M, "expm").to_dense(), expected, 1e-11, f"expm at {scale}")


def test_expm_nonsymmetric_group_element(structure_case, gen):
    """Expm on every structure's coordinates (closed under products) equals matrix_exp."""
    m, M = structure_case.random_coord(gen)
    if not structure_case.orthogonal:
        pytest.skip("Kronecker retracts factor-wise (tested in test_kronecker.py)")
    out = apply_retraction(m.scale(2.0), "expm").to_dense()
    assert_close(out, torch.from_numpy(scipy.linalg.expm(2.0 * M.numpy())), 1e-11, "expm")


@pytest.mark.parametrize("retraction", ["quadratic", "first_order", "expm"])
def test_retraction_of_zero_is_identity_exactly(retraction):
    Z = make_structure("dense", 5, dtype=F64, init="zeros")
    assert torch.equal(apply_retraction(Z, retraction).to_dense(), torch.eye(5, dtype=F64))


def test_quadratic_is_invertible_for_every_step_size(gen):
    """Eigenvalues of I + M + ½M² are ½((1+λ)² + 1) > 0 for symmetric M (MATH §1.2)."""
    M = sym_coord(6, gen, 1.0)
    lam = torch.linalg.eigvalsh(M.to_dense())
    for beta in (-100.0, -3.0, -1.0, 0.5, 1.0, 7.0, 1e3):
        h = apply_retraction(M.scale(beta), "quadratic").to_dense()
        ev = torch.linalg.eigvalsh(h)
        expected = 0.5 * ((1 + beta * lam) ** 2 + 1)
        assert_close(ev.sort().values, expected.sort().values, 1e-10, f"eig h at β={beta}")
        assert (ev > 0).all()


def test_first_order_can_be_singular():
    """The first-order truncation loses invertibility at ‖M‖ = 1 (why a cap is needed)."""
    M = make_structure("diagonal", 3, dtype=F64).from_dense(-torch.eye(3, dtype=F64))
    assert float(apply_retraction(M, "first_order").to_dense().abs().max()) == 0.0


def test_unknown_retraction_lists_valid_names():
    with pytest.raises(ValueError, match=r"retraction must be one of .*'cayley'"):
        check_retraction("cayley")


def test_structures_do_not_import_engine():
    """No import cycle: ``structures`` owns the retractions; ``engine`` imports ``structures``,
    never the reverse (not even lazily inside a function)."""
    import ast
    import pathlib

    import structvi.structures as pkg

    offenders = []
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("structvi.engine")]
    assert offenders == []


def test_engine_reexports_the_structures_retractions():
    import structvi.engine.retraction as eng
    import structvi.structures.retraction as own

    for name in own.RETRACTIONS:
        assert getattr(eng, name) is getattr(own, name)
    assert eng.apply_retraction is own.apply_retraction
