"""Retractions ``h(M)`` used by the engine's factor step (MATH §1.2).

They are owned by :mod:`structvi.structures.retraction` (a structure's :meth:`retract` applies
them) and re-exported here, so ``structures`` never imports ``engine``.
"""

from structvi.structures.retraction import (
    RETRACTIONS,
    apply_retraction,
    check_retraction,
    expm,
    first_order,
    quadratic,
)

__all__ = [
    "RETRACTIONS", "apply_retraction", "check_retraction", "expm", "first_order", "quadratic",
]
