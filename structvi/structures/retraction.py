r"""Retractions ``h(M)`` of the matrix exponential, built from matrix products only (MATH §1.2).

* ``"quadratic"`` (default): :math:`h(M) = I + M + \tfrac12 M^2`. For a real-spectrum ``M`` every
  eigenvalue of ``h(M)`` is :math:`\tfrac12((1+\lambda)^2 + 1) > 0`, so ``K h(M)`` stays
  invertible for every step size.
* ``"first_order"``: :math:`h(M) = I + M` (the INGD/SINGD code); invertible only while
  :math:`\|M\| < 1`.
* ``"expm"``: :math:`\exp(M)` by a degree-12 Taylor polynomial (Horner form) after scaling by
  :math:`2^{-s}` so that :math:`\|2^{-s}M\|_\infty \le \tfrac12`, then ``s`` squarings.

Every function works on any :class:`~structvi.structures.Structure` whose coordinate space is
closed under products (all structures except ``kronecker``, which retracts factor-wise).

This module owns the retractions: :meth:`Structure.retract` calls :func:`apply_retraction`, and
:mod:`structvi.engine.retraction` re-exports them. It imports nothing from the package at run
time, so ``structures`` does not depend on ``engine``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structvi.structures.base import Structure

RETRACTIONS = ("quadratic", "first_order", "expm")
_EXPM_DEGREE = 12


def check_retraction(retraction: str) -> str:
    """Validate a retraction name."""
    if retraction not in RETRACTIONS:
        raise ValueError(f"retraction must be one of {RETRACTIONS}, got retraction={retraction!r}")
    return retraction


def quadratic(M: Structure) -> Structure:
    """``I + M + ½ M²``."""
    return M.identity_like().add(M).add(M.compose(M), alpha=0.5)


def first_order(M: Structure) -> Structure:
    """``I + M``."""
    return M.identity_like().add(M)


def expm(M: Structure) -> Structure:
    """``exp(M)`` by scaling, a degree-12 Taylor polynomial and squaring (matmul only)."""
    norm = float(M.inf_norm())
    s = 0 if norm <= 0.5 or not math.isfinite(norm) else math.ceil(math.log2(norm / 0.5))
    X = M.scale(2.0**-s)
    eye = M.identity_like()
    h = eye
    for k in range(_EXPM_DEGREE, 0, -1):  # h = I + X/k h, innermost first (Horner)
        h = eye.add(X.compose(h), alpha=1.0 / k)
    for _ in range(s):
        h = h.compose(h)
    return h


def apply_retraction(M: Structure, retraction: str = "quadratic") -> Structure:
    """``h(M)`` for the named retraction."""
    check_retraction(retraction)
    return {"quadratic": quadratic, "first_order": first_order, "expm": expm}[retraction](M)
